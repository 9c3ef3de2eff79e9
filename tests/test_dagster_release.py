"""The release job end to end on a Dagster instance: metadata, checks, lineage events, meta.json, blocking quality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance, RunsFilter, instance_for_test

from pipeline_assets import defs
from pipeline_assets.driver import start_run
from pipeline_assets.identity_contract import config_hash
from pipeline_assets.jobs import job_run_config
from pipeline_assets.launch import launch_release
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.run_events import step_failure_error
from pipeline_assets.run_start import START_TAGS, run_tags
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.steps.model_validation import ModelValidationRecord
from pipeline_assets.tro import tro_revisions
from resources.compute import usable_cores
from resources.files import sha256_file
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus
from tests.conftest import PINNED_SHA, shipped_settings
from tests.test_lineage import assert_every_step_reported

ENV_FIELDS = ["python_version", "library_versions", "os", "kernel", "architecture", "cpu_model", "cpu_count",
              "cloud_region", "compute_pool", "hostname", "container_image_digest", "container_image_reason"]
CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
MODEL_SAMPLE = {"AL": ["states", "AL"], "AL-01": ["districts", "AL_01"], "NYC": ["cities", "NYC"]}


def latest(instance: DagsterInstance, key: AssetKey, run_id: str):
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[run_id]), limit=1).records
    return records[0].asset_materialization.metadata if records else None


def test_release_job_end_to_end(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    with instance_for_test(temp_dir=str(tmp_path), overrides=shipped_settings()) as instance:
        # With the model's check on its default sample: the real model, in its own environment, in the job.
        config = config_for_scale("tiny", model_validation={"areas": list(MODEL_SAMPLE)})
        outcome = launch_release(store, instance, config, CODE, running_sha=PINNED_SHA, lineage={"transport": "file"})
        assert outcome.success and outcome.failed_checks == []
        run_id = outcome.meta.run_id
        assert outcome.meta.status is RunStatus.completed
        assert store.read_meta(run_id).status is RunStatus.completed
        assert run_id in instance.get_dynamic_partitions(RUN_IDS)
        # Launched through the instance: the code location's run of the release job, with the run's tags.
        dagster_run = instance.get_run_by_id(outcome.dagster_run_id)
        assert dagster_run.remote_job_origin is not None and dagster_run.job_name == "release"
        assert {name: dagster_run.tags[name] for name in START_TAGS} == run_tags(outcome.meta)
        assert dagster_run.tags["usdata/job"] == "release" and dagster_run.tags["scale"] == "tiny"
        assert [r.run_id for r in instance.get_runs(RunsFilter(job_name="release"))] == [outcome.dagster_run_id]

        keys = defs.resolve_job_def("release").asset_layer.selected_asset_keys
        staged = latest(instance, AssetKey("staged_release"), run_id)
        assert staged["files"].value == 489 + 10  # areas, national, 4 artifacts, 3 diagnostics, the model's 2, the TRO
        assert latest(instance, AssetKey("promotion"), run_id) is None  # promotion is never automatic
        for key in keys - {AssetKey("staged_release")}:
            metadata = latest(instance, key, run_id)
            assert metadata is not None, key
            assert metadata["run_id"].value == run_id and metadata["git_sha"].value == PINNED_SHA
            assert sha256_file(metadata["path"].value) == metadata["sha256"].value
            assert isinstance(metadata["size_bytes"].value, int)
            env = metadata["runtime_environment"].value
            assert all(field in env for field in ENV_FIELDS), key
            assert env["library_versions"]["dagster"] and env["library_versions"]["l0-python"]

        fit = latest(instance, AssetKey("state_weights"), run_id)
        for figure in ("initial_mean_rel_abs_error", "final_mean_rel_abs_error", "final_loss"):
            assert isinstance(fit[figure].value, float)
        assert isinstance(fit["targets"].value, int)
        assert 1 <= fit["threads"].value <= usable_cores()  # the two fits run at once: a share, then all
        area = latest(instance, AssetKey(["districts", "AL_01"]), run_id)
        assert area["households"].value > 0 and isinstance(area["weight_sum"].value, float)
        model = latest(instance, AssetKey("model_validation"), run_id)
        assert model["areas_checked"].value == 3
        for code, key in MODEL_SAMPLE.items():  # the model counts the persons and households the release weighted
            ours = latest(instance, AssetKey(key), run_id)
            assert model[f"{code}_persons"].value == pytest.approx(ours["population"].value, rel=1e-5), code
            assert model[f"{code}_households"].value == pytest.approx(ours["weight_sum"].value, rel=1e-5), code
            for measure in ("income_tax", "eitc", "snap"):
                value = model[f"{code}_{measure}"].value
                assert math.isfinite(value) and value > 0, (code, measure, value)
        # In its pinned environment, the sample dealt to the compute resource's two local runners.
        checked = ModelValidationRecord.model_validate_json(Path(model["path"].value).read_text())
        assert checked.environment.libraries["policyengine-us"] == "2.68.0" and checked.failures == []
        assert len(checked.environment.ran_on) == 2 and all(ran.startswith("local pid ") for ran in checked.environment.ran_on)
        # The run's TRO names the model on the step that ran it, and on no other.
        tro = json.loads(tro_revisions(store, run_id)[-1].read_text())["@graph"][0]
        named = {p["pe:step"]: p.get("pe:builtWithModelVersion") for p in tro["trov:hasPerformance"]}
        assert named.pop("model_validation") == "2.68.0" and set(named.values()) == {None}

        evaluations = [
            e.dagster_event.asset_check_evaluation_data
            for e in instance.all_logs(outcome.dagster_run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
        names = {(ev.asset_key.to_user_string(), ev.check_name) for ev in evaluations}
        assert ("national_h5", "all_areas_present") in names and ("state_weights", "calibration_quality") in names
        assert ("state_weights", "calibration_error_vs_class_history") in names  # no history yet: passes
        assert len(names) == 14 and all(ev.passed for ev in evaluations)
        areas = next(ev for ev in evaluations if ev.check_name == "all_areas_present")
        assert areas.metadata["files_verified"].value == 489
        assert_every_step_reported(store, run_id)  # OpenLineage events from the step processes

        # A second run that changes only the national fit: each area's metadata says where its file came from.
        second = launch_release(store, instance, config_for_scale("tiny", national_fit={"epochs": 40}), CODE,
                                running_sha=PINNED_SHA).meta
        assert second.status is RunStatus.completed
        reused = latest(instance, AssetKey(["districts", "AL_01"]), second.run_id)
        assert (reused["reuse"].value, reused["reused_from"].value) == ("reused", run_id)
        assert reused["sha256"].value == area["sha256"].value and reused["households"].value == area["households"].value
        national = latest(instance, AssetKey("national_h5"), second.run_id)
        assert national["reuse"].value == "computed" and "reused_from" not in national


def test_failing_calibration_check_stops_the_area_files(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    config = config_for_scale("tiny", quality={"max_mean_rel_abs_error": 1e-9})
    with instance_for_test(temp_dir=str(tmp_path), overrides=shipped_settings()) as instance:
        run_id = start_run(store, config, CODE).run_id
        instance.add_dynamic_partitions(RUN_IDS, [run_id])
        result = defs.resolve_job_def("release").execute_in_process(
            partition_key=run_id, instance=instance, raise_on_error=False, run_config=job_run_config(store, PINNED_SHA)
        )
        failed = [
            e.asset_check_evaluation_data.check_name
            for e in result.all_events
            if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION and not e.asset_check_evaluation_data.passed
        ]
        assert "calibration_quality" in failed
        assert latest(instance, AssetKey("state_weights"), run_id) is not None
        assert latest(instance, AssetKey(["states", "AL"]), run_id) is None
        assert latest(instance, AssetKey("national_h5"), run_id) is None
        assert not store.exists(store.run_key(run_id, "h5s"))


# --- the run-start guard -----------------------------------------------------------------------------
def execute_first_step(instance, store: LocalRunStore, partition_key: str, tags: dict | None = None):
    """The release job's first step alone, in process, for `partition_key`."""
    return defs.resolve_job_def("release").execute_in_process(
        partition_key=partition_key, instance=instance, raise_on_error=False, tags=tags,
        run_config=job_run_config(store, PINNED_SHA), op_selection=["policy_data_db"],
    )


def one_line_failure(result) -> str:
    error = step_failure_error(result.all_events)
    assert not result.success and error.step == "policy_data_db"
    assert "\n" not in error.message
    return error.message


@pytest.mark.parametrize("partition_key, expected", [
    ("1.0.0_bad", "malformed run_id '1.0.0_bad': expected {version}_{sha8}_{YYYYMMDD_HHMMSS}"),
    ("0.1.0_a1b2c3d4_20260101_000000", "run 0.1.0_a1b2c3d4_20260101_000000 has no meta.json in "),
])
def test_a_partition_without_a_run_fails_in_one_line_and_is_forgotten(tmp_path, partition_key, expected):
    """Nothing is written, and the partition is deleted unless another Dagster run used it."""
    store = LocalRunStore(tmp_path / "store")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(RUN_IDS, [partition_key])
        assert expected in one_line_failure(execute_first_step(instance, store, partition_key))
        assert not store.root.exists()
        assert not instance.has_dynamic_partition(RUN_IDS, partition_key)

        instance.add_dynamic_partitions(RUN_IDS, [partition_key])  # again: the first run has used it now
        assert expected in one_line_failure(execute_first_step(instance, store, partition_key))
        assert instance.has_dynamic_partition(RUN_IDS, partition_key)


def test_a_start_request_that_does_not_match_its_partition_is_refused(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    run_id = "0.1.0_a1b2c3d4_20260101_000000"
    request = {"run_id": run_id, "git_sha": "f" * 40, "branch": "main", "scale": "tiny",
               "config_hash": config_hash(config_for_scale("tiny"))}
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(RUN_IDS, [run_id])
        message = one_line_failure(execute_first_step(instance, store, run_id, request))
    assert f"start request git_sha {'f' * 40}" in message and "makes run_id 0.1.0_ffffffff_20260101_000000" in message
    assert not store.root.exists()


def test_a_run_launched_without_tags_gets_them_from_meta_json(tmp_path):
    """As from the UI's launchpad: a partition with a run record, no tags."""
    store = LocalRunStore(tmp_path / "store")
    meta = start_run(store, config_for_scale("tiny"), CODE)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(RUN_IDS, [meta.run_id])
        result = execute_first_step(instance, store, meta.run_id)
        assert result.success
        tags = instance.get_run_by_id(result.run_id).tags
    assert {name: tags[name] for name in START_TAGS} == run_tags(meta)


def test_a_run_queued_with_no_daemon_to_dequeue_it_fails_in_one_line(tmp_path):
    """instance_for_test's own settings queue runs (QueuedRunCoordinator) and no dagster-daemon runs here."""
    store = LocalRunStore(tmp_path / "store")
    with instance_for_test() as instance:
        outcome = launch_release(store, instance, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA)
        assert not outcome.success and instance.get_run_by_id(outcome.dagster_run_id).status.value == "FAILURE"
    meta = store.read_meta(outcome.meta.run_id)
    assert meta.status is RunStatus.failed and meta.error.step == "run" and "\n" not in meta.error.message
    assert f"the Dagster run {outcome.dagster_run_id} never started (queued, and no dagster-daemon" in meta.error.message
    assert meta.step_timings == {}
