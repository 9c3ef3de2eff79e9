"""Run-status sensors: keep meta.json true to how the Dagster run of a release ended.

A run launched from the UI or by the git sensor has no caller waiting to settle its record (nor one
whose `usdata-pipeline` was stopped while it ran), so these do it, through the same `settle_run` as
`launch_release` (which also records the run in the ledger).
Both are idempotent with `launch_release` and with the steps' own error records: they change nothing
unless meta.json still says `running`. They return None, so one tick handles every run that
ended since the last (a returned value would end the tick's batch).
"""

from __future__ import annotations

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunStatusSensorContext,
    run_failure_sensor,
    run_status_sensor,
)

from pipeline_assets.checks import failing_checks
from pipeline_assets.driver import settle_run
from pipeline_assets.jobs import release_job
from pipeline_assets.run_events import run_check_evaluations, run_step_failure
from pipeline_assets.run_start import PARTITION_TAG
from resources.dagster_resources import RunStoreResource
from resources.run_store import LocalRunStore, RunError


def _run_record(context: RunStatusSensorContext, run_store: RunStoreResource) -> tuple[LocalRunStore, str] | None:
    """The store and run_id of the Dagster run's release, or None (logged) when it has no record.

    The store root comes from the run's own config first: that is where its steps wrote.
    """
    run = context.dagster_run
    root = run.run_config.get("resources", {}).get("run_store", {}).get("config", {}).get("root")
    store = LocalRunStore(root) if root else run_store.store()
    run_id = run.tags.get(PARTITION_TAG)
    if not run_id or not store.exists(store.meta_key(run_id)):
        context.log.warning(f"Dagster run {run.run_id}: no run record for partition {run_id!r} in {store.root}")
        return None
    return store, run_id


@run_status_sensor(
    name="release_success_sensor",
    run_status=DagsterRunStatus.SUCCESS,
    monitored_jobs=[release_job],
    default_status=DefaultSensorStatus.RUNNING,
    description="A successful release run: meta.json completed (or failed on a failed check), and its TRO.",
)
def release_success_sensor(context: RunStatusSensorContext, run_store: RunStoreResource):
    record = _run_record(context, run_store)
    if record:
        meta = settle_run(*record, success=True, failed_checks=failing_checks(run_check_evaluations(context.instance, context.dagster_run.run_id)))
        context.log.info(f"run {meta.run_id}: {meta.status.value}")


@run_failure_sensor(
    name="release_failure_sensor",
    monitored_jobs=[release_job],
    default_status=DefaultSensorStatus.RUNNING,
    description="A failed release run: meta.json failed, naming the failing step and its error.",
)
def release_failure_sensor(context: RunFailureSensorContext, run_store: RunStoreResource):
    record = _run_record(context, run_store)
    if not record:
        return
    store, run_id = record
    outside = next(iter((context.failure_event.message or "").strip().splitlines()), "the Dagster run failed")
    error = run_step_failure(context.instance, context.dagster_run.run_id) or RunError(step="run", message=outside)
    meta = settle_run(store, run_id, success=False, failed_checks=[], error=error)
    context.log.info(f"run {run_id}: {meta.status.value}")
