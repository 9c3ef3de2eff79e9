"""The release job end to end on a Dagster instance: metadata, checks, meta.json, blocking quality."""

from __future__ import annotations

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, instance_for_test
from dagster._core.events import DagsterEventType

from pipeline_assets import defs
from pipeline_assets.driver import start_run
from pipeline_assets.launch import job_run_config, launch_release
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.steps.config import config_for_scale
from resources.compute import usable_cores
from resources.files import sha256_file
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus
from tests.conftest import PINNED_SHA, shipped_settings

ENV_FIELDS = ["python_version", "library_versions", "os", "kernel", "architecture", "cpu_model", "cpu_count",
              "cloud_region", "compute_pool", "hostname", "container_image_digest", "container_image_reason"]
CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)


def latest(instance: DagsterInstance, key: AssetKey, run_id: str):
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[run_id]), limit=1).records
    return records[0].asset_materialization.metadata if records else None


def test_release_job_end_to_end(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    with instance_for_test(temp_dir=str(tmp_path), overrides=shipped_settings(tmp_path)) as instance:
        outcome = launch_release(store, instance, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA)
        assert outcome.success and outcome.failed_checks == []
        run_id = outcome.meta.run_id
        assert outcome.meta.status is RunStatus.completed
        assert store.read_meta(run_id).status is RunStatus.completed
        assert run_id in instance.get_dynamic_partitions(RUN_IDS)

        keys = defs.resolve_job_def("release").asset_layer.selected_asset_keys
        staged = latest(instance, AssetKey("staged_release"), run_id)
        assert staged["files"].value == 489 + 8  # areas, national, 4 artifacts, 3 diagnostics, the TRO
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

        evaluations = [
            e.dagster_event.asset_check_evaluation_data
            for e in instance.all_logs(outcome.dagster_run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
        names = {(ev.asset_key.to_user_string(), ev.check_name) for ev in evaluations}
        assert ("national_h5", "all_areas_present") in names and ("state_weights", "calibration_quality") in names
        assert ("state_weights", "calibration_error_vs_class_history") in names  # no history yet: passes
        assert len(names) == 12 and all(ev.passed for ev in evaluations)

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
    with instance_for_test(temp_dir=str(tmp_path), overrides=shipped_settings(tmp_path)) as instance:
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
