"""Backfill with Dagster's own CLI: a stage and two districts of a completed run. The stage keeps
what the run made (same record, same hashes); the districts are verified to come out identical (a
completed run is append-only); both get fresh metadata and their checks for the run_id partition,
and the run's provenance records the rebuild in a new TRO revision beside the old one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance

from pipeline_assets.launch import instance_settings, launch_release
from pipeline_assets.reuse import StepRecord
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import TRO_NAME, tro_revisions, verify_run
from resources.files import sha256_file
from resources.git import CodeState
from resources.run_store import LocalRunStore
from tests.conftest import PINNED_SHA

ROOT = Path(__file__).resolve().parents[1]
DISTRICTS = [AssetKey(["districts", "AL_01"]), AssetKey(["districts", "AL_02"])]
STAGE = AssetKey("calibration_package")


def latest(instance, key, run_id):
    return instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[run_id]), limit=1).records[0]


def latest_timestamp(instance, key, run_id):
    return latest(instance, key, run_id).timestamp


def check_evaluations(instance) -> dict[tuple[str, str], tuple[str | None, bool]]:
    """(asset, check) -> (partition, passed) of every check the latest Dagster run evaluated."""
    (run,) = instance.get_runs(limit=1)
    evaluations = [record.dagster_event.event_specific_data
                   for record in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)]
    return {(e.asset_key.to_user_string(), e.check_name): (e.partition, e.passed) for e in evaluations}


def test_dagster_cli_rebuilds_a_stage_and_two_districts_of_a_completed_run(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_bytes(instance_settings())  # as usdata-pipeline makes a new home
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    store = LocalRunStore(tmp_path / "store")
    with DagsterInstance.get() as instance:
        outcome = launch_release(store, instance, config_for_scale("tiny"), CodeState(PINNED_SHA, "main", False, None),
                                 running_sha=PINNED_SHA)
        assert outcome.success, outcome.meta.error
        run_id = outcome.meta.run_id
        before = {key: latest_timestamp(instance, key, run_id) for key in [STAGE, *DISTRICTS]}
        stage_before = latest(instance, STAGE, run_id).asset_materialization.metadata
    first_tro = store.path(store.run_key(run_id, TRO_NAME)).read_bytes()
    stage_record = store.read_bytes(store.run_key(run_id, "steps/calibration_package.json"))
    files = [store.path(store.run_key(run_id, f"h5s/districts/{code}.h5")) for code in ("AL-01", "AL-02")]
    hashes, inodes = [sha256_file(f) for f in files], [os.stat(f).st_ino for f in files]

    env = {**os.environ, "DAGSTER_HOME": str(home), "PIPELINE_STORE": str(store.root), "PIPELINE_CODE_SHA": PINNED_SHA}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/dagster"), "asset", "materialize", "-m", "pipeline_assets",
         "--select", ",".join(key.to_user_string() for key in [STAGE, *DISTRICTS]), "--partition", run_id],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with DagsterInstance.get() as instance:
        for key in [STAGE, *DISTRICTS]:
            assert latest_timestamp(instance, key, run_id) > before[key]  # fresh metadata
        stage_after = latest(instance, STAGE, run_id).asset_materialization.metadata
        for name in ("sha256", "reuse", "step_config_hash", "git_sha", "lib/numpy"):
            assert stage_after[name] == stage_before[name], name  # the run's own output, kept
        assert check_evaluations(instance) == {("calibration_package", "sha256_verified"): (run_id, True)}
        untouched = AssetKey(["districts", "AL_03"])
        assert instance.fetch_materializations(AssetRecordsFilter(asset_key=untouched, asset_partitions=[run_id]), limit=5).records.__len__() == 1
    assert [sha256_file(f) for f in files] == hashes and [os.stat(f).st_ino for f in files] == inodes
    assert store.read_bytes(store.run_key(run_id, "steps/calibration_package.json")) == stage_record
    assert store.read_meta(run_id).status.value == "completed"
    record = StepRecord.model_validate_json(store.read_bytes(store.run_key(run_id, "steps/local_areas.rebuild-1.json")))
    assert record.reuse == "rebuilt" and sorted(record.outputs) == ["h5s/districts/AL-01.h5", "h5s/districts/AL-02.h5"]
    revisions = tro_revisions(store, run_id)
    assert [p.name for p in revisions] == [TRO_NAME, "trace.tro.v2.jsonld"]
    assert revisions[0].read_bytes() == first_tro  # never a silent replacement
    assert "rebuilt" in revisions[1].read_text()
    assert verify_run(store, run_id).ok
