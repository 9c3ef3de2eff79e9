"""The release job: the whole graph for one run_id partition, on the multiprocess executor."""

import multiprocessing
import multiprocessing.forkserver

from dagster import AssetSelection, define_asset_job, multiprocess_executor


RELEASE_JOB = "release"

# forkserver: each step process forks from a server that has already imported the code location and
# the fit's libraries (torch, l0), instead of starting a cold interpreter per step.
# Dagster imports its instance storage lazily: preloaded too, or every step process spends ~0.8 s
# importing it.
STEP_PRELOAD = [
    "pipeline_assets.definitions",
    "pipeline_assets.steps.weights",
    "quantile_forest",  # imported where the datasets are built (~0.9 s)
    "pipeline_assets.instance_storage",
    "dagster._core.instance.factory",
    "dagster._core.secrets.loader",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.runs.sqlite",
    "dagster._core.storage.schedules.sqlite",
    "dagster._core.storage.migration.utils",
    "alembic.command",
]
release_executor = multiprocess_executor.configured({
    "start_method": {"forkserver": {"preload_modules": STEP_PRELOAD}},
    "max_concurrent": 2,
})


def start_step_server() -> None:
    """Start the executor's forkserver before the run is created, so its imports (seconds: the code
    location, torch) overlap with Dagster writing the run's planned events; the executor then forks
    its step processes from this same server (one per process, preloading what the executor would)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["dagster._core.executor.multiprocess", *STEP_PRELOAD]
    )
    multiprocessing.forkserver.ensure_running()


PROMOTE_JOB = "promote"

release_job = define_asset_job(
    RELEASE_JOB,
    selection=AssetSelection.all() - AssetSelection.assets("promotion"),
    executor_def=release_executor,
    description="One whole release: database, datasets, calibration, both fits, 489 area files, diagnostics.",
)

promote_job = define_asset_job(
    PROMOTE_JOB,
    selection=AssetSelection.assets("promotion"),
    description="Promote one run_id partition to a release version (config: version, allow_dirty).",
)
