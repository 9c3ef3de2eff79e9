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
from quantile_forest import RandomForestQuantileRegressor

from .config import DatasetConfig
from .geography import (
    STATE_ABBREV_BY_FIPS,
    district_county_shares,
    district_populations,
    districts,
    raw_input,
)
from .io import atomic_path, sha256_file
from .results import StepResult

SOURCE_FILE = "cps_taxunits.csv.gz"

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
# Each recipient's random quantile is rounded to this grid; 0 and 1 themselves are not allowed.
QRF_QUANTILE_GRID = np.linspace(0.005, 0.995, 199)

TAX_UNIT_COLUMNS = (
    "RECID", "MARS", "XTOT", "age_head", "age_spouse", "nu06", "nu13", "nu18", "n1820",
    "elderly_dependents", "EIC", "snap_ben", *dict.fromkeys(c.column for c in AGI_COMPONENTS),
    *QRF_IMPUTED,
)
REQUIRED_COLUMNS = (*HOUSEHOLD_KEY, "fips", "s006", *TAX_UNIT_COLUMNS)

# Dependent age bands (inclusive), in the order the CPS counts fill them.
DEPENDENT_AGE_BANDS = np.array([(0, 5), (6, 12), (13, 17), (18, 20), (21, 64), (65, 84)])


@dataclass(frozen=True)
class Dataset:
    households: pd.DataFrame
    tax_units: pd.DataFrame
    persons: pd.DataFrame


# --- EITC ---------------------------------------------------------------------------------------

# 2022 parameters by number of qualifying children (0, 1, 2, 3+).
EITC_PHASE_IN_RATE = np.array([0.0765, 0.34, 0.40, 0.45])
EITC_EARNED_INCOME_AMOUNT = np.array([7_320, 10_980, 15_410, 15_410])
EITC_MAX_CREDIT = np.array([560, 3_733, 6_164, 6_935])
EITC_PHASE_OUT_START = np.array([9_160, 20_130, 20_130, 20_130])
EITC_JOINT_PHASE_OUT_BONUS = 6_130
EITC_PHASE_OUT_RATE = np.array([0.0765, 0.1598, 0.2106, 0.2106])
EITC_INVESTMENT_INCOME_LIMIT = 10_300
EITC_CHILDLESS_AGES = (25, 64)


def earned_income_tax_credit(earned, agi, joint, children, investment_income, age_head) -> np.ndarray:
    """The 2022 federal EITC, vectorised; a simplified model (no residency or SSN rules)."""
    earned = np.asarray(earned, dtype=float)
    agi = np.asarray(agi, dtype=float)
    kids = np.clip(np.asarray(children), 0, 3).astype(int)
    age = np.asarray(age_head)
    phase_in = np.minimum(EITC_PHASE_IN_RATE[kids] * np.maximum(earned, 0), EITC_MAX_CREDIT[kids])
    phase_out_start = EITC_PHASE_OUT_START[kids] + np.where(joint, EITC_JOINT_PHASE_OUT_BONUS, 0)
    excess = np.maximum(np.maximum(agi, earned) - phase_out_start, 0)
    credit = np.maximum(phase_in - EITC_PHASE_OUT_RATE[kids] * excess, 0)
    eligible = np.asarray(investment_income) <= EITC_INVESTMENT_INCOME_LIMIT
    eligible &= (kids > 0) | ((age >= EITC_CHILDLESS_AGES[0]) & (age <= EITC_CHILDLESS_AGES[1]))
    return np.where(eligible, credit, 0.0)


# --- sample -------------------------------------------------------------------------------------


def read_tax_units(path: Path) -> pd.DataFrame:
    """The CPS tax units, only the columns the dataset uses; AGI components absent are skipped."""
    optional = {c.column for c in AGI_COMPONENTS}
    units = pd.read_csv(path, usecols=lambda column: column in REQUIRED_COLUMNS)
    missing = [c for c in REQUIRED_COLUMNS if c not in units.columns and c not in optional]
    if missing:
        raise ValueError(f"{path.name} lacks the columns {missing}")
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


def draw_within_groups(groups: np.ndarray, option_group: np.ndarray, option_share: np.ndarray, rng):
    """For each row, the index of an option of its group drawn with probability by share.

    Options are sorted by group; each group's cumulative shares are shifted by the group number, so
    one searchsorted over all rows draws them all.
    """
    shares = option_share / pd.Series(option_share).groupby(option_group).transform("sum").to_numpy()
    cumulative = pd.Series(shares).groupby(option_group).cumsum().to_numpy()
    last_of_group = np.r_[option_group[1:] != option_group[:-1], True]
    cumulative[last_of_group] = 1.0  # no rounding gap at the top of a group
    return np.searchsorted(option_group + cumulative, groups + rng.random(len(groups)), side="right")


def assign_geography(state_fips: np.ndarray, rng, raw_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
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
        np.searchsorted(district_table["district"].to_numpy(), county_table["district"].to_numpy()),
        county_table["share"].to_numpy(),
        rng,
    )
    return chosen_district, county_table["county"].to_numpy()[county_pick]


# --- imputation ---------------------------------------------------------------------------------


def impute_qrf(donors: pd.DataFrame, recipients: pd.DataFrame, variable: str, config, rng):
    """Draw each recipient's value at a random quantile of the forest's conditional distribution."""
    forest = RandomForestQuantileRegressor(
        n_estimators=config.qrf_trees,
        min_samples_leaf=QRF_MIN_SAMPLES_LEAF,
        random_state=config.seed,
        n_jobs=1,
    )
    forest.fit(donors[list(QRF_PREDICTORS)].to_numpy(float), donors[variable].to_numpy(float))
    predicted = forest.predict(
        recipients[list(QRF_PREDICTORS)].to_numpy(float),
        quantiles=list(QRF_QUANTILE_GRID),
        interpolation="nearest",  # a value some donor really has
    )
    predicted = predicted.reshape(len(recipients), len(QRF_QUANTILE_GRID))
    step = QRF_QUANTILE_GRID[1] - QRF_QUANTILE_GRID[0]
    nearest = np.clip(
        np.rint((rng.random(len(recipients)) - QRF_QUANTILE_GRID[0]) / step).astype(int),
        0, len(QRF_QUANTILE_GRID) - 1,
    )
    return predicted[np.arange(len(recipients)), nearest]


# --- build --------------------------------------------------------------------------------------


def build_datasets(out_path: Path, config: DatasetConfig, raw_dir: Path | None = None) -> StepResult:
    """Sample, enrich and impute the household microdata; write it as one reproducible HDF5 file."""
    rng = np.random.default_rng(config.seed)
    source = raw_input(SOURCE_FILE, raw_dir)
    all_units = read_tax_units(source)
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
    units["eitc"] = earned_income_tax_credit(
        earned=units["e00200"] + units["e00900"],
        agi=units["adjusted_gross_income"],
        joint=units["MARS"] == 2,
        children=units["EIC"],
        investment_income=units["e00300"] + units["e00600"],
        age_head=units["age_head"],
    )

    sample["state_fips"] = sample.pop("fips")
    sample["state"] = sample["state_fips"].map(lambda fips: STATE_ABBREV_BY_FIPS[f"{fips:02d}"])
    sample["district"], sample["county"] = assign_geography(sample["state_fips"].to_numpy(), rng, raw_dir)

    outside = np.flatnonzero(~in_sample)
    donors = all_units.iloc[np.sort(rng.choice(outside, min(config.qrf_donors, len(outside)), replace=False))]
    unit_weight = sample["weight"].to_numpy()[units["household_id"].to_numpy()]
    figures: dict[str, float | int] = {"donors": len(donors)}
    for variable in QRF_IMPUTED:
        units[f"{variable}_reported"] = units[variable]
        units[variable] = impute_qrf(donors, units, variable, config, rng)
        figures[f"{variable}_reported_mean"] = float(np.average(units[f"{variable}_reported"], weights=unit_weight))
        figures[f"{variable}_imputed_mean"] = float(np.average(units[variable], weights=unit_weight))

    by_household = units.groupby("household_id")
    sample["n_persons"] = persons.groupby("household_id").size().to_numpy()
    sample["n_tax_units"] = by_household.size().to_numpy()
    sample["snap"] = by_household["snap_ben"].sum().to_numpy()
    sample["adjusted_gross_income"] = by_household["adjusted_gross_income"].sum().to_numpy()
    units = units[[
        "tax_unit_id", "household_id", *(c for c in TAX_UNIT_COLUMNS if c in units.columns),
        "adjusted_gross_income", "eitc", *(f"{variable}_reported" for variable in QRF_IMPUTED),
    ]]

    source_sha256 = sha256_file(source)
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["seed"] = config.seed
            handle.attrs["households"] = config.households
            handle.attrs["source"] = SOURCE_FILE
            handle.attrs["source_sha256"] = source_sha256
            for group, frame in (("household", sample), ("tax_unit", units), ("person", persons)):
                write_frame(handle.create_group(group, track_order=True), frame)

    figures.update({
        "households": len(sample),
        "tax_units": len(units),
        "persons": len(persons),
        "weighted_households": float(sample["weight"].sum()),
        "weighted_persons": float((sample["weight"] * sample["n_persons"]).sum()),
        "states_covered": int(sample["state_fips"].nunique()),
        "agi_components_missing": len(AGI_COMPONENTS) - len(present),
    })
    return StepResult(outputs={"dataset": out_path}, figures=figures)


# --- HDF5 ---------------------------------------------------------------------------------------


def column_array(values: pd.Series) -> np.ndarray:
    """int64, float64 or fixed-length UTF-8 bytes: types every HDF5 reader understands."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
        return values.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(values):
        return values.to_numpy(np.float64)
    return np.char.encode(values.to_numpy(str), "utf-8")


def write_frame(group: h5py.Group, frame: pd.DataFrame) -> None:
    # track_times=False: HDF5 would otherwise stamp each dataset and the bytes would vary by run.
    for column in frame.columns:
        group.create_dataset(column, data=column_array(frame[column]), track_times=False)


def read_frame(group: h5py.Group) -> pd.DataFrame:
    columns = {}
    for name, dataset in group.items():
        values = dataset[()]
        columns[name] = np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values
    return pd.DataFrame(columns)


def load_dataset(path: Path) -> Dataset:
    """The three tables of a dataset file, strings decoded, columns in the order written."""
    with h5py.File(path, "r") as handle:
        return Dataset(
            households=read_frame(handle["household"]),
            tax_units=read_frame(handle["tax_unit"]),
            persons=read_frame(handle["person"]),
        )
