"""The git sensor: each new commit on the watched branch becomes one release run.

A tick only asks: a new run_id partition and a run request whose tags pin the commit the tick saw
(so the run keeps that SHA even if the branch moves before it starts). It writes nothing, so a
previewed tick leaves no trace; the run's first step creates its record from those tags
(pipeline_assets/run_start.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from pipeline_assets.identity import make_run_id, package_version
from pipeline_assets.jobs import RELEASE_JOB, job_run_config
from pipeline_assets.partitions import run_ids
from pipeline_assets.run_start import start_request_tags
from pipeline_assets.steps.config import config_for_scale
from resources.dagster_resources import RunStoreResource
from resources.git import SOURCE_ROOT, GitError, code_state, resolve_sha
from resources.run_store import utcnow

WATCH_REPO_VARIABLE = "PIPELINE_WATCH_REPO"
WATCH_BRANCH_VARIABLE = "PIPELINE_WATCH_BRANCH"
WATCH_SCALE_VARIABLE = "PIPELINE_WATCH_SCALE"


def build_git_sensor(repo: str | os.PathLike, branch: str = "main", scale: str = "small") -> SensorDefinition:
    """A sensor watching `branch` of `repo`; runs are made at `scale` (checked now, not at the first tick).

    Stopped by default: `dagster dev` must not start releases until someone turns it on.
    """
    repo = Path(repo)
    config = config_for_scale(scale)

    @sensor(
        name="git_commit_sensor",
        job_name=RELEASE_JOB,
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.STOPPED,
        description=f"A new commit on {branch} of {repo} starts a {scale} release run.",
    )
    def git_commit_sensor(context: SensorEvaluationContext, run_store: RunStoreResource):
        try:
            sha = resolve_sha(repo, branch)
            # Pin the SHA the tick saw, not whatever the branch names by now.
            code = None if sha == context.cursor else dataclasses.replace(code_state(repo, sha), branch=branch)
        except GitError as exc:
            context.log.error(f"git sensor cannot read branch {branch} of {repo}: {exc}")
            return SkipReason(f"cannot read branch {branch} of {repo}: {exc}")
        if code is None:
            return SkipReason(f"no new commit on {branch} (still {sha[:8]})")
        run_id = make_run_id(package_version(), sha, utcnow())
        context.log.info(f"new commit {sha[:8]} on {branch}: run {run_id}")
        return SensorResult(
            run_requests=[
                RunRequest(
                    partition_key=run_id,
                    run_key=sha,
                    # The root travels in the run config: step processes need not share our environment.
                    run_config=job_run_config(run_store.store(), None),
                    tags=start_request_tags(run_id, code, config),
                )
            ],
            dynamic_partitions_requests=[run_ids.build_add_request([run_id])],
            cursor=sha,
        )

    return git_commit_sensor


git_commit_sensor = build_git_sensor(
    os.environ.get(WATCH_REPO_VARIABLE) or SOURCE_ROOT,
    os.environ.get(WATCH_BRANCH_VARIABLE) or "main",
    os.environ.get(WATCH_SCALE_VARIABLE) or "small",
)
