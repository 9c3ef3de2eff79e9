"""Launch one release through Dagster: register the run_id partition, execute the job, settle meta.json."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from dagster import AssetCheckSeverity, DagsterEventType, DagsterInstance, DagsterRunStatus, ReexecutionOptions, RunsFilter, execute_job, reconstructable

from pipeline_assets.checks import failing_checks
from pipeline_assets.driver import first_line, settle_run, start_run
from pipeline_assets.identity import ensure_no_skew, running_code_sha
from pipeline_assets.jobs import start_step_server
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.steps.config import RunConfig
from resources.files import write_bytes_atomic
from resources.git import CodeState
from resources.ledger import GitLedger, configured_ledger
from resources.lineage import LineageSettings
from resources.run_store import (
    LocalRunStore,
    Orchestrator,
    RunError,
    RunMeta,
    RunStatus,
    RunStoreError,
    directory_problem,
    settle_if_orphaned,
    settle_orphans,
)

DAGSTER_HOME_VARIABLE = "DAGSTER_HOME"
DEFAULT_DAGSTER_HOME = ".dagster"

def instance_settings(home: Path) -> bytes:
    """The settings a new $DAGSTER_HOME gets (an existing dagster.yaml is never touched). The storage's
    base_dir is written out, as Dagster's default storage records it, because step processes start
    from a server that may have been started under another $DAGSTER_HOME."""
    return f"""# Written by usdata-pipeline for a new instance; edit freely.
python_logs:
  python_log_level: WARNING  # step start-up lines stay in the UI's event log, off the console
telemetry:
  enabled: false  # no network at run time except to the services you configure
storage:  # Dagster's SQLite files and schema, with connections kept open (pipeline_assets/instance_storage.py)
  custom:
    module: pipeline_assets.instance_storage
    class: PooledSqliteStorage
    config:
      base_dir: {json.dumps(str(home))}
""".encode()


def checked_dagster_home() -> Path:
    """$DAGSTER_HOME (default ./.dagster), resolved; a ValueError in one line where it cannot be the
    instance: set but empty, a file, not writable, or a dagster.yaml that is not YAML settings.
    Writes nothing, so every command can ask before it starts."""
    value = os.environ.get(DAGSTER_HOME_VARIABLE)
    if value == "":
        raise ValueError(f"{DAGSTER_HOME_VARIABLE} is set but empty: expected the Dagster instance's directory "
                         f"(unset, it is ./{DEFAULT_DAGSTER_HOME})")
    home = Path(value or DEFAULT_DAGSTER_HOME).resolve()
    problem = directory_problem(home)
    if problem:
        raise ValueError(f"{DAGSTER_HOME_VARIABLE}={problem}")
    settings = home / "dagster.yaml"
    if settings.exists():
        try:
            document = yaml.safe_load(settings.read_bytes())
        except yaml.MarkedYAMLError as exc:
            raise ValueError(f"{DAGSTER_HOME_VARIABLE}={home}: {settings} is not valid YAML ({exc.problem}, line "
                             f"{exc.problem_mark.line + 1}): expected Dagster's instance settings") from None
        except (yaml.YAMLError, OSError) as exc:
            raise ValueError(f"{DAGSTER_HOME_VARIABLE}={home}: {settings} cannot be read ({type(exc).__name__}): "
                             "expected Dagster's instance settings") from None
        if document is not None and not isinstance(document, dict):
            raise ValueError(f"{DAGSTER_HOME_VARIABLE}={home}: {settings} holds a {type(document).__name__}, "
                             "not settings: expected Dagster's instance settings (a YAML mapping)")
    return home


def dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster (checked first, then created, with `instance_settings`),
    exported so step processes agree."""
    home = checked_dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        write_bytes_atomic(settings, instance_settings(home))
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
    warned_checks: list[str]


def _watch_steps(store: LocalRunStore, run_id: str, report: Callable[[str, str, float | None], None], done: threading.Event):
    """Report each step's status as it changes (a resumed run's earlier statuses are not news)."""
    seen = {step: timing.status for step, timing in store.read_meta(run_id).step_timings.items()}
    while True:
        finished = done.wait(0.5)
        try:
            timings = store.read_meta(run_id).step_timings
        except Exception:  # unreadable this tick; the next (if any) reads again
            if finished:
                return
            continue
        for step, timing in timings.items():
            if seen.get(step) != timing.status:
                seen[step] = timing.status
                report(step, timing.status, timing.duration_s)
        if finished:
            return


def job_run_config(store: LocalRunStore, running_sha: str | None, compute: dict | None = None, lineage: dict | None = None) -> dict:
    """Resources configured explicitly, not through the environment: the executor's forkserver keeps
    the environment it started with. Dagster's console log stays at warnings (the UI has it all).
    `lineage` is the lineage resource's config (transport, url, directory), checked here so a bad one
    refuses the run before it starts."""
    code = {"sha": running_sha} if running_sha else {}
    resources = {"run_store": {"config": {"root": str(store.root)}}, "code": {"config": code}}
    if compute:
        resources["compute"] = {"config": compute}
    if lineage:
        LineageSettings.resolve(**lineage)
        resources["lineage"] = {"config": lineage}
    return {"resources": resources, "loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def launch_release(
    store: LocalRunStore,
    instance: DagsterInstance,
    config: RunConfig,
    code: CodeState,
    report: Callable[[str, str, float | None], None] = lambda *_: None,
    running_sha: str | None = None,
    compute: dict | None = None,
    lineage: dict | None = None,
    ledger: GitLedger | None = None,
) -> LaunchOutcome:
    """Create the run, execute the release job for its partition, and leave meta.json settled (and
    recorded in the ledger: `ledger`, else the configured one, opened before the run starts)."""
    run_config = job_run_config(store, running_sha, compute, lineage)
    ledger = ledger or configured_ledger(store.root)
    start_step_server()  # its imports overlap creating the run
    for orphan in settle_orphans(store):  # before the steps look for runs to reuse
        fail_abandoned_dagster_runs(instance, orphan)
    meta = start_run(store, config, code, orchestrator=Orchestrator.current())
    instance.add_dynamic_partitions(RUN_IDS, [meta.run_id])
    tags = {"dagster/partition": meta.run_id, "git_sha": code.sha, "branch": code.branch or ""}
    return _execute(store, instance, meta.run_id, run_config, tags, report, ledger)


def resume_release(
    store: LocalRunStore,
    instance: DagsterInstance,
    run_id: str,
    report: Callable[[str, str, float | None], None] = lambda *_: None,
    running_sha: str | None = None,
    compute: dict | None = None,
    lineage: dict | None = None,
    ledger: GitLedger | None = None,
) -> LaunchOutcome:
    """Re-execute only the failed, interrupted and never-run steps of a failed run (one whose
    orchestrator died is settled as failed first), at its pinned SHA, driven by this process.

    The completed steps' outputs stay: Dagster re-executes from the failure, and a step whose
    record in this run still verifies is kept rather than recomputed.
    """
    meta = settle_if_orphaned(store, run_id)
    if meta.status is not RunStatus.failed:
        raise RunStoreError(f"run {run_id} is {meta.status.value}: only a failed run can be resumed")
    ensure_no_skew(run_id, meta.sha, "resume", running_sha or running_code_sha())
    run_config = job_run_config(store, running_sha, compute, lineage)
    ledger = ledger or configured_ledger(store.root)

    def reopen(m: RunMeta) -> None:
        if m.status is not RunStatus.failed:  # another resume took it first
            raise RunStoreError(f"run {run_id} is {m.status.value}: only a failed run can be resumed")
        m.transition(RunStatus.running)
        m.error = None
        m.orchestrator = Orchestrator.current()

    start_step_server()
    store.update_meta(run_id, reopen)
    fail_abandoned_dagster_runs(instance, run_id)  # the run was failed: nothing drives them now
    parent = instance.get_runs(RunsFilter(tags={"dagster/partition": run_id}, statuses=[DagsterRunStatus.FAILURE]), limit=1)
    options = ReexecutionOptions.from_failure(parent[0].run_id, instance) if parent else None
    tags = {"dagster/partition": run_id, "git_sha": meta.sha, "branch": meta.branch or "", "resumed": "true"}
    return _execute(store, instance, run_id, run_config, tags, report, ledger, options)


def fail_abandoned_dagster_runs(instance: DagsterInstance, run_id: str) -> None:
    """Mark failed the unfinished Dagster runs of a run whose orchestrator died: no process will
    ever end them, and a resume re-executes from them."""
    for dagster_run in instance.get_runs(RunsFilter(tags={"dagster/partition": run_id})):
        if not dagster_run.is_finished:
            instance.report_run_failed(dagster_run, message=f"the orchestrator of run {run_id} died")


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


def _execute(store, instance, run_id, run_config, tags, report, ledger, reexecution: ReexecutionOptions | None = None) -> LaunchOutcome:
    """Execute the job and settle the run from what it recorded: the first step failure (a killed
    step process included) under that step, else the failed checks. An orchestrator that fails
    itself settles the run before it goes."""
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
            evaluations = [e.asset_check_evaluation_data for e in result.all_events
                           if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]
            failed_checks = failing_checks(evaluations)
            warned_checks = failing_checks(evaluations, AssetCheckSeverity.WARN)
            error = None if success else (
                step_failure_error(result.all_events)
                or RunError(step="run", message=f"the Dagster run {dagster_run_id} failed outside any step")
            )
    except BaseException as exc:
        settle_run(store, run_id, False, [], error=RunError(step="run", message=f"the orchestrator failed: {first_line(exc)}"),
                   ledger=ledger)
        raise
    finally:
        done.set()
        watcher.join()
    meta = settle_run(store, run_id, success, failed_checks, error=error, ledger=ledger)
    return LaunchOutcome(meta, success, dagster_run_id, failed_checks, warned_checks)
