"""Step reuse: a fit-settings-only change reuses the database, the datasets and the package."""

from __future__ import annotations

import os

import pytest

from pipeline_assets import stages
from pipeline_assets.driver import run_release
from pipeline_assets.reuse import read_record
from pipeline_assets.steps.config import config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore
from tests.conftest import PINNED_SHA

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
UPSTREAM = ("policy_data_db", "source_datasets", "calibration_package")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    store = LocalRunStore(tmp_path_factory.mktemp("reuse_store"))
    first, _ = run_release(store, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA)
    refit, _ = run_release(store, config_for_scale("tiny", local_fit={"epochs": 40}), CODE, running_sha=PINNED_SHA)
    forced, _ = run_release(store, config_for_scale("tiny", reuse=False), CODE, running_sha=PINNED_SHA)
    return store, first, refit, forced


def inode(store, run_id, name):
    return os.stat(stages.artifact(store, run_id, name)).st_ino


def test_fit_only_change_reuses_upstream_steps(three_runs):
    store, first, refit, _ = three_runs
    for step in UPSTREAM:
        timing = refit.step_timings[step]
        assert (timing.reuse, timing.reused_from) == ("reused", first.run_id), step
        record = read_record(store, refit.run_id, step)
        assert record.reuse == "reused" and record.outputs == read_record(store, first.run_id, step).outputs
        assert inode(store, refit.run_id, step) == inode(store, first.run_id, step)  # the same file, linked
    assert refit.step_timings["state_weights"].reuse == "computed"
    assert refit.step_timings["national_weights"].reuse == "reused"  # national settings did not change
    assert inode(store, refit.run_id, "state_weights") != inode(store, first.run_id, "state_weights")
    assert refit.step_timings["local_areas"].reuse == "computed"


def test_first_run_computes_everything(three_runs):
    _, first, _, _ = three_runs
    assert {t.reuse for t in first.step_timings.values()} == {"computed"}
    assert all(t.env_id for t in first.step_timings.values())


def test_no_reuse_forces_computation(three_runs):
    store, first, _, forced = three_runs
    assert {t.reuse for t in forced.step_timings.values()} == {"computed"}
    # Same code, environment, config and seeds: the recomputed bytes equal the first run's.
    for step in UPSTREAM + ("state_weights",):
        assert read_record(store, forced.run_id, step).outputs == read_record(store, first.run_id, step).outputs, step


def test_run_records_carry_env_id_and_config_hash(three_runs):
    _, first, refit, forced = three_runs
    assert first.env_id and first.env_id == refit.env_id
    assert first.config_hash != refit.config_hash
    assert first.config_hash == forced.config_hash  # the reuse switch is not configuration


def test_tampered_output_is_not_reused(tmp_path):
    store = LocalRunStore(tmp_path)
    config = config_for_scale("tiny")
    first, _ = run_release(store, config, CODE, running_sha=PINNED_SHA)
    path = stages.artifact(store, first.run_id, "policy_data_db")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    second, _ = run_release(store, config, CODE, running_sha=PINNED_SHA)
    assert second.step_timings["policy_data_db"].reuse == "computed"
    assert second.step_timings["source_datasets"].reuse == "reused"
