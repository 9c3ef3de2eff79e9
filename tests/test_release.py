"""A whole tiny release through the bare driver: the calibration package, the fits and the 489 files."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline_assets import stages, step_graph
from pipeline_assets.driver import run_release
from pipeline_assets.identity import VersionSkewError
from pipeline_assets.steps import geography
from pipeline_assets.steps.calibration import household_feature, load_calibration_package
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.steps.datasets import load_dataset
from pipeline_assets.steps.local_areas import MemberRows
from pipeline_assets.steps.policyengine import INPUTS, layout_problems, read_variable
from pipeline_assets.steps.uprating import cpi_u
from resources.compute import CoreShare, LocalPool, usable_cores
from resources.files import sha256_file
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus, RunStoreError

STATE_POPULATION_TOLERANCE = 0.35  # tiny scale: 2,000 households spread over 488 areas


def test_run_completes_with_every_step_timed(tiny_release):
    store, meta, _ = tiny_release
    assert meta.status is RunStatus.completed
    assert list(meta.step_timings) == list(step_graph.STEP_ORDER)
    assert all(t.status == "succeeded" and t.duration_s >= 0 for t in meta.step_timings.values())
    assert store.read_meta(meta.run_id).status is RunStatus.completed


def test_matrix_shape_and_unweighted_sums(tiny_release):
    store, meta, results = tiny_release
    package = load_calibration_package(stages.artifact(store, meta.run_id, "calibration_package"))
    data = load_dataset(stages.artifact(store, meta.run_id, "source_datasets"))
    config = config_for_scale("tiny")
    n_columns = len(data.households) * config.calibration.clones
    assert package.matrix.shape == (results["policy_data_db"].figures["targets"], n_columns)
    assert package.columns["district"].nunique() == 436  # every district has records

    # X @ 1 is, per target, the unweighted sum over the clones inside the target's geography.
    sums = package.matrix @ np.ones(n_columns)
    rng = np.random.default_rng(0)
    for row in rng.choice(len(package.targets), size=40, replace=False):
        target = package.targets.iloc[row]
        dollars = cpi_u()[int(target["period"])] / cpi_u()[data.period]
        feature = household_feature(data, target["variable"], target["stratum"], dollars)
        columns = package.columns
        inside = {
            "national": np.ones(len(columns), dtype=bool),
            "state": (columns["state"] == target["geo_id"]).to_numpy(),
            "district": (columns["district"] == target["geo_id"]).to_numpy(),
        }[target["level"]]
        expected = feature[columns["household_index"].to_numpy()[inside]].sum()
        assert sums[row] == pytest.approx(expected), target["name"]


@pytest.mark.parametrize("step", ["state_weights", "national_weights"])
def test_fit_halves_the_mean_relative_error(tiny_release, step):
    figures = tiny_release[2][step].figures
    assert figures["final_mean_rel_abs_error"] <= 0.5 * figures["initial_mean_rel_abs_error"]


@pytest.mark.parametrize("step", ["state_weights", "national_weights"])
def test_the_drivers_fits_run_one_at_a_time_on_every_core(tiny_release, step):
    assert tiny_release[2][step].figures["threads"] == usable_cores()


def test_the_cores_are_divided_among_the_fits_running_at_the_moment(tmp_path):
    share = CoreShare(tmp_path / "fits", cores=4)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    with share.joined() as current:
        assert current() == 4
        (share.directory / str(os.getppid())).touch()  # another fit, running
        (share.directory / gone.stdout.strip()).touch()  # a fit killed before it could leave
        assert current() == 2
        assert not (share.directory / gone.stdout.strip()).exists()
        (share.directory / str(os.getppid())).unlink()  # the other fit ends: this one takes its cores
        assert current() == 4
    assert list(share.directory.iterdir()) == []
    share.directory.rmdir()  # removed under a running fit (a /tmp cleaner): it keeps all the cores
    assert share.share() == 4


def test_a_fit_follows_its_share_and_an_explicit_thread_count_wins(tmp_path):
    asked = []

    def fit_weights(*args, cores=None):
        asked.append((args[3].threads, cores))

    pool = LocalPool(cores=CoreShare(tmp_path / "fits", cores=4))
    fit = config_for_scale("tiny").local_fit
    pool.fit(fit_weights, tmp_path / "p.h5", tmp_path / "w.npy", tmp_path / "log.csv", fit)
    pool.fit(fit_weights, tmp_path / "p.h5", tmp_path / "w.npy", tmp_path / "log.csv", fit.model_copy(update={"threads": 3}))
    (threads, share), (explicit, none) = asked
    assert threads is None and share() == 4 and explicit == 3 and none is None


def test_calibration_log_columns(tiny_release):
    store, meta, _ = tiny_release
    log = pd.read_csv(store.path(store.run_key(meta.run_id, "diagnostics/calibration_log.csv")))
    for column in ["target", "estimate", "target_value", "error", "rel_error", "abs_error", "rel_abs_error", "epoch", "loss"]:
        assert column in log.columns
    assert set(log["epoch"]) == {0, config_for_scale("tiny").local_fit.epochs}
    assert np.allclose(log["error"], log["estimate"] - log["target_value"])


def test_exactly_488_areas_plus_national_with_the_right_names(tiny_release):
    store, meta, results = tiny_release
    h5_root = store.path(store.run_key(meta.run_id, stages.H5_ROOT))
    files = sorted(str(p.relative_to(h5_root)) for p in h5_root.rglob("*.h5"))
    assert len(files) == 489
    assert sum(f.startswith("states/") for f in files) == 51
    assert sum(f.startswith("districts/") for f in files) == 436
    assert [f for f in files if f.startswith(("cities/", "national/"))] == ["cities/NYC.h5", "national/US.h5"]
    for name in ["states/AL.h5", "states/DC.h5", "districts/AL-01.h5", "districts/DC-01.h5", "districts/AK-01.h5", "districts/CA-52.h5"]:
        assert name in files
    by_code = {r.area: r for r in results["local_areas"]}
    for result in results["local_areas"]:
        assert sha256_file(h5_root / result.relpath) == result.sha256
    with h5py.File(h5_root / "cities/NYC.h5") as h5:
        counties = set(read_variable(h5, "county_fips").astype(str))
        assert counties <= set(geography.NYC_COUNTIES) and counties
        assert (read_variable(h5, "household_weight") > 0).all()
    assert by_code["NYC"].households > 0


def test_each_state_population_is_near_its_target(tiny_release):
    store, meta, results = tiny_release
    package = load_calibration_package(stages.artifact(store, meta.run_id, "calibration_package"))
    targets = package.targets
    totals = targets[(targets["level"] == "state") & (targets["variable"] == "person_count") & (targets["stratum"] == "all")]
    target_by_state = dict(zip(totals["geo_id"], totals["value"]))
    states = [r for r in results["local_areas"] if r.kind == "state"]
    assert len(states) == 51
    errors = {r.area: abs(r.population / target_by_state[r.area] - 1) for r in states}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= STATE_POPULATION_TOLERANCE, (worst, errors[worst])


def test_area_file_holds_households_people_and_weights(tiny_release):
    store, meta, results = tiny_release
    result = next(r for r in results["local_areas"] if r.area == "AL")
    with h5py.File(store.path(store.run_key(meta.run_id, f"{stages.H5_ROOT}/states/AL.h5"))) as h5:
        weights = read_variable(h5, "household_weight")
        assert weights.dtype == np.float32
        assert len(weights) == result.households and weights.sum(dtype=float) == pytest.approx(result.weight_sum)
        households, persons = np.unique(read_variable(h5, "person_household_id"), return_counts=True)
        assert list(households) == list(read_variable(h5, "household_id"))  # in household order
        assert (persons * weights.astype(float)).sum() == pytest.approx(result.population, rel=1e-9)


def test_every_area_file_is_a_policyengine_dataset_of_the_release_period(tiny_release):
    """The layout the model reads, checked without the model on all 489 files: the variables of the
    mapping table and the ids, one array each for the period, ids unique, every link valid."""
    store, meta, results = tiny_release
    period = meta.config["dataset"]["period"]
    h5_root = store.path(store.run_key(meta.run_id, stages.H5_ROOT))
    problems = [p for r in results["local_areas"] for p in layout_problems(h5_root / r.relpath, period)]
    assert problems == []
    assert len(results["local_areas"]) == 489
    with h5py.File(h5_root / "states/CA.h5") as h5:
        assert {name: h5[name][str(period)].dtype.kind for name in ("filing_status", "tax_unit_role_input", "county_fips")} == \
            {"filing_status": "S", "tax_unit_role_input": "S", "county_fips": "S"}
        assert {i.variable for i in INPUTS} <= set(h5)


def test_each_area_file_places_its_households_where_their_clones_are(tiny_release):
    """The clone's own state, county and district (PolicyEngine's SSDD, at-large 01, DC 1101), not
    the sampled CPS household's state."""
    store, meta, results = tiny_release
    h5_root = store.path(store.run_key(meta.run_id, stages.H5_ROOT))
    package = load_calibration_package(stages.artifact(store, meta.run_id, "calibration_package")).columns
    fips = geography.county_fips()
    for relpath, state, geoid in (("states/CA.h5", 6, None), ("districts/DC-01.h5", 11, 1101),
                                  ("districts/AK-01.h5", 2, 201), ("districts/CA-52.h5", 6, 652)):
        with h5py.File(h5_root / relpath) as h5:
            households = read_variable(h5, "household_id")
            assert len(households) > 0, relpath
            assert set(read_variable(h5, "state_fips")) == {state}, relpath
            if geoid is not None:
                assert set(read_variable(h5, "congressional_district_geoid")) == {geoid}, relpath
            clones = package.iloc[households]
            assert list(read_variable(h5, "county_fips").astype(str)) == [fips[c] for c in clones["county"]], relpath


def test_each_clone_in_an_area_file_carries_its_source_households_members(tiny_release):
    """household_id is the clone's column of the calibration package, whose household_index is the
    sampled household; its persons and tax units are copied in order, numbered afresh in the file."""
    store, meta, _ = tiny_release
    data = load_dataset(stages.artifact(store, meta.run_id, "source_datasets"))
    package = load_calibration_package(stages.artifact(store, meta.run_id, "calibration_package")).columns
    with h5py.File(store.path(store.run_key(meta.run_id, f"{stages.H5_ROOT}/states/CA.h5"))) as h5:
        clones = read_variable(h5, "household_id")
        sources = package["household_index"].to_numpy()[clones]
        persons = [data.persons[data.persons["household_id"] == source] for source in sources]
        units = [data.tax_units[data.tax_units["household_id"] == source] for source in sources]
        assert list(read_variable(h5, "age")) == [a for part in persons for a in part["age"]]
        assert list(read_variable(h5, "person_household_id")) == [c for c, part in zip(clones, persons) for _ in range(len(part))]
        assert list(read_variable(h5, "filing_status").astype(str)) == [f for part in units for f in part["filing_status"]]
        assert np.allclose(read_variable(h5, "employment_income_before_lsr"),
                           np.concatenate([part["employment_income_before_lsr"] for part in persons]), rtol=1e-6)
        # Each person's tax unit is their clone's own copy of it.
        unit_of_person = read_variable(h5, "person_tax_unit_id")
        source_unit = np.concatenate([part["tax_unit_id"] for part in units])[unit_of_person]
        assert list(source_unit) == [u for part in persons for u in part["tax_unit_id"]]


def test_member_rows_follow_the_chosen_households_in_table_order():
    """Members listed out of household order, a household without members, a household chosen twice."""
    member_households = np.array([30, 10, 30, 20, 10, 30])
    where = MemberRows.index(member_households, household_ids=np.array([10, 20, 30, 40]))
    rows, counts = where.rows(np.array([2, 3, 0, 2]))
    assert list(rows) == [0, 2, 5, 1, 4, 0, 2, 5]
    assert list(counts) == [3, 0, 2, 3]
    empty_rows, empty_counts = where.rows(np.array([], dtype=int))
    assert len(empty_rows) == 0 and len(empty_counts) == 0
    with pytest.raises(ValueError, match="household_id 99: expected a household_id of the households table"):
        MemberRows.index(np.array([10, 99]), household_ids=np.array([10, 20]))


def test_diagnostics_validate_every_area_with_targets(tiny_release):
    store, meta, _ = tiny_release
    validation = pd.read_csv(store.path(store.run_key(meta.run_id, "diagnostics/validation.csv")))
    assert validation["area"].nunique() == 1 + 51 + 436
    assert store.exists(store.run_key(meta.run_id, "diagnostics/run_config.json"))


def test_completed_run_refuses_to_rebuild_an_area(tiny_release):
    store, meta, _ = tiny_release
    with pytest.raises(RunStoreError, match="append-only"):
        stages.run_local_areas(store, meta.run_id, pool=None, area_codes={"AL"})


def test_skewed_code_is_refused_and_the_run_marked_failed(tmp_path):
    store = LocalRunStore(tmp_path)
    code = CodeState(sha="1" * 40, branch="main", dirty=False, diff_sha256=None)
    with pytest.raises(VersionSkewError, match="1111111111111111111111111111111111111111"):
        run_release(store, config_for_scale("tiny"), code, running_sha="2" * 40)
    # Nothing ran: the guard stops the first step before it starts.
    (meta,) = store.list_runs()
    assert meta.status is RunStatus.running and meta.step_timings == {}
