"""Launch one release through the Dagster instance: register the run_id partition, submit the job, wait, settle meta.json."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import yaml
from dagster import AssetCheckSeverity, DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from pipeline_assets.checks import failing_checks
from pipeline_assets.driver import first_line, settle_run, start_run
from pipeline_assets.identity import ensure_no_skew
from pipeline_assets.jobs import PROMOTE_JOB, RELEASE_JOB, job_run_config
from pipeline_assets.partitions import RELEASE_VERSIONS, RUN_IDS
from pipeline_assets.promotion import PromotionFailed, PromotionRefused
from pipeline_assets.release import REFUSED_TAG
from pipeline_assets.run_events import run_check_evaluations, run_step_failure
from pipeline_assets.run_start import PARTITION_TAG, run_tags
from pipeline_assets.steps.config import RunConfig
from resources.files import write_bytes_atomic
from resources.git import SOURCE_ROOT, CodeState, running_code_sha
from resources.ledger import GitLedger, configured_ledger
from resources.run_store import (
    LocalRunStore,
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
WORKSPACE = SOURCE_ROOT / "workspace.yaml"
POLL_SECONDS = 0.5
QUEUE_DAEMON = "QUEUED_RUN_COORDINATOR"  # the dagster-daemon's part that dequeues runs
DAEMON_HEARTBEAT_SECONDS = 120  # a dequeuing daemon older than this is taken for gone
INSTANCE_LOCK = ".usdata-instance.lock"

def instance_settings() -> bytes:
    """The settings a new $DAGSTER_HOME gets (an existing dagster.yaml is never touched): Dagster's
    stock storage, and runs launched as they are submitted, since no dagster-daemon
    need be running to dequeue them (the production instance queues them for its daemon)."""
    return b"""# Written by usdata-pipeline for a new instance; edit freely.
python_logs:
  python_log_level: WARNING  # step start-up lines stay in the UI's event log, off the console
telemetry:
  enabled: false  # no network at run time except to the services you configure
run_coordinator:  # a submitted run starts at once: no dagster-daemon needed
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
"""


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
        write_bytes_atomic(settings, instance_settings())
    os.environ[DAGSTER_HOME_VARIABLE] = str(home)
    return home


@contextmanager
def open_instance() -> Iterator[DagsterInstance]:
    """The Dagster instance at `dagster_home()`. Opening a new home creates its SQLite schemas, which
    commands started at once on it would race on ("table ... already exists"): the opening is
    serialized by a lock file in the home; the instance is then used without it."""
    home = dagster_home()
    with open(home / INSTANCE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        instance = DagsterInstance.get()
    with instance:
        yield instance


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
    """Create the run, submit the release job for its partition through the instance, wait for it,
    and leave meta.json settled (and recorded in the ledger: `ledger`, else the configured one,
    opened before the run starts)."""
    run_config = job_run_config(store, running_sha, compute, lineage)
    ledger = ledger or configured_ledger(store.root)
    for orphan in settle_orphans(store):  # before the steps look for runs to reuse
        fail_abandoned_dagster_runs(instance, orphan)
    meta = start_run(store, config, code)  # no orchestrator: the instance's run worker drives the run
    instance.add_dynamic_partitions(RUN_IDS, [meta.run_id])
    return _launch(store, instance, meta.run_id, run_config, run_tags(meta), report, ledger)


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
    orchestrator died is settled as failed first), at its pinned SHA, as a new Dagster run of the
    release job selecting those steps.

    The completed steps' outputs stay: they are not selected, and a selected step whose record in
    this run still verifies is kept rather than recomputed.
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
        m.orchestrator = None

    meta = store.update_meta(run_id, reopen)
    fail_abandoned_dagster_runs(instance, run_id)  # the run was failed: nothing drives them now
    return _launch(store, instance, run_id, run_config, {**run_tags(meta), "resumed": "true"}, report, ledger,
                   steps_to_resume(meta))


def steps_to_resume(meta: RunMeta) -> list[str]:
    """The release job's steps (checks included) less those that succeeded in the run."""
    from pipeline_assets.definitions import defs

    succeeded = {step for step, timing in meta.step_timings.items() if timing.status == "succeeded"}
    return [step for step in defs.resolve_job_def(RELEASE_JOB).graph.node_names() if step not in succeeded]


def fail_abandoned_dagster_runs(instance: DagsterInstance, run_id: str) -> None:
    """Mark failed the unfinished Dagster runs of a run whose orchestrator died: no process will
    ever end them, and a resume re-executes from them."""
    for dagster_run in instance.get_runs(RunsFilter(tags={PARTITION_TAG: run_id})):
        if not dagster_run.is_finished:
            instance.report_run_failed(dagster_run, message=f"the orchestrator of run {run_id} died")


class LaunchNeverStarted(RuntimeError):
    """The instance never started a submitted run (one line: why)."""


@dataclass
class Submission:
    dagster_run_id: str
    launcher: subprocess.Popen  # `dagster job launch`
    output: IO[bytes]  # what it printed: read back when the run never starts


def submit_job(instance: DagsterInstance, job: str, run_config: dict, tags: dict[str, str],
               op_selection: list[str] | None = None) -> Submission:
    """Submit a run of `job` through the instance with Dagster's own CLI, so the run has the code
    location's origin (the UI lists it under its job) and the instance's run coordinator and launcher
    take it (queued where a daemon dequeues). The run goes on when the launching process exits: the
    code server it started serves until its runs have finished."""
    dagster_run_id = str(uuid.uuid4())
    command = [sys.executable, "-m", "dagster", "job", "launch", "-w", str(WORKSPACE), "-j", job,
               "--run-id", dagster_run_id, "--tags", json.dumps(tags), "--config-json", json.dumps(run_config)]
    if op_selection:
        command += ["-o", ",".join(op_selection)]
    output = tempfile.TemporaryFile()
    launcher = subprocess.Popen(command, env={**os.environ, DAGSTER_HOME_VARIABLE: instance.root_directory},
                                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    return Submission(dagster_run_id, launcher, output)


def queue_unserved(instance: DagsterInstance) -> bool:
    """Whether no dagster-daemon has dequeued runs for this instance lately."""
    heartbeat = instance.get_daemon_heartbeats().get(QUEUE_DAEMON)
    return heartbeat is None or heartbeat.timestamp < time.time() - DAEMON_HEARTBEAT_SECONDS


def wait_for_run(instance: DagsterInstance, submission: Submission,
                 driver_died: Callable[[], str | None] = lambda: None) -> DagsterRun:
    """Poll the instance until the run has finished (through QUEUED while a daemon dequeues). A run
    the launching process left unlaunched, or queued with no daemon to dequeue it, is marked failed:
    LaunchNeverStarted, naming why. A run whose worker died (`driver_died` says how) is marked failed
    and returned: no process will ever finish it."""
    launcher = submission.launcher
    while True:
        launching = launcher.poll() is None  # asked first: the run read next is at least as new
        run = instance.get_run_by_id(submission.dagster_run_id)
        if run is not None and not run.is_finished and (died := driver_died()):
            instance.report_run_failed(run, message=died)
            run = instance.get_run_by_id(submission.dagster_run_id)
        if run is not None and run.is_finished:
            launcher.wait()
            submission.output.close()
            return run
        if launching:
            time.sleep(POLL_SECONDS)
            continue
        why = None
        if run is None or run.status is DagsterRunStatus.NOT_STARTED:
            submission.output.seek(0)
            said = [line.strip() for line in submission.output.read().decode(errors="replace").splitlines() if line.strip()]
            why = f"dagster job launch exited {launcher.returncode}" + (f": {said[-1]}" if said else "")
        elif run.status is DagsterRunStatus.QUEUED and queue_unserved(instance):
            why = (f"queued, and no dagster-daemon has dequeued runs of {instance.root_directory} in the last "
                   f"{DAEMON_HEARTBEAT_SECONDS} s: start one, or give the instance the DefaultRunCoordinator")
        if why:
            submission.output.close()
            if run is not None:
                instance.report_run_failed(run, message=why)
            raise LaunchNeverStarted(f"the Dagster run {submission.dagster_run_id} never started ({why})")
        time.sleep(POLL_SECONDS)


def orchestrator_death(store: LocalRunStore, run_id: str) -> str | None:
    """How the run's orchestrator (its Dagster run worker) died, once it has: the run is then settled
    failed under the step that was running."""
    if not store.read_meta(run_id).orphaned():
        return None
    meta = settle_if_orphaned(store, run_id)
    return meta.error.message if meta.error else f"the orchestrator of run {run_id} died"


def worker_death(store: LocalRunStore, run_id: str) -> RunError | None:
    """The run worker's death where Dagster's code server saw it first and failed the run before
    `orchestrator_death` was asked: a step still recorded running (a step's process records its own
    end, failing too) under a worker that is gone. The run is then settled under that step."""
    meta = store.read_meta(run_id)
    if not (meta.running_steps() and meta.orphaned()):
        return None
    return settle_if_orphaned(store, run_id).error


def wait_for_orchestrator_exit(store: LocalRunStore, run_id: str, timeout_s: float = 30) -> None:
    """A finished Dagster run's worker still writes its last events: the command returns once the worker
    has exited, so whatever follows it (another command, removing the instance) finds the instance at rest."""
    orchestrator = store.read_meta(run_id).orchestrator
    deadline = time.monotonic() + timeout_s
    while orchestrator is not None and not orchestrator.is_gone() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 10)


def _launch(store, instance, run_id, run_config, tags, report, ledger, op_selection: list[str] | None = None) -> LaunchOutcome:
    """Submit the release job for `run_id`, report its steps while it runs, and settle the run from
    what it recorded: the first step failure (a killed step process included) under that step, else
    the failed checks. A launch that fails before the run starts settles the run failed; once it has
    started the run goes on whatever happens to this process (the run-status sensors settle it)."""
    done = threading.Event()
    watcher = threading.Thread(target=_watch_steps, args=(store, run_id, report, done), daemon=True)
    watcher.start()
    try:
        try:
            submission = submit_job(instance, RELEASE_JOB, run_config, {PARTITION_TAG: run_id, **tags}, op_selection)
        except OSError as exc:
            settle_run(store, run_id, False, [], error=RunError(step="run", message=f"the launch failed: {first_line(exc)}"),
                       ledger=ledger)
            raise
        try:
            run = wait_for_run(instance, submission, lambda: orchestrator_death(store, run_id))
        except LaunchNeverStarted as exc:
            meta = settle_run(store, run_id, False, [], error=RunError(step="run", message=str(exc)), ledger=ledger)
            return LaunchOutcome(meta, False, submission.dagster_run_id, [], [])
    finally:
        done.set()
        watcher.join()
    wait_for_orchestrator_exit(store, run_id)
    dagster_run_id = run.run_id
    success = run.status is DagsterRunStatus.SUCCESS
    evaluations = run_check_evaluations(instance, dagster_run_id)
    failed_checks = failing_checks(evaluations)
    error = None if success else (
        run_step_failure(instance, dagster_run_id)
        or worker_death(store, run_id)
        or RunError(step="run", message=f"the Dagster run {dagster_run_id} {run.status.value.lower()} outside any step")
    )
    meta = settle_run(store, run_id, success, failed_checks, error=error, ledger=ledger)
    return LaunchOutcome(meta, success, dagster_run_id, failed_checks, failing_checks(evaluations, AssetCheckSeverity.WARN))


@dataclass
class PromotionLaunch:
    success: bool
    dagster_run_id: str
    error: Exception | None  # PromotionRefused (nothing written) or PromotionFailed, when not a success


def launch_promotion(instance: DagsterInstance, store: LocalRunStore, run_id: str, version: str,
                     allow_dirty: bool) -> PromotionLaunch:
    """Materialize the promotion asset's `version` partition (added here: the registry's versions
    are its partitions) with `run_id` as its config, through the instance, and wait."""
    if not instance.has_dynamic_partition(RELEASE_VERSIONS, version):
        instance.add_dynamic_partitions(RELEASE_VERSIONS, [version])
    run_config = {
        "ops": {"promotion": {"config": {"run_id": run_id, "allow_dirty": allow_dirty}}},
        "resources": {"run_store": {"config": {"root": str(store.root)}}},
        # A failure's traceback stays in the Dagster run; the user gets its one line from us.
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }
    tags = {**run_tags(store.read_meta(run_id)), PARTITION_TAG: version}
    submission = submit_job(instance, PROMOTE_JOB, run_config, tags)
    try:
        run = wait_for_run(instance, submission)
    except LaunchNeverStarted as exc:
        return PromotionLaunch(False, submission.dagster_run_id, PromotionFailed(f"promotion of {run_id}: {exc}"))
    refusal = run.tags.get(REFUSED_TAG)
    if refusal is not None:  # the asset refused: it wrote nothing and failed no step
        return PromotionLaunch(False, run.run_id, PromotionRefused(refusal))
    if run.status is DagsterRunStatus.SUCCESS:
        return PromotionLaunch(True, run.run_id, None)
    return PromotionLaunch(False, run.run_id, promotion_error(instance, run.run_id, run_id))


def promotion_error(instance: DagsterInstance, dagster_run_id: str, run_id: str) -> PromotionFailed:
    """The promotion step's own exception (under Dagster's wrappers) as its one line: the promotion
    failed (exit 1); a refusal never fails the step."""
    failure = next(iter(instance.all_logs(dagster_run_id, of_type=DagsterEventType.STEP_FAILURE)), None)
    error = failure.dagster_event.step_failure_data.error if failure else None
    while error is not None and error.cause is not None:
        error = error.cause
    if error is None:
        return PromotionFailed(f"promotion of {run_id} failed before its step ran: see the Dagster run {dagster_run_id}")
    line = error.message.strip().splitlines()[0] if error.message.strip() else error.cls_name
    line = line.removeprefix(f"{error.cls_name}: ").split(f".{error.cls_name}: ", 1)[-1]  # the module-qualified name too
    return PromotionFailed(f"promotion of {run_id} failed: {line}")
