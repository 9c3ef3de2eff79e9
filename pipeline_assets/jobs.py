"""The release job: the whole graph for one run_id partition, on the multiprocess executor."""

from dagster import AssetSelection, define_asset_job, multiprocess_executor

from resources.lineage import LineageSettings
from resources.run_store import LocalRunStore

RELEASE_JOB = "release"

# forkserver: each step process forks from a server that has already imported the code location and
# the fit's libraries (torch, l0), instead of starting a cold interpreter per step.
STEP_PRELOAD = [
    "pipeline_assets.definitions",
    "pipeline_assets.steps.weights",
    "quantile_forest",  # imported where the datasets are built (~0.9 s)
    "alembic.command",  # imported by Dagster's SQLite storage, which each step process opens
]
release_executor = multiprocess_executor.configured({
    "start_method": {"forkserver": {"preload_modules": STEP_PRELOAD}},
    "max_concurrent": 2,
})

# The production instance limits concurrent runs by these tags.
JOB_TAG = "usdata/job"

PROMOTE_JOB = "promote"

release_job = define_asset_job(
    RELEASE_JOB,
    selection=AssetSelection.all() - AssetSelection.assets("promotion"),
    executor_def=release_executor,
    tags={JOB_TAG: RELEASE_JOB},
    description="One whole release: database, datasets, calibration, both fits, 489 area files, diagnostics.",
)

promote_job = define_asset_job(
    PROMOTE_JOB,
    selection=AssetSelection.assets("promotion"),
    tags={JOB_TAG: PROMOTE_JOB},
    description="Promote one run_id partition to a release version (config: version, allow_dirty).",
)


def job_run_config(store: LocalRunStore, running_sha: str | None, compute: dict | None = None, lineage: dict | None = None) -> dict:
    """Resources configured explicitly, not through the environment: the run executes in a process
    the instance's run launcher starts, whose environment is not the caller's. Dagster's console log stays at warnings (the UI has it all).
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
