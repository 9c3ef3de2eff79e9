"""Step reuse: a fit-settings-only change reuses the database, the datasets and the package, and the
area files of the fit it did not change."""

from __future__ import annotations

import json
import os

import pytest

from pipeline_assets import stages
from pipeline_assets.driver import run_release, start_run
from pipeline_assets.reuse import link_outputs, read_record
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import TRO_NAME, tro_revisions, write_tro
from resources.git import CodeState
from resources.run_store import RunStoreError
from tests.conftest import PINNED_SHA, copy_store

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
UPSTREAM = ("policy_data_db", "source_datasets", "calibration_package")


@pytest.fixture(scope="module")
def three_runs(tiny_release, tmp_path_factory):
    """The session's tiny run (copied) as the first, then a local refit and a run with reuse off."""
    source, meta, _ = tiny_release
    store = copy_store(source, tmp_path_factory.mktemp("reuse_store"))
    first = store.read_meta(meta.run_id)
    refit, _ = run_release(store, config_for_scale("tiny", local_fit={"epochs": 40}), CODE, running_sha=PINNED_SHA)
    forced, _ = run_release(store, config_for_scale("tiny", reuse=False), CODE, running_sha=PINNED_SHA)
    return store, first, refit, forced


@pytest.fixture(scope="module")
def national_refit(three_runs):
    """A fourth run that changes only the national fit's settings."""
    store, first, _, _ = three_runs
    meta, _ = run_release(store, config_for_scale("tiny", national_fit={"epochs": 40}), CODE, running_sha=PINNED_SHA)
    return meta


def area_inode(store, run_id, relpath):
    return os.stat(store.path(store.run_key(run_id, f"{stages.H5_ROOT}/{relpath}"))).st_ino


LOCAL_AREAS = ["states/AL.h5", "districts/AL-01.h5", "cities/NYC.h5"]


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
    # The area files: the local ones read the new state weights and are built again; the national
    # file reads the unchanged national weights and is the first run's, linked.
    areas = read_record(store, refit.run_id, "local_areas")
    assert areas.reused_parts == {"national": first.run_id}
    assert area_inode(store, refit.run_id, "national/US.h5") == area_inode(store, first.run_id, "national/US.h5")
    for relpath in LOCAL_AREAS:
        assert area_inode(store, refit.run_id, relpath) != area_inode(store, first.run_id, relpath)
    assert len(areas.outputs) == len(areas.output_figures) == 489
    tro = json.loads(store.read_bytes(store.run_key(refit.run_id, TRO_NAME)))
    (performance,) = [node for node in tro["@graph"][0]["trov:hasPerformance"] if node["pe:step"] == "local_areas"]
    assert json.loads(performance["pe:reusedParts"]) == {"national": first.run_id}


def test_national_fit_only_change_reuses_the_488_local_area_files(three_runs, national_refit):
    store, first, _, forced = three_runs
    timings = national_refit.step_timings
    assert (timings["state_weights"].reuse, timings["national_weights"].reuse) == ("reused", "computed")
    assert timings["local_areas"].reuse == "computed"  # the national file is built; nothing else
    record, original = read_record(store, national_refit.run_id, "local_areas"), read_record(store, forced.run_id, "local_areas")
    assert record.reused_parts == {"local": forced.run_id}  # the newest run with the same local part
    national = f"{stages.H5_ROOT}/national/US.h5"
    assert {rel: h for rel, h in record.outputs.items() if rel != national} == {
        rel: h for rel, h in original.outputs.items() if rel != national}
    assert record.output_figures == original.output_figures | {national: record.output_figures[national]}
    for relpath in LOCAL_AREAS:
        assert area_inode(store, national_refit.run_id, relpath) == area_inode(store, forced.run_id, relpath)
    assert area_inode(store, national_refit.run_id, "national/US.h5") != area_inode(store, forced.run_id, "national/US.h5")


def test_first_run_computes_everything(three_runs):
    _, first, _, _ = three_runs
    assert {t.reuse for t in first.step_timings.values()} == {"computed"}
    assert all(t.env_id for t in first.step_timings.values())


def test_no_reuse_forces_computation(three_runs):
    store, first, _, forced = three_runs
    assert {t.reuse for t in forced.step_timings.values()} == {"computed"}
    assert read_record(store, forced.run_id, "local_areas").reused_parts == {}
    # Same code, environment, config and seeds: the recomputed bytes equal the first run's.
    for step in UPSTREAM + ("state_weights",):
        assert read_record(store, forced.run_id, step).outputs == read_record(store, first.run_id, step).outputs, step


def test_run_records_carry_env_id_and_config_hash(three_runs):
    _, first, refit, forced = three_runs
    assert first.env_id and first.env_id == refit.env_id
    assert first.config_hash != refit.config_hash
    assert first.config_hash == forced.config_hash  # the reuse switch is not configuration


def test_tampered_output_is_not_reused(tiny_copy):
    store, first = tiny_copy
    config = config_for_scale("tiny")
    path = stages.artifact(store, first.run_id, "policy_data_db")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    second, _ = run_release(store, config, CODE, running_sha=PINNED_SHA)
    assert second.step_timings["policy_data_db"].reuse == "computed"
    assert second.step_timings["source_datasets"].reuse == "reused"
    # The rebuilt database has the original bytes, so every later step, the areas too, is the first run's.
    assert (second.step_timings["local_areas"].reuse, second.step_timings["local_areas"].reused_from) == ("reused", first.run_id)


def test_a_tampered_area_file_is_built_again(tiny_copy):
    store, first = tiny_copy
    config = config_for_scale("tiny")
    path = store.path(store.run_key(first.run_id, f"{stages.H5_ROOT}/districts/AL-01.h5"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    second, _ = run_release(store, config, CODE, running_sha=PINNED_SHA)
    record = read_record(store, second.run_id, "local_areas")
    assert record.reused_parts == {"national": first.run_id}  # the local part no longer verifies
    assert record.outputs == read_record(store, first.run_id, "local_areas").outputs  # built again: the original bytes


def test_linking_keeps_a_file_the_run_already_has_with_the_same_bytes(three_runs, tmp_path):
    """A resumed run may hold some area files already: the same bytes stay, other bytes are refused."""
    store, first, _, _ = three_runs
    target = start_run(store, config_for_scale("tiny"), CODE)
    rel = f"{stages.H5_ROOT}/districts/AL-01.h5"
    record = read_record(store, first.run_id, "local_areas")
    same = store.output_path(target.run_id, rel)
    same.parent.mkdir(parents=True, exist_ok=True)
    same.write_bytes(store.path(store.run_key(first.run_id, rel)).read_bytes())
    link_outputs(store, first.run_id, target.run_id, {rel: record.outputs[rel]})
    assert same.read_bytes() == store.path(store.run_key(first.run_id, rel)).read_bytes()
    same.write_bytes(b"other")
    with pytest.raises(RunStoreError, match="already has other bytes"):
        link_outputs(store, first.run_id, target.run_id, {rel: record.outputs[rel]})


def test_status_says_what_each_step_reused(three_runs, monkeypatch, capsys):
    from pipeline_assets.cli import main
    from resources.run_store import STORE_VARIABLE

    store, first, refit, _ = three_runs
    monkeypatch.setenv(STORE_VARIABLE, str(store.root))
    assert main(["status", refit.run_id]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["policy_data_db"].endswith(f"reused from {first.run_id}")
    assert rows["state_weights"].endswith("computed")
    assert rows["local_areas"].endswith(f"computed (national part from {first.run_id})")


def test_a_part_is_reused_only_from_a_record_holding_all_its_files(tiny_copy):
    """A record left by a rebuild of some areas may hold part of the local files: not reusable."""
    store, first = tiny_copy
    config = config_for_scale("tiny")
    record = read_record(store, first.run_id, "local_areas")
    dropped = f"{stages.H5_ROOT}/districts/AL-01.h5"
    del record.outputs[dropped]
    store.path(store.run_key(first.run_id, "steps/local_areas.json")).write_text(record.model_dump_json())
    for revision in tro_revisions(store, first.run_id):  # sealed with that record: only sealed runs lend files
        revision.unlink()
    write_tro(store, first.run_id)
    second, _ = run_release(store, config, CODE, running_sha=PINNED_SHA)
    rebuilt = read_record(store, second.run_id, "local_areas")
    assert rebuilt.reused_parts == {"national": first.run_id}
    assert dropped in rebuilt.outputs and len(rebuilt.outputs) == 489
