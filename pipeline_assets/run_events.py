"""What a Dagster run's event log tells about its steps and checks: read by the launcher after a
run and by the run-status sensors, neither of which imports the other."""

from __future__ import annotations

from dagster import DagsterEventType, DagsterInstance

from resources.run_store import RunError


def step_failure_error(events) -> RunError | None:
    """The first failed step of a Dagster run (from its events) with its error's first line: the
    user's own exception, not Dagster's wrapper around it. A failure whose error says nothing but
    its type (a step process that died) is told by the executor's error event for that step
    (the exit code or signal)."""
    failure = next((e for e in events if e.event_type == DagsterEventType.STEP_FAILURE), None)
    if failure is None:
        return None
    error = failure.step_failure_data.error
    while error and error.cause:
        error = error.cause
    message = (error.message.strip() if error else "") or failure.message or ""
    if error and message.endswith(error.cls_name):
        explained = [e.message for e in events if e.event_type == DagsterEventType.ENGINE_EVENT
                     and e.step_key == failure.step_key and e.engine_event_data.error is not None]
        message = explained[-1].split(". ")[0] if explained else message
    line = next(iter(message.strip().splitlines()), f"step {failure.step_key} failed")
    return RunError(step=failure.step_key, message=line)


def run_step_failure(instance: DagsterInstance, dagster_run_id: str) -> RunError | None:
    """step_failure_error of a Dagster run, from the instance's event log."""
    logs = instance.all_logs(dagster_run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.ENGINE_EVENT})
    return step_failure_error([entry.dagster_event for entry in logs])


def run_check_evaluations(instance: DagsterInstance, dagster_run_id: str) -> list:
    """Every asset check evaluation a Dagster run recorded."""
    entries = instance.all_logs(dagster_run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
    return [entry.dagster_event.asset_check_evaluation_data for entry in entries]
