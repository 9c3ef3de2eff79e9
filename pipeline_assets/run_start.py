"""The run-start guard every release asset calls first.

A step may only work for a partition that is a well-formed run_id with a run record. The git sensor
only asks for a run (its tags are the start request), so the record is made here, by the run's first
step; a run launched from the UI gets the run's identity as Dagster tags from its record.
"""

from __future__ import annotations

from typing import NoReturn

from dagster import AssetExecutionContext, DagsterInstance, Failure, RunsFilter

from pipeline_assets.driver import start_run
from pipeline_assets.identity import InvalidRunId, make_run_id, package_version, parse_run_id
from pipeline_assets.identity_contract import config_hash
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.steps.config import SCALES, RunConfig, config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore, Orchestrator, RunExists, RunMeta, RunStatus

PARTITION_TAG = "dagster/partition"
RUN_ID_TAG = "run_id"
# The run's identity on its Dagster run; together they are also a start request (the git sensor's).
START_TAGS = (RUN_ID_TAG, "git_sha", "branch", "scale", "config_hash")
DIFF_TAG = "git_diff_sha256"  # only on a start request for a dirty work tree


def run_tags(meta: RunMeta) -> dict[str, str]:
    """The five identity tags of a run, from its record."""
    return {
        RUN_ID_TAG: meta.run_id,
        "git_sha": meta.sha,
        "branch": meta.branch or "",
        "scale": str(meta.config.get("scale", "")),
        "config_hash": meta.config_hash or "",
    }


def start_request_tags(run_id: str, code: CodeState, config: RunConfig) -> dict[str, str]:
    """The tags that ask for run `run_id` of `code` at `config` (a named scale, unchanged)."""
    tags = {RUN_ID_TAG: run_id, "git_sha": code.sha, "branch": code.branch or "", "scale": config.scale,
            "config_hash": config_hash(config)}
    if code.diff_sha256:
        tags[DIFF_TAG] = code.diff_sha256
    return tags


def forget_partition(instance: DagsterInstance, partition_key: str, dagster_run_id: str) -> None:
    """Delete a run_id partition no other Dagster run has used, so it stops counting as missing."""
    others = [run for run in instance.get_runs(RunsFilter(tags={PARTITION_TAG: partition_key}))
              if run.run_id != dagster_run_id]
    if not others and instance.has_dynamic_partition(RUN_IDS, partition_key):
        instance.delete_dynamic_partition(RUN_IDS, partition_key)


def _refuse(context: AssetExecutionContext, message: str) -> NoReturn:
    forget_partition(context.instance, context.partition_key, context.run.run_id)
    raise Failure(description=message)


def _created_from_request(context: AssetExecutionContext, store: LocalRunStore, run_id: str) -> RunMeta:
    """The record a start request asks for (created once, however many root steps start at once),
    or a refusal naming what is missing or does not match."""
    tags = context.run.tags
    request = {name: tags.get(name) for name in START_TAGS}
    if None in request.values() or request[RUN_ID_TAG] != run_id:
        _refuse(context, f"run {run_id} has no meta.json in {store.root}; start a run with usdata-pipeline run "
                         "or the git sensor")
    scale = request["scale"]
    if scale not in SCALES:
        _refuse(context, f"run {run_id}: start request scale {scale!r} is not one of {', '.join(SCALES)}")
    config = config_for_scale(scale)
    if config_hash(config) != request["config_hash"]:
        _refuse(context, f"run {run_id}: start request config_hash {request['config_hash']} is not scale {scale}'s "
                         f"({config_hash(config)})")
    diff = tags.get(DIFF_TAG)
    code = CodeState(sha=request["git_sha"], branch=request["branch"] or None, dirty=diff is not None, diff_sha256=diff)
    started_at = parse_run_id(run_id).started_at
    try:
        expected = make_run_id(package_version(), code.sha, started_at)
    except InvalidRunId as exc:
        _refuse(context, f"run {run_id}: start request git_sha: {exc}")
    if expected != run_id:
        _refuse(context, f"run {run_id}: start request git_sha {code.sha} of version {package_version()} "
                         f"makes run_id {expected}")
    try:
        return start_run(store, config, code, started_at=started_at)
    except RunExists:  # another root step of this run made it first
        meta = store.read_meta(run_id)
    if (meta.sha, meta.config_hash) != (code.sha, request["config_hash"]):
        _refuse(context, f"run {run_id}: meta.json pins {meta.sha} at config_hash {meta.config_hash}, the start "
                         f"request {code.sha} at {request['config_hash']}")
    return meta


def _record_orchestrator(store: LocalRunStore, meta: RunMeta) -> RunMeta:
    """A running run's orchestrator is the Dagster run worker executing this step, so that a worker
    that dies is told apart from one still running by the next command (a resume's new worker
    replaces the last)."""
    worker = Orchestrator.of_this_step()
    if meta.status is not RunStatus.running or meta.orchestrator == worker:
        return meta

    def record(m: RunMeta) -> None:
        if m.status is RunStatus.running:
            m.orchestrator = worker

    return store.update_meta(meta.run_id, record)


def open_run(context: AssetExecutionContext, store: LocalRunStore) -> RunMeta:
    """The run record of the step's partition, checked before the step writes anything: a malformed
    run_id, or a run with no record and no start request, fails the step in one line (writing
    nothing, and forgetting the partition when no other Dagster run used it). The Dagster run is
    tagged with the run's identity where it lacks it (a run launched from the UI)."""
    run_id = context.partition_key
    try:
        parse_run_id(run_id)
    except InvalidRunId as exc:
        _refuse(context, str(exc))
    meta = (store.read_meta(run_id) if store.exists(store.meta_key(run_id))
            else _created_from_request(context, store, run_id))
    meta = _record_orchestrator(store, meta)
    identity = run_tags(meta)
    present = context.run.tags
    clashing = [f"{name}={present[name]!r} (meta.json: {value!r})" for name, value in identity.items()
                if name in present and present[name] != value]
    if clashing:
        raise Failure(description=f"run {run_id}: the Dagster run {context.run.run_id} is tagged {', '.join(clashing)}")
    missing = {name: value for name, value in identity.items() if name not in present}
    if missing:
        context.instance.add_run_tags(context.run.run_id, missing)
    return meta
