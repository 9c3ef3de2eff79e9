"""Resume: a run that failed after the fit completes without recomputing what it already made."""

from __future__ import annotations

import pytest
from dagster import DagsterEventType, instance_for_test

from pipeline_assets.identity import VersionSkewError
from pipeline_assets.launch import launch_release, resume_release
from pipeline_assets.steps.config import config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus, RunStoreError
from tests.conftest import PINNED_SHA, shipped_settings

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
# The injected failure: the area step's worker pool cannot start, after both fits have finished.
BROKEN_POOL = {"start_method": "no-such-start-method"}


def executed_steps(instance, dagster_run_id):
    return {e.dagster_event.step_key for e in instance.all_logs(dagster_run_id, of_type=DagsterEventType.STEP_START)}


def test_resume_completes_without_recomputing_upstream(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    with instance_for_test(overrides=shipped_settings()) as instance:
        failed = launch_release(store, instance, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA, compute=BROKEN_POOL)
        run_id = failed.meta.run_id
        assert failed.meta.status is RunStatus.failed and failed.meta.error.step == "local_areas"
        before = failed.meta.step_timings
        assert before["state_weights"].status == "succeeded"

        with pytest.raises(VersionSkewError, match="f" * 40):
            resume_release(store, instance, run_id, running_sha="f" * 40)
        assert store.read_meta(run_id).status is RunStatus.failed  # a refused resume changes nothing

        resumed = resume_release(store, instance, run_id, running_sha=PINNED_SHA)
        assert resumed.success and resumed.meta.status is RunStatus.completed and resumed.meta.error is None
        ran = executed_steps(instance, resumed.dagster_run_id)
        assert "local_areas" in ran and instance.get_run_by_id(resumed.dagster_run_id).tags["resumed"] == "true"
        assert not ran & {"policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights"}
        after = resumed.meta.step_timings
        for step in ("policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights"):
            assert after[step].started_at == before[step].started_at, step
        assert after["local_areas"].status == "succeeded"
        assert len(list(store.path(store.run_key(run_id, "h5s")).rglob("*.h5"))) == 489

        with pytest.raises(RunStoreError, match="only a failed run can be resumed"):
            resume_release(store, instance, run_id, running_sha=PINNED_SHA)
