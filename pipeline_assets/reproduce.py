"""Reproduce a run: compare the recorded environment with this one first, then re-run at the pinned
SHA and configuration into a new run, and report file by file whether the bytes are identical.

The re-run never reuses earlier outputs (reuse would link the original files and prove nothing). The
report is written into the new run's diagnostics, and a new TRO revision of the new run covers it.
"""

from __future__ import annotations

from typing import Any, Callable

from dagster import DagsterInstance
from pydantic import BaseModel

from pipeline_assets.identity import ensure_no_skew
from pipeline_assets.identity_contract import env_id
from pipeline_assets.launch import launch_release
from pipeline_assets.reuse import read_record
from pipeline_assets.stages import DIAGNOSTICS
from pipeline_assets.step_graph import STEP_ORDER
from pipeline_assets.steps.config import RunConfig
from pipeline_assets.tro import revise_tro, run_files
from resources.git import CodeState, running_code_sha
from resources.run_store import SEALED, LocalRunStore, RunStatus, RunStoreError
from resources.runtime import RuntimeEnvironment, capture

REPORT = f"{DIAGNOSTICS}/reproduction.json"
# What a reproduction compares of the environment: what can change the bytes a run writes.
COMPARED_FIELDS = ("python_version", "python_implementation", "os", "kernel", "architecture",
                   "container_image_digest", "installed_distributions_sha256")
# Files that name the run they belong to, so they differ between any two runs by design.
RUN_SPECIFIC = {
    "steps/": "a step record names its run's times and environment, not only the step's output",
    "meta.json": "the run record names its run_id, times and status",
}


class EnvironmentMismatch(ValueError):
    """The environment differs from the recorded one (env_id): reproduction refused unless forced."""


class FieldDifference(BaseModel):
    field: str
    recorded: Any
    current: Any


class ArtifactComparison(BaseModel):
    path: str
    original_sha256: str | None
    reproduced_sha256: str | None
    identical: bool
    reason: str | None = None  # why a file differs where that is expected


class ReproductionReport(BaseModel):
    original_run_id: str
    reproduced_run_id: str
    pinned_sha: str
    original_env_id: str | None
    current_env_id: str
    forced: bool
    environment_differences: list[FieldDifference]
    artifacts: list[ArtifactComparison]

    @property
    def unexpected(self) -> list[ArtifactComparison]:
        """Files that differ with no known reason: the reproduction failed for them."""
        return [a for a in self.artifacts if not a.identical and a.reason is None]


def recorded_environment(store: LocalRunStore, run_id: str) -> RuntimeEnvironment:
    """The environment of the run's first step, as its step record kept it."""
    for step in STEP_ORDER:
        record = read_record(store, run_id, step)
        if record is not None and record.environment:
            return RuntimeEnvironment.model_validate(record.environment)
    raise RunStoreError(f"run {run_id} has no step record with an environment to compare against")


def environment_differences(recorded: RuntimeEnvironment, current: RuntimeEnvironment) -> list[FieldDifference]:
    """Every compared field that differs, libraries one by one (library_versions.NAME)."""
    differences = [
        FieldDifference(field=name, recorded=getattr(recorded, name), current=getattr(current, name))
        for name in COMPARED_FIELDS
        if getattr(recorded, name) != getattr(current, name)
    ]
    for name in sorted(set(recorded.library_versions) | set(current.library_versions)):
        before, now = recorded.library_versions.get(name), current.library_versions.get(name)
        if before != now:
            differences.append(FieldDifference(field=f"library_versions.{name}", recorded=before, current=now))
    return differences


def _expected_difference(path: str) -> str | None:
    return next((reason for prefix, reason in RUN_SPECIFIC.items() if path.startswith(prefix)), None)


def compare_files(store: LocalRunStore, original: str, reproduced: str) -> list[ArtifactComparison]:
    """Every file of either run (the TROs aside: they describe these files), side by side."""

    def files(run_id: str) -> dict[str, str]:
        records = [r for step in STEP_ORDER if (r := read_record(store, run_id, step)) is not None]
        return run_files(store, run_id, records)

    before, after = files(original), files(reproduced)
    comparisons = []
    for path in sorted(set(before) | set(after)):
        identical = before.get(path) == after.get(path)
        comparisons.append(ArtifactComparison(
            path=path,
            original_sha256=before.get(path),
            reproduced_sha256=after.get(path),
            identical=identical,
            reason=None if identical else _expected_difference(path),
        ))
    return comparisons


def check_reproducible(store: LocalRunStore, run_id: str, code: CodeState, running_sha: str, force: bool) -> list[FieldDifference]:
    """Refuse what cannot be a reproduction (one line each); return the environment's differences."""
    meta = store.read_meta(run_id)
    if meta.status not in SEALED:
        raise RunStoreError(f"run {run_id} is {meta.status.value}: only a completed run can be reproduced")
    ensure_no_skew(run_id, meta.sha, "reproduce", running_sha)
    if (code.sha, code.diff_sha256) != (meta.sha, meta.diff_sha256):
        raise RunStoreError(
            f"run {run_id} was made from {meta.sha[:8]}{' with uncommitted changes' if meta.dirty else ''}; "
            f"this checkout is {code.sha[:8]}{' with other uncommitted changes' if code.dirty else ''}"
        )
    differences = environment_differences(recorded_environment(store, run_id), capture())
    if env_id(capture()) != meta.env_id and not force:
        named = ", ".join(f"{d.field} {d.recorded} -> {d.current}" for d in differences) or "installed distributions"
        raise EnvironmentMismatch(
            f"the environment differs from run {run_id}'s (env_id {meta.env_id} vs {env_id(capture())}): {named}; "
            "pass --force to reproduce anyway"
        )
    return differences


def reproduce(
    store: LocalRunStore,
    instance: DagsterInstance,
    run_id: str,
    code: CodeState,
    force: bool = False,
    running_sha: str | None = None,
    report: Callable[[str, str, float | None], None] = lambda *_: None,
    compute: dict | None = None,
) -> ReproductionReport:
    running_sha = running_sha or running_code_sha()
    differences = check_reproducible(store, run_id, code, running_sha, force)
    meta = store.read_meta(run_id)
    config = RunConfig.model_validate(meta.config).model_copy(update={"reuse": False})
    outcome = launch_release(store, instance, config, code, report=report, running_sha=running_sha, compute=compute)
    new_run = outcome.meta.run_id
    if outcome.meta.status is not RunStatus.completed:
        raise RunStoreError(f"the reproduction run {new_run} did not complete: see usdata-pipeline status {new_run}")
    result = ReproductionReport(
        original_run_id=run_id,
        reproduced_run_id=new_run,
        pinned_sha=meta.sha,
        original_env_id=meta.env_id,
        current_env_id=env_id(capture()),
        forced=force,
        environment_differences=differences,
        artifacts=compare_files(store, run_id, new_run),
    )
    store.write_run_json(new_run, REPORT, result)
    revise_tro(store, new_run)
    return result
