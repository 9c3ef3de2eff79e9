"""Source datasets: a seeded, state-stratified household sample of the real CPS tax units.

The sample carries persons, simplified tax variables, a district and county within each
household's state, and QRF-imputed variables. Every random draw comes from one numpy Generator
seeded by the config, and the HDF5 file stores no timestamps, so the same seed in the same
environment gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd

from pipeline_assets.steps.config import DatasetConfig
from pipeline_assets.steps.geography import (
    GEOGRAPHY_FILES,
    STATE_ABBREV_BY_FIPS,
    district_county_shares,
    district_populations,
    districts,
    raw_input,
)
from pipeline_assets.steps.h5io import open_for_write, read_frame, write_frame
from pipeline_assets.steps.policyengine import (
    PERSON_MONEY_COLUMNS,
    PERSON_SOURCE_COLUMNS,
    filing_status,
    person_inputs,
)
from pipeline_assets.steps.results import StepResult
from pipeline_assets.steps.uprating import CPI_FILE, cpi_u, uprating_factors
from resources.files import atomic_path, sha256_file

SOURCE_FILE = "cps_taxunits.csv.gz"
# Every raw file the datasets are made from: the tax units, the price index their money is uprated
# by, and the geography each household is placed in.
RAW_INPUT_FILES = (SOURCE_FILE, CPI_FILE, *GEOGRAPHY_FILES)

# The file stacks three CPS ASEC years and h_seq restarts every year, so h_seq alone joins
# unrelated households (often in different states); (year, h_seq) is the real household.
HOUSEHOLD_KEY = ("FLPDYR", "h_seq")


class AgiComponent(NamedTuple):
    column: str
    share: float  # the part of the column that counts towards AGI


# Simplified AGI, not tax law. Total pensions (e01500) are left out because their taxable part,
# e01700, is already in; half of Social Security stands in for its taxable share.
AGI_COMPONENTS: tuple[AgiComponent, ...] = tuple(
    AgiComponent(column, 1.0)
    for column in (
        "e00200", "e00300", "e00600", "e00900", "e02100", "e00800",
        "e01400", "e01700", "e02300", "e01100",
    )
) + (AgiComponent("e02400", 0.5),)

QRF_PREDICTORS = ("age_head", "MARS", "XTOT", "nu18", "e00200", "e00300", "e00600", "e02400", "fips")
QRF_IMPUTED = ("e18400", "e32800")  # state and local income taxes; child care expenses
QRF_MIN_SAMPLES_LEAF = 5

TAX_UNIT_COLUMNS = tuple(dict.fromkeys((
    "RECID", "MARS", "XTOT", "age_head", "age_spouse", "nu06", "nu13", "nu18", "n1820",
    "elderly_dependents", "EIC", "snap_ben", *(c.column for c in AGI_COMPONENTS),
    *QRF_IMPUTED, *PERSON_SOURCE_COLUMNS,
)))
SOURCE_COLUMNS = (*HOUSEHOLD_KEY, "fips", "s006", *TAX_UNIT_COLUMNS)
# Every amount in dollars of the record's survey year (FLPDYR), uprated to the release period.
MONEY_COLUMNS = tuple(dict.fromkeys((
    *(c.column for c in AGI_COMPONENTS), "snap_ben", *QRF_IMPUTED, *PERSON_MONEY_COLUMNS,
)))

# Dependent age bands (inclusive), in the order the CPS counts fill them.
DEPENDENT_AGE_BANDS = np.array([(0, 5), (6, 12), (13, 17), (18, 20), (21, 64), (65, 84)])


@dataclass(frozen=True)
class Dataset:
    households: pd.DataFrame
    tax_units: pd.DataFrame
    persons: pd.DataFrame
    period: int  # the year its money is in


# --- EITC ---------------------------------------------------------------------------------------

# 2022 parameters by number of qualifying children (0, 1, 2, 3+).
EITC_PARAMETER_YEAR = 2022
EITC_PHASE_IN_RATE = np.array([0.0765, 0.34, 0.40, 0.45])
EITC_EARNED_INCOME_AMOUNT = np.array([7_320, 10_980, 15_410, 15_410])
EITC_MAX_CREDIT = np.array([560, 3_733, 6_164, 6_935])
EITC_PHASE_OUT_START = np.array([9_160, 20_130, 20_130, 20_130])
EITC_JOINT_PHASE_OUT_BONUS = 6_130
EITC_PHASE_OUT_RATE = np.array([0.0765, 0.1598, 0.2106, 0.2106])
EITC_INVESTMENT_INCOME_LIMIT = 10_300
EITC_CHILDLESS_AGES = (25, 64)


def earned_income_tax_credit(
    earned, agi, joint, children, investment_income, age_head
) -> np.ndarray:
    """The 2022 federal EITC, vectorised; a simplified model (no residency or SSN rules)."""
    earned = np.asarray(earned, dtype=float)
    agi = np.asarray(agi, dtype=float)
    kids = np.clip(np.asarray(children), 0, 3).astype(int)
    age = np.asarray(age_head)
    # The published maximum is rate x earned-income amount, rounded: it holds from that amount on.
    phase_in = np.where(
        earned >= EITC_EARNED_INCOME_AMOUNT[kids],
        EITC_MAX_CREDIT[kids],
        np.minimum(EITC_PHASE_IN_RATE[kids] * np.maximum(earned, 0), EITC_MAX_CREDIT[kids]),
    )
    phase_out_start = EITC_PHASE_OUT_START[kids] + np.where(joint, EITC_JOINT_PHASE_OUT_BONUS, 0)
    excess = np.maximum(np.maximum(agi, earned) - phase_out_start, 0)
    credit = np.maximum(phase_in - EITC_PHASE_OUT_RATE[kids] * excess, 0)
    eligible = np.asarray(investment_income) <= EITC_INVESTMENT_INCOME_LIMIT
    eligible &= (kids > 0) | ((age >= EITC_CHILDLESS_AGES[0]) & (age <= EITC_CHILDLESS_AGES[1]))
    return np.where(eligible, credit, 0.0)


# --- sample -------------------------------------------------------------------------------------


def read_tax_units(path: Path, period: int, raw_dir: Path | None = None) -> pd.DataFrame:
    """The CPS tax units, only the columns the dataset uses (AGI components absent are skipped), their
    money in `period`'s dollars; `uprating_factor` is what each unit's amounts were multiplied by."""
    optional = {c.column for c in AGI_COMPONENTS}
    units = pd.read_csv(path, usecols=lambda column: column in SOURCE_COLUMNS)
    missing = [c for c in SOURCE_COLUMNS if c not in units.columns and c not in optional]
    if missing:
        raise ValueError(f"{path.name} lacks the columns {missing}")
    units["uprating_factor"] = uprating_factors(units["FLPDYR"].to_numpy(), period, raw_dir)
    for column in MONEY_COLUMNS:
        if column in units.columns:
            units[column] = units[column] * units["uprating_factor"]
    return units


def households_of(units: pd.DataFrame) -> pd.DataFrame:
    """One row per CPS household, sorted by its key: state and weight (mean of its units')."""
    grouped = units.groupby(list(HOUSEHOLD_KEY), sort=True)
    return pd.DataFrame(
        {"fips": grouped["fips"].first(), "weight": grouped["s006"].mean() / 100}
    ).reset_index()


def allocate_sample(state_weights: pd.Series, total: int, minimum: int) -> pd.Series:
    """Households per state: `minimum` each, the rest proportional to weight (largest remainder)."""
    spare = total - minimum * len(state_weights)
    if spare < 0:
        raise ValueError(
            f"{total} households cannot give each of {len(state_weights)} states {minimum}"
        )
    quota = spare * state_weights / state_weights.sum()
    allocation = np.floor(quota).astype(int)
    leftover = spare - int(allocation.sum())
    by_remainder = np.argsort(-(quota - allocation).to_numpy(), kind="stable")
    allocation.iloc[by_remainder[:leftover]] += 1
    return allocation + minimum


def sample_households(households: pd.DataFrame, config: DatasetConfig, rng) -> pd.DataFrame:
    """A simple random sample within each state, reweighted to the state's weighted total."""
    state_totals = households.groupby("fips")["weight"].sum()
    allocation = allocate_sample(state_totals, config.households, config.min_households_per_state)
    available = households["fips"].value_counts()
    short = allocation[allocation > available.reindex(allocation.index)]
    if not short.empty:
        raise ValueError(f"too few CPS households in states {list(short.index)} for the sample")
    order = np.lexsort((rng.random(len(households)), households["fips"].to_numpy()))
    shuffled = households.iloc[order]
    rank_in_state = shuffled.groupby("fips").cumcount().to_numpy()
    chosen = shuffled[rank_in_state < allocation.reindex(shuffled["fips"]).to_numpy()]
    sample = chosen.sort_values(["fips", *HOUSEHOLD_KEY]).reset_index(drop=True)
    scale = state_totals / sample.groupby("fips")["weight"].sum()
    sample["weight"] *= scale.reindex(sample["fips"]).to_numpy()
    return sample


# --- persons ------------------------------------------------------------------------------------


def dependent_counts(units: pd.DataFrame, has_spouse: np.ndarray) -> np.ndarray:
    """Dependents per unit and age band, summing to XTOT minus head and spouse.

    The CPS age counts include the head and spouse, so they come off their own band; counts that
    still exceed the dependents are cut, youngest bands kept first, and the remainder are adults.
    """
    def in_band(age, low, high, present=True):
        return ((age >= low) & (age <= high) & present).astype(int)

    head, spouse = units["age_head"].to_numpy(), units["age_spouse"].to_numpy()
    young_counts = np.column_stack([
        units["nu06"], units["nu13"] - units["nu06"], units["nu18"] - units["nu13"], units["n1820"],
    ])
    for band, (low, high) in enumerate(DEPENDENT_AGE_BANDS[:4]):
        young_counts[:, band] -= in_band(head, low, high) + in_band(spouse, low, high, has_spouse)
    dependents = np.maximum(units["XTOT"].to_numpy(), 1) - 1 - has_spouse
    capped = np.minimum(np.cumsum(np.maximum(young_counts, 0), axis=1), dependents[:, None])
    young = np.diff(capped, axis=1, prepend=0)
    adults = dependents - capped[:, -1]
    elderly = np.minimum(units["elderly_dependents"].to_numpy(), adults)
    return np.column_stack([young, adults - elderly, elderly])


def make_persons(units: pd.DataFrame, rng) -> pd.DataFrame:
    """Head, spouse (joint filers) and dependents of every unit; dependents' ages drawn by band."""
    unit_index = np.arange(len(units))
    has_spouse = (units["MARS"].to_numpy() == 2) & (units["XTOT"].to_numpy() >= 2)
    counts = dependent_counts(units, has_spouse)
    flat_counts = counts.ravel()
    dependent_unit = np.repeat(np.repeat(unit_index, counts.shape[1]), flat_counts)
    band = np.repeat(np.tile(np.arange(counts.shape[1]), len(units)), flat_counts)
    dependent_age = rng.integers(DEPENDENT_AGE_BANDS[band, 0], DEPENDENT_AGE_BANDS[band, 1] + 1)
    spouse_unit = unit_index[has_spouse]
    unit = np.concatenate([unit_index, spouse_unit, dependent_unit])
    order = np.argsort(unit, kind="stable")  # head, spouse, dependents within each unit
    persons = pd.DataFrame({
        "tax_unit_id": units["tax_unit_id"].to_numpy()[unit],
        "household_id": units["household_id"].to_numpy()[unit],
        "age": np.concatenate([
            units["age_head"].to_numpy(), units["age_spouse"].to_numpy()[has_spouse], dependent_age,
        ]),
        "role": np.repeat(["head", "spouse", "dependent"], [len(units), len(spouse_unit), len(band)]),
    }).iloc[order].reset_index(drop=True)
    persons.insert(0, "person_id", np.arange(len(persons)))
    return persons


# --- geography ----------------------------------------------------------------------------------


def draw_within_groups(
    groups: np.ndarray, option_group: np.ndarray, option_share: np.ndarray, rng
) -> np.ndarray:
    """For each row, the index of an option of its group, drawn with probability by share.

    Options are sorted by group; each group's cumulative shares are shifted by the group number, so
    one searchsorted over all rows draws them all. Within a group the pick is the first option whose
    cumulative share exceeds u ~ U(0, 1): with options in value order, the u-quantile.
    """
    shares = option_share / pd.Series(option_share).groupby(option_group).transform("sum").to_numpy()
    cumulative = pd.Series(shares).groupby(option_group).cumsum().to_numpy(copy=True)  # written below
    last_of_group = np.r_[option_group[1:] != option_group[:-1], True]
    cumulative[last_of_group] = 1.0  # no rounding gap at the top of a group
    return np.searchsorted(option_group + cumulative, groups + rng.random(len(groups)), side="right")


def assign_geography(
    state_fips: np.ndarray, rng, raw_dir: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """District within the state by population, then county within the district by share."""
    district_table = pd.DataFrame(districts(raw_dir), columns=["district", "state_fips", "number"])
    district_table["state_fips"] = district_table["state_fips"].astype(int)
    district_table = district_table.sort_values(["state_fips", "district"], ignore_index=True)
    populations = district_populations(raw_dir)
    state_codes = np.unique(district_table["state_fips"])
    district_pick = draw_within_groups(
        np.searchsorted(state_codes, state_fips),
        np.searchsorted(state_codes, district_table["state_fips"].to_numpy()),
        district_table["district"].map(populations).to_numpy(dtype=float),
        rng,
    )
    chosen_district = district_table["district"].to_numpy()[district_pick]

    shares = district_county_shares(raw_dir)
    county_table = pd.DataFrame(
        [(d, county, share) for d in district_table["district"] for county, share in shares[d]],
        columns=["district", "county", "share"],
    )
    county_pick = draw_within_groups(
        district_pick,
        pd.Index(district_table["district"]).get_indexer(county_table["district"]),
        county_table["share"].to_numpy(),
        rng,
    )
    return chosen_district, county_table["county"].to_numpy()[county_pick]


# --- imputation ---------------------------------------------------------------------------------


def impute_qrf(
    donors: pd.DataFrame, recipients: pd.DataFrame, variable: str, config: DatasetConfig, rng
) -> np.ndarray:
    """Each recipient's value at a random quantile u ~ U(0, 1) of the forest's conditional law.

    The quantile is exact, not rounded to a grid: the forest's weights on the donors
    (proximity_counts) give each recipient's distribution, and a grid would cut off the upper tail
    that dominates the mean of sparse variables such as child care expenses.
    """
    # Imported here (scikit-learn and scipy.stats with it: ~0.9 s): the fits, the area files and the
    # diagnostics read datasets without it.
    from quantile_forest import RandomForestQuantileRegressor

    forest = RandomForestQuantileRegressor(
        n_estimators=config.qrf_trees,
        min_samples_leaf=QRF_MIN_SAMPLES_LEAF,
        random_state=config.seed,
        n_jobs=1,
    )
    donor_values = donors[variable].to_numpy(float)
    forest.fit(donors[list(QRF_PREDICTORS)].to_numpy(float), donor_values)
    proximity = forest.proximity_counts(recipients[list(QRF_PREDICTORS)].to_numpy(float))
    donor, count = np.concatenate([np.asarray(row) for row in proximity]).T
    recipient = np.repeat(np.arange(len(recipients)), [len(row) for row in proximity])
    value = donor_values[donor]
    order = np.lexsort((donor, value, recipient))  # each recipient's donors in value order
    pick = draw_within_groups(
        np.arange(len(recipients)), recipient[order], count[order].astype(float), rng
    )
    return value[order][pick]


# --- build --------------------------------------------------------------------------------------


def build_datasets(out_path: Path, config: DatasetConfig, raw_dir: Path | None = None) -> StepResult:
    """Sample, enrich and impute the household microdata; write it as one reproducible HDF5 file."""
    rng = np.random.default_rng(config.seed)
    source = raw_input(SOURCE_FILE, raw_dir)
    all_units = read_tax_units(source, config.period, raw_dir)
    all_households = households_of(all_units)
    sample = sample_households(all_households, config, rng)
    sample.insert(0, "household_id", np.arange(len(sample)))

    in_sample = pd.MultiIndex.from_frame(all_units[list(HOUSEHOLD_KEY)]).isin(
        pd.MultiIndex.from_frame(sample[list(HOUSEHOLD_KEY)])
    )
    units = all_units[in_sample].merge(
        sample[[*HOUSEHOLD_KEY, "household_id"]], on=list(HOUSEHOLD_KEY)
    ).sort_values(["household_id", "RECID"], ignore_index=True)
    units.insert(0, "tax_unit_id", np.arange(len(units)))

    persons = make_persons(units, rng)

    present = [c for c in AGI_COMPONENTS if c.column in units.columns]
    units["adjusted_gross_income"] = sum(units[c.column] * c.share for c in present)
    # The credit under its parameters' year, on incomes in that year's dollars, then in the period's.
    index = cpi_u(raw_dir)
    to_parameter_year = index[EITC_PARAMETER_YEAR] / index[config.period]
    units["eitc"] = earned_income_tax_credit(
        earned=(units["e00200"] + units["e00900"]) * to_parameter_year,
        agi=units["adjusted_gross_income"] * to_parameter_year,
        joint=units["MARS"] == 2,
        children=units["EIC"],
        investment_income=(units["e00300"] + units["e00600"]) * to_parameter_year,
        age_head=units["age_head"],
    ) / to_parameter_year

    sample["state_fips"] = sample.pop("fips")
    sample["state"] = sample["state_fips"].map(lambda fips: STATE_ABBREV_BY_FIPS[f"{fips:02d}"])
    sample["district"], sample["county"] = assign_geography(
        sample["state_fips"].to_numpy(), rng, raw_dir
    )

    outside = np.flatnonzero(~in_sample)
    donor_rows = rng.choice(outside, min(config.qrf_donors, len(outside)), replace=False)
    donors = all_units.iloc[np.sort(donor_rows)]
    unit_weight = sample["weight"].to_numpy()[units["household_id"].to_numpy()]
    figures: dict[str, float | int] = {"donors": len(donors)}
    for variable in QRF_IMPUTED:
        units[f"{variable}_reported"] = units[variable]
        units[variable] = impute_qrf(donors, units, variable, config, rng)
        for kind, column in (("reported", f"{variable}_reported"), ("imputed", variable)):
            figures[f"{variable}_{kind}_mean"] = float(np.average(units[column], weights=unit_weight))

    by_household = units.groupby("household_id")
    sample["n_persons"] = persons.groupby("household_id").size().to_numpy()
    sample["n_tax_units"] = by_household.size().to_numpy()
    sample["snap"] = by_household["snap_ben"].sum().to_numpy()
    sample["adjusted_gross_income"] = by_household["adjusted_gross_income"].sum().to_numpy()
    sample["spm_unit_pre_subsidy_childcare_expenses"] = by_household["e32800"].sum().to_numpy()
    units["filing_status"] = filing_status(units["MARS"].to_numpy())
    persons = persons.assign(**person_inputs(units, persons))
    units = units[[
        "tax_unit_id", "household_id", "FLPDYR", "uprating_factor",
        *(c for c in TAX_UNIT_COLUMNS if c in units.columns), "filing_status",
        "adjusted_gross_income", "eitc", *(f"{variable}_reported" for variable in QRF_IMPUTED),
    ]]

    source_sha256 = sha256_file(source)
    with atomic_path(out_path) as tmp:
        with open_for_write(tmp) as handle:
            handle.attrs["seed"] = config.seed
            handle.attrs["period"] = config.period
            handle.attrs["households"] = config.households
            handle.attrs["source"] = SOURCE_FILE
            handle.attrs["source_sha256"] = source_sha256
            for group, frame in (("household", sample), ("tax_unit", units), ("person", persons)):
                write_frame(handle.create_group(group), frame)

    figures.update({
        "households": len(sample),
        "tax_units": len(units),
        "persons": len(persons),
        "weighted_households": float(sample["weight"].sum()),
        "weighted_persons": float((sample["weight"] * sample["n_persons"]).sum()),
        "states_covered": int(sample["state_fips"].nunique()),
        "agi_components_missing": len(AGI_COMPONENTS) - len(present),
        "period": config.period,
        "mean_uprating_factor": float(np.average(units["uprating_factor"], weights=unit_weight)),
    })
    return StepResult(outputs={"dataset": out_path}, figures=figures)


def load_dataset(path: Path) -> Dataset:
    """The three tables of a dataset file, strings decoded."""
    with h5py.File(path, "r") as handle:
        return Dataset(
            households=read_frame(handle["household"]),
            tax_units=read_frame(handle["tax_unit"]),
            persons=read_frame(handle["person"]),
            period=int(handle.attrs["period"]),
        )
