"""The bare driver: every step of a release in order, into the run store, with no orchestrator.

It is the baseline the Dagster graph is benchmarked against, and the simplest way to read what a
release is.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator

from pipeline_assets import stages, step_graph
from pipeline_assets.identity import ensure_no_skew, make_run_id, package_version
from pipeline_assets.identity_contract import config_hash, env_id
from pipeline_assets.reuse import StepRecord, read_record
from pipeline_assets.steps.config import RunConfig
from pipeline_assets.tro import TRO_PREFIX, seal_tro, tro_base
from resources.compute import LocalPool, mark_step_process
from resources.git import CodeState, running_code_sha
from resources.ledger import GitLedger, configured_ledger
from resources.lineage import Lineage, RunState, StepRun
from resources.run_store import LocalRunStore, Orchestrator, RunError, RunExists, RunMeta, RunStatus, utcnow
from resources.runtime import capture


def start_run(
    store: LocalRunStore,
    config: RunConfig,
    code: CodeState,
    started_at: datetime | None = None,
    orchestrator: Orchestrator | None = None,
) -> RunMeta:
    """Create the run record (status running) with its pinned SHA, configuration and `orchestrator`
    (the process that will drive it; None where Dagster's run worker does).

    A run_id names its start to the second; a run starting in the same second as another run of the
    same code (a run that reuses every step takes under a second) waits for the next second.
    """
    version = package_version()
    while True:
        now = started_at or utcnow()
        meta = RunMeta(
            run_id=make_run_id(version, code.sha, now),
            created_at=now,
            sha=code.sha,
            branch=code.branch,
            dirty=code.dirty,
            diff_sha256=code.diff_sha256,
            version=version,
            config=config.model_dump(mode="json"),
            env_id=env_id(capture()),
            config_hash=config_hash(config),
            orchestrator=orchestrator,
        )
        try:
            return store.create_run(meta)
        except RunExists:  # the second is taken (also by a run created at this same instant)
            if started_at is not None:
                raise
        time.sleep(1 - now.microsecond / 1e6)


def step_inputs(store: LocalRunStore, run_id: str, step: str) -> dict[str, str]:
    """The files a step reads (its upstream steps' outputs): absolute path -> sha256."""
    files = {}
    for upstream in stages.STEP_INPUTS[step]:
        record = read_record(store, run_id, upstream)
        for rel, digest in (record.outputs if record else {}).items():
            files[str(store.path(store.run_key(run_id, rel)))] = digest
    return files


@dataclass
class StepOutcome:
    """What a step reports when its work is done: the record of what it made."""

    record: StepRecord | None = None


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


@dataclass
class TimedStep:
    started_at: datetime
    facts: dict = field(default_factory=dict)  # what step_ended records of a step that succeeded


@contextmanager
def step_timing(store: LocalRunStore, run_id: str, step: str) -> Iterator[TimedStep]:
    """The step's timing in meta.json: running, then succeeded with the facts the block adds, or
    failed with the block's error (the run then fails: the first error stays). In a step process
    the process is named after the step and exits with its orchestrator."""
    mark_step_process(step)
    timed = TimedStep(store.update_meta(run_id, lambda m: m.step_started(step)).step_timings[step].started_at)
    try:
        yield timed
    except Exception as exc:
        error = RunError(step=step, message=first_line(exc))

        def fail(m: RunMeta) -> None:
            m.step_ended(step, "failed")
            m.record_failure(error)

        store.update_meta(run_id, fail)
        raise
    store.update_meta(run_id, lambda m: m.step_ended(step, "succeeded", **timed.facts))


@contextmanager
def recorded_step(
    store: LocalRunStore, run_id: str, step: str, running_sha: str, lineage: Lineage | None = None
) -> Iterator[StepOutcome]:
    """One step under the skew guard, recording its timing, identity and reuse (from the outcome's
    record, set by the work in the `with` block), or its error, and reporting it to OpenLineage
    (START, then COMPLETE or FAIL; `lineage` defaults to the configured one). A context rather than a
    call, so the area asset can report each file while the rest are still being built."""
    meta = store.read_meta(run_id)
    ensure_no_skew(run_id, meta.sha, step, running_sha)
    lineage = lineage or Lineage.configured(store.root)
    outcome = StepOutcome()
    with step_timing(store, run_id, step) as timed:
        attempt = StepRun(run_id, meta.created_at, step, timed.started_at, step_inputs(store, run_id, step))
        lineage.emit(attempt, RunState.START, capture().model_dump())
        try:
            yield outcome
        except Exception as exc:
            lineage.emit(attempt, RunState.FAIL, capture().model_dump(), error=first_line(exc))
            raise
        record = outcome.record
        timed.facts.update(env_id=record.env_id, reuse=record.reuse, reused_from=record.reused_from,
                           reused_parts=record.reused_parts)
    outputs = {str(store.path(store.run_key(run_id, rel))): digest for rel, digest in record.outputs.items()}
    lineage.emit(attempt, RunState.COMPLETE, record.environment, record.env_id, outputs)


def run_step(
    store: LocalRunStore,
    run_id: str,
    step: str,
    work: Callable[[], tuple[object, StepRecord]],
    running_sha: str,
    lineage: Lineage | None = None,
):
    """`work()` as a recorded_step; returns its (result, record)."""
    with recorded_step(store, run_id, step, running_sha, lineage) as outcome:
        result, outcome.record = work()
    return result, outcome.record


def run_record_files(store: LocalRunStore, run_id: str) -> dict[str, bytes]:
    """What the ledger keeps of a run (store key -> bytes): meta.json, and its TROs and signatures."""
    run_dir = store.path(store.run_key(run_id))
    keys = [store.meta_key(run_id)] + [store.run_key(run_id, p.name) for p in sorted(run_dir.glob(f"{TRO_PREFIX}*"))]
    return {key: store.read_bytes(key) for key in keys}


def settle_run(
    store: LocalRunStore,
    run_id: str,
    success: bool,
    failed_checks: list[str],
    error: RunError | None = None,
    ledger: GitLedger | None = None,
) -> RunMeta:
    """completed when every step and check passed; otherwise failed, naming what failed (`error`, else
    the failed checks). Then the run's record goes to the ledger (`ledger`, else the configured one).

    A completed run gets its TRO here (once). A failed run gets none: it may be resumed, which can
    rewrite its files, and a TRO is a claim about a finished run. A run already settled is left as it
    is, so settling it again commits nothing new.
    """

    def settle(meta: RunMeta) -> None:
        if meta.status is not RunStatus.running:
            return
        if success and not failed_checks:
            meta.transition(RunStatus.completed)
            return
        meta.settle_failed(error or RunError(step="checks", message=f"failed checks: {', '.join(failed_checks)}"))

    meta = store.read_meta(run_id)
    if meta.status is RunStatus.running:
        meta = store.update_meta(run_id, settle)
    if meta.status is RunStatus.completed:
        seal_tro(store, run_id)
    ledger = ledger or configured_ledger(store.root)
    if ledger is not None:
        ledger.record(run_record_files(store, run_id), f"run {run_id} {meta.status.value}")
    return meta


def run_release(
    store: LocalRunStore,
    config: RunConfig,
    code: CodeState,
    pool: LocalPool | None = None,
    running_sha: str | None = None,
    ledger: GitLedger | None = None,
    lineage: Lineage | None = None,
) -> tuple[RunMeta, dict[str, object]]:
    """Run a whole release; return the completed run record and each step's result.

    The ledger and the lineage transport default to the configured ones, resolved before the run
    starts so that a bad configuration refuses the run instead of surfacing at its end.
    """
    running_sha = running_sha or running_code_sha()
    pool = pool or LocalPool(config.areas.workers)
    ledger = ledger or configured_ledger(store.root)
    lineage = lineage or Lineage.configured(store.root)
    tro_base()  # the TRO is written at the end: a bad @base refuses the run now
    meta = start_run(store, config, code, orchestrator=Orchestrator.current())
    run_id = meta.run_id

    def work(step: str):
        if step == "local_areas":
            return lambda: stages.execute_areas(store, run_id, pool, capture())
        return lambda: stages.execute_step(store, run_id, step, config, capture(), pool)  # the fits and the model on the pool

    results: dict[str, object] = {}
    try:
        for step in step_graph.STEP_ORDER:
            results[step], _record = run_step(store, run_id, step, work(step), running_sha, lineage)
    except Exception:
        if store.read_meta(run_id).status is RunStatus.failed:  # a step failed (a refused step leaves it running)
            settle_run(store, run_id, False, [], ledger=ledger)
        raise
    return settle_run(store, run_id, True, [], ledger=ledger), results
