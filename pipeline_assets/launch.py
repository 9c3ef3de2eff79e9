"""Launch one release through Dagster: register the run_id partition, execute the job, settle meta.json."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, ReexecutionOptions, RunsFilter, execute_job, reconstructable

from pipeline_assets.driver import start_run
from pipeline_assets.identity import ensure_no_skew, running_code_sha
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.steps.config import RunConfig
from pipeline_assets.tro import signer_from_environment, tro_revisions, write_tro
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStoreError, RunError, RunMeta, RunStatus

DAGSTER_HOME_VARIABLE = "DAGSTER_HOME"
DEFAULT_DAGSTER_HOME = ".dagster"

def dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster (created), exported so step processes agree."""
    home = Path(os.environ.get(DAGSTER_HOME_VARIABLE) or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[DAGSTER_HOME_VARIABLE] = str(home)
    return home


def release_job():
    """Module-level so `reconstructable` can rebuild the job in each step process."""
    from pipeline_assets.definitions import defs

    return defs.resolve_job_def("release")


@dataclass
class LaunchOutcome:
    meta: RunMeta
    success: bool
    dagster_run_id: str
    failed_checks: list[str]


def _watch_steps(store: LocalRunStore, run_id: str, report: Callable[[str, str, float | None], None], done: threading.Event):
    seen: dict[str, str] = {}
    while True:
        finished = done.wait(0.5)
        try:
            timings = store.read_meta(run_id).step_timings
        except Exception:  # meta.json is being replaced; read again next tick
            continue
        for step, timing in timings.items():
            if seen.get(step) != timing.status:
                seen[step] = timing.status
                report(step, timing.status, timing.duration_s)
        if finished:
            return


def job_run_config(store: LocalRunStore, running_sha: str | None, compute: dict | None = None) -> dict:
    """Resources configured explicitly, not through the environment: the executor's forkserver keeps
    the environment it started with. Dagster's console log stays at warnings (the UI has it all)."""
    code = {"sha": running_sha} if running_sha else {}
    resources = {"run_store": {"config": {"root": str(store.root)}}, "code": {"config": code}}
    if compute:
        resources["compute"] = {"config": compute}
    return {"resources": resources, "loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def launch_release(
    store: LocalRunStore,
    instance: DagsterInstance,
    config: RunConfig,
    code: CodeState,
    report: Callable[[str, str, float | None], None] = lambda *_: None,
    running_sha: str | None = None,
    compute: dict | None = None,
) -> LaunchOutcome:
    """Create the run, execute the release job for its partition, and leave meta.json settled."""
    meta = start_run(store, config, code)
    instance.add_dynamic_partitions(RUN_IDS, [meta.run_id])
    tags = {"dagster/partition": meta.run_id, "git_sha": code.sha, "branch": code.branch or ""}
    return _execute(store, instance, meta.run_id, job_run_config(store, running_sha, compute), tags, report)


def resume_release(
    store: LocalRunStore,
    instance: DagsterInstance,
    run_id: str,
    report: Callable[[str, str, float | None], None] = lambda *_: None,
    running_sha: str | None = None,
    compute: dict | None = None,
) -> LaunchOutcome:
    """Re-execute only the failed and never-run steps of a failed run, at its pinned SHA.

    The completed steps' outputs stay: Dagster re-executes from the failure, and a step whose
    record in this run still verifies is kept rather than recomputed.
    """
    meta = store.read_meta(run_id)
    if meta.status is not RunStatus.failed:
        raise RunStoreError(f"run {run_id} is {meta.status.value}: only a failed run can be resumed")
    ensure_no_skew(run_id, meta.sha, "resume", running_sha or running_code_sha())
    parent = instance.get_runs(RunsFilter(tags={"dagster/partition": run_id}, statuses=[DagsterRunStatus.FAILURE]), limit=1)

    def reopen(m: RunMeta) -> None:
        m.transition(RunStatus.running)
        m.error = None

    store.update_meta(run_id, reopen)
    options = ReexecutionOptions.from_failure(parent[0].run_id, instance) if parent else None
    tags = {"dagster/partition": run_id, "git_sha": meta.sha, "branch": meta.branch or "", "resumed": "true"}
    return _execute(store, instance, run_id, job_run_config(store, running_sha, compute), tags, report, options)


def _execute(store, instance, run_id, run_config, tags, report, reexecution: ReexecutionOptions | None = None) -> LaunchOutcome:
    done = threading.Event()
    watcher = threading.Thread(target=_watch_steps, args=(store, run_id, report, done), daemon=True)
    watcher.start()
    try:
        with execute_job(
            reconstructable(release_job),
            instance=instance,
            run_config=run_config,
            tags=tags,
            reexecution_options=reexecution,
        ) as result:
            success = result.success
            dagster_run_id = result.run_id
            failed_checks = [
                f"{e.asset_check_evaluation_data.asset_key.to_user_string()}:{e.asset_check_evaluation_data.check_name}"
                for e in result.all_events
                if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION and not e.asset_check_evaluation_data.passed
            ]
    finally:
        done.set()
        watcher.join()
    return LaunchOutcome(settle_run(store, run_id, success, failed_checks), success, dagster_run_id, failed_checks)


def settle_run(store: LocalRunStore, run_id: str, success: bool, failed_checks: list[str]) -> RunMeta:
    """completed when every step and check passed; otherwise failed, naming what failed.

    A completed run gets its TRO here (once). A failed run gets none: it may be resumed, which can
    rewrite its files, and a TRO is a claim about a finished run.
    """

    def settle(meta: RunMeta) -> None:
        if meta.status is not RunStatus.running:
            return
        if success and not failed_checks:
            meta.transition(RunStatus.completed)
            return
        if meta.error is None:
            meta.error = RunError(step="checks", message=f"failed checks: {', '.join(failed_checks) or 'see the Dagster run'}")
        meta.transition(RunStatus.failed)

    meta = store.update_meta(run_id, settle)
    if meta.status is RunStatus.completed and not tro_revisions(store, run_id):
        write_tro(store, run_id, signer_from_environment())
    return meta
