"""The bare driver: every step of a release in order, into the run store, with no orchestrator.

It is the baseline the Dagster graph is benchmarked against, and the simplest way to read what a
release is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Callable

from pipeline_assets import stages
from pipeline_assets.identity import ensure_no_skew, make_run_id, package_version, running_code_sha
from pipeline_assets.steps.config import RunConfig
from resources.compute import LocalPool
from pipeline_assets.identity_contract import config_hash, env_id
from pipeline_assets.reuse import StepRecord
from pipeline_assets.tro import signer_from_environment, write_tro
from resources.git import CodeState
from resources.runtime import capture
from resources.run_store import LocalRunStore, RunError, RunMeta, RunStatus



def start_run(
    store: LocalRunStore, config: RunConfig, code: CodeState, started_at: datetime | None = None
) -> RunMeta:
    """Create the run record (status running) with its pinned SHA and configuration."""
    version = package_version()
    meta = RunMeta(
        run_id=make_run_id(version, code.sha, started_at),
        sha=code.sha,
        branch=code.branch,
        dirty=code.dirty,
        diff_sha256=code.diff_sha256,
        version=version,
        config=config.model_dump(mode="json"),
        env_id=env_id(capture()),
        config_hash=config_hash(config),
    )
    return store.create_run(meta)


def run_step(store: LocalRunStore, run_id: str, step: str, work: Callable[[], tuple[object, StepRecord]], running_sha: str):
    """Run one step under the skew guard, recording its timing, identity and reuse, or its error."""
    meta = store.read_meta(run_id)
    ensure_no_skew(run_id, meta.sha, step, running_sha)
    store.update_meta(run_id, lambda m: m.step_started(step))
    try:
        result, record = work()
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]

        def fail(m: RunMeta) -> None:
            m.step_ended(step, "failed")
            m.error = m.error or RunError(step=step, message=message)
            if m.status is RunStatus.running:  # a parallel step may have failed first
                m.transition(RunStatus.failed)

        store.update_meta(run_id, fail)
        raise
    facts = {"env_id": record.env_id, "reuse": record.reuse, "reused_from": record.reused_from}
    store.update_meta(run_id, lambda m: m.step_ended(step, "succeeded", **facts))
    return result, record


def run_release(
    store: LocalRunStore,
    config: RunConfig,
    code: CodeState,
    pool: LocalPool | None = None,
    running_sha: str | None = None,
) -> tuple[RunMeta, dict[str, object]]:
    """Run a whole release; return the completed run record and each step's result."""
    running_sha = running_sha or running_code_sha()
    pool = pool or LocalPool(config.areas.workers)
    meta = start_run(store, config, code)
    run_id = meta.run_id

    def work(step: str):
        if step == "local_areas":
            return lambda: stages.execute_areas(store, run_id, pool, capture())
        return lambda: stages.execute_step(store, run_id, step, config, capture())

    results: dict[str, object] = {}
    for step in stages.STEP_ORDER:
        results[step], _record = run_step(store, run_id, step, work(step), running_sha)
    meta = store.update_meta(run_id, lambda m: m.transition(RunStatus.completed))
    write_tro(store, run_id, signer_from_environment())
    return meta, results
