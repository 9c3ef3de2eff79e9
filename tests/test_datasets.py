"""The source datasets step: reproducible bytes, a faithful state-stratified sample, sane variables."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline_assets.steps.config import DatasetConfig
from pipeline_assets.steps.datasets import (
    MONEY_COLUMNS,
    QRF_IMPUTED,
    allocate_sample,
    build_datasets,
    earned_income_tax_credit,
    load_dataset,
)
from pipeline_assets.steps.geography import (
    STATE_ABBREV_BY_FIPS,
    district_county_shares,
    districts,
    raw_input,
)
from pipeline_assets.steps.policyengine import INPUTS_BY_ENTITY
from pipeline_assets.steps.uprating import CPI_FILE, CPI_YEARS, PeriodNotCovered, cpi_u
from resources.files import sha256_file

TINY = DatasetConfig(households=300, qrf_donors=400, qrf_trees=10, seed=7)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("datasets") / "source.h5"
    result = build_datasets(path, TINY)
    return path, result, load_dataset(path)


@pytest.fixture(scope="module")
def cps():
    return pd.read_csv(
        raw_input("cps_taxunits.csv.gz"), usecols=["FLPDYR", "h_seq", "fips", "s006", "RECID"]
    )


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    path, _, _ = built
    again = build_datasets(tmp_path / "again.h5", TINY)
    other = build_datasets(tmp_path / "other.h5", TINY.model_copy(update={"seed": 8}))
    assert sha256_file(again.outputs["dataset"]) == sha256_file(path)
    assert sha256_file(other.outputs["dataset"]) != sha256_file(path)


def stored_times(node) -> bool:
    """Whether HDF5 stamped the object with times (bytes would then differ from build to build)."""
    info = h5py.h5o.get_info(node.id)
    return any((info.atime, info.mtime, info.ctime, info.btime))


def test_file_layout_and_attributes(built):
    path, _, _ = built
    with h5py.File(path, "r") as handle:
        assert set(handle) == {"household", "tax_unit", "person"}
        assert handle.attrs["seed"] == TINY.seed
        assert handle.attrs["households"] == TINY.households
        assert handle.attrs["source"] == "cps_taxunits.csv.gz"
        assert handle.attrs["source_sha256"] == sha256_file(raw_input("cps_taxunits.csv.gz"))
        for group in handle.values():
            assert not stored_times(group)
            for dataset in group.values():
                assert not stored_times(dataset)
                assert dataset.dtype.kind in "Sb" or dataset.dtype in (np.int64, np.float64)
        assert handle["household/district"].dtype.kind == "S"
        assert handle["person/role"].dtype.kind == "S"


def test_figures_are_plain_numbers_matching_the_tables(built):
    _, result, data = built
    figures = result.figures
    assert all(type(value) in (int, float) for value in figures.values())
    assert figures["households"] == len(data.households) == TINY.households
    assert figures["tax_units"] == len(data.tax_units)
    assert figures["persons"] == len(data.persons)
    assert figures["donors"] == TINY.qrf_donors
    assert figures["states_covered"] == 51
    assert figures["weighted_households"] == pytest.approx(data.households["weight"].sum())


def test_every_state_gets_its_minimum(built):
    _, _, data = built
    per_state = data.households.groupby("state_fips").size()
    assert len(per_state) == 51
    assert per_state.min() >= TINY.min_households_per_state


def test_state_weights_sum_to_full_file_household_totals(built, cps):
    _, _, data = built
    households = cps.groupby(["FLPDYR", "h_seq"]).agg(fips=("fips", "first"), s006=("s006", "mean"))
    expected = (households["s006"] / 100).groupby(households["fips"]).sum()
    sampled = data.households.groupby("state_fips")["weight"].sum()
    np.testing.assert_allclose(sampled.sort_index(), expected.sort_index(), rtol=1e-9)


def test_household_key_keeps_each_household_in_one_state(cps):
    """h_seq restarts every CPS year, so only (year, h_seq) names one household."""
    assert cps.groupby(["FLPDYR", "h_seq"])["fips"].nunique().max() == 1


def test_sampled_households_carry_all_their_tax_units(built, cps):
    _, _, data = built
    keys = data.households[["household_id", "FLPDYR", "h_seq"]]
    expected = cps.merge(keys, on=["FLPDYR", "h_seq"]).groupby("household_id").size()
    assert data.households.set_index("household_id")["n_tax_units"].equals(expected)
    assert sorted(data.tax_units["RECID"]) == sorted(cps.merge(keys, on=["FLPDYR", "h_seq"])["RECID"])


def test_persons_per_unit_equal_xtot(built):
    _, _, data = built
    units = data.tax_units.set_index("tax_unit_id")
    persons = data.persons.groupby("tax_unit_id")
    assert persons.size().reindex(units.index).equals(units["XTOT"])
    roles = data.persons.groupby(["tax_unit_id", "role"]).size().unstack(fill_value=0)
    assert (roles["head"] == 1).all()
    assert roles["spouse"].reindex(units.index, fill_value=0).equals((units["MARS"] == 2).astype(int))
    n_persons = data.persons.groupby("household_id").size()
    assert data.households.set_index("household_id")["n_persons"].equals(n_persons)


def test_dependent_ages_follow_the_cps_counts(built):
    _, _, data = built
    dependents = data.persons[data.persons["role"] == "dependent"]
    assert dependents["age"].between(0, 84).all()
    under_18 = dependents[dependents["age"] < 18].groupby("tax_unit_id").size()
    nu18 = data.tax_units.set_index("tax_unit_id")["nu18"]
    assert (under_18 <= nu18.reindex(under_18.index)).all()


def test_districts_in_state_and_counties_in_district(built):
    _, _, data = built
    state_of_district = {code: int(state) for code, state, _ in districts()}
    shares = district_county_shares()
    households = data.households
    assert (households["district"].map(state_of_district) == households["state_fips"]).all()
    abbrev = households["state_fips"].map(lambda fips: STATE_ABBREV_BY_FIPS[f"{fips:02d}"])
    assert (households["state"] == abbrev).all()
    for district, county in zip(households["district"], households["county"]):
        assert county in {name for name, _ in shares[district]}


def test_household_aggregates(built):
    _, _, data = built
    by_household = data.tax_units.groupby("household_id")
    households = data.households.set_index("household_id")
    np.testing.assert_allclose(households["snap"], by_household["snap_ben"].sum())
    np.testing.assert_allclose(
        households["adjusted_gross_income"], by_household["adjusted_gross_income"].sum()
    )


def test_qrf_imputations_are_plausible(built):
    _, result, data = built
    weight = data.households["weight"].to_numpy()[data.tax_units["household_id"].to_numpy()]
    for variable in QRF_IMPUTED:
        imputed, reported = data.tax_units[variable], data.tax_units[f"{variable}_reported"]
        assert (imputed >= 0).all()
        imputed_mean = np.average(imputed, weights=weight)
        reported_mean = np.average(reported, weights=weight)
        assert reported_mean / 3 <= imputed_mean <= reported_mean * 3
        assert result.figures[f"{variable}_imputed_mean"] == pytest.approx(imputed_mean)
        assert result.figures[f"{variable}_reported_mean"] == pytest.approx(reported_mean)


@pytest.mark.parametrize(
    "earned, agi, joint, children, investment, age, expected",
    [
        (15_000, 15_000, False, 2, 0, 30, 6_000.0),  # phase-in: 40 % of 15,000
        (15_000, 60_000, False, 2, 0, 30, 0.0),  # phased out on AGI
        (20_000, 20_000, False, 3, 0, 30, 6_935.0),  # plateau at the maximum
        (30_000, 30_000, False, 1, 0, 30, 3_733 - 0.1598 * (30_000 - 20_130)),
        (30_000, 30_000, True, 1, 0, 30, 3_733 - 0.1598 * (30_000 - 26_260)),  # joint start +6,130
        (8_000, 8_000, False, 0, 0, 30, 560.0),  # childless maximum
        (8_000, 8_000, False, 0, 0, 22, 0.0),  # childless under 25
        (8_000, 8_000, False, 0, 0, 70, 0.0),  # childless over 64
        (15_000, 15_000, False, 2, 10_301, 30, 0.0),  # too much investment income
        (5_000, 25_000, False, 2, 0, 30, 2_000 - 0.2106 * (25_000 - 20_130)),  # AGI above earnings
    ],
)
def test_eitc_cases(earned, agi, joint, children, investment, age, expected):
    credit = earned_income_tax_credit(
        np.array([earned]), np.array([agi]), np.array([joint]), np.array([children]),
        np.array([investment]), np.array([age]),
    )
    assert credit[0] == pytest.approx(max(expected, 0.0))


def test_eitc_is_vectorised_and_caps_children_at_three():
    credit = earned_income_tax_credit(
        np.full(3, 20_000), np.full(3, 20_000), np.zeros(3, bool), np.array([3, 4, 7]),
        np.zeros(3), np.full(3, 40),
    )
    np.testing.assert_allclose(credit, 6_935.0)


def test_allocation_gives_minimum_then_proportional_shares():
    weights = pd.Series([1.0, 1.0, 8.0], index=[1, 2, 3])
    allocation = allocate_sample(weights, total=16, minimum=2)
    assert allocation.tolist() == [3, 3, 10]
    with pytest.raises(ValueError):
        allocate_sample(weights, total=5, minimum=2)


def test_money_is_uprated_from_each_survey_year_to_the_period_by_the_cpi_u(built):
    """A unit's amounts are the CPS file's times CPI-U(period) / CPI-U(FLPDYR): its wages, and the
    head's and spouse's shares of them, which add up to the unit's."""
    _, result, data = built
    index = cpi_u()
    units = data.tax_units
    assert result.figures["period"] == data.period == TINY.period
    assert set(units["FLPDYR"]) <= {2012, 2013, 2014}
    assert np.allclose(units["uprating_factor"], index[data.period] / units["FLPDYR"].map(index))
    source = pd.read_csv(raw_input("cps_taxunits.csv.gz"), usecols=["FLPDYR", "h_seq", "RECID", "e00200", "e00200p"])
    merged = units.merge(source, on=["FLPDYR", "RECID"], suffixes=("", "_cps")).drop_duplicates("tax_unit_id")
    assert len(merged) > 0
    assert np.allclose(merged["e00200"], merged["e00200_cps"] * merged["uprating_factor"])
    persons = data.persons.merge(units[["tax_unit_id", "e00200", "e00200p"]], on="tax_unit_id")
    by_unit = persons.groupby("tax_unit_id")
    assert np.allclose(by_unit["employment_income_before_lsr"].sum(), by_unit["e00200"].first())
    heads = persons[persons["role"] == "head"]
    assert np.allclose(heads["employment_income_before_lsr"], heads["e00200p"])
    assert (persons.loc[persons["role"] == "dependent", "employment_income_before_lsr"] == 0).all()
    assert {"e00200p", "e01500", "e00650", "e00400", "e19200"} <= set(MONEY_COLUMNS)


def test_the_persons_carry_every_person_input_of_the_mapping_table(built):
    _, _, data = built
    assert {spec.variable for spec in INPUTS_BY_ENTITY["person"]} <= set(data.persons)
    assert set(data.tax_units["filing_status"]) <= {"SINGLE", "JOINT", "SEPARATE", "HEAD_OF_HOUSEHOLD"}
    qualified = data.persons["qualified_dividend_income"] + data.persons["non_qualified_dividend_income"]
    assert np.allclose(qualified.groupby(data.persons["tax_unit_id"]).sum(), data.tax_units.set_index("tax_unit_id")["e00600"])


def test_a_period_the_price_index_does_not_cover_is_refused_at_configuration():
    assert (min(cpi_u()), max(cpi_u())) == CPI_YEARS and len(cpi_u()) == CPI_YEARS[1] - CPI_YEARS[0] + 1
    with pytest.raises(ValueError, match=f"period 2031: expected a year the CPI-U table {CPI_FILE} covers \\(2010-2024\\)"):
        DatasetConfig(period=2031)
    with pytest.raises(PeriodNotCovered):
        from pipeline_assets.steps.uprating import uprating_factors
        uprating_factors(np.array([2009]), 2024)
