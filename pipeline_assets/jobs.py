"""The release job: the whole graph for one run_id partition, on the multiprocess executor."""

from dagster import AssetSelection, define_asset_job, multiprocess_executor


RELEASE_JOB = "release"

# forkserver: each step process forks from a server that has already imported the code location and
# the fit's libraries (torch, l0), instead of starting a cold interpreter per step.
release_executor = multiprocess_executor.configured({
    "start_method": {"forkserver": {"preload_modules": ["pipeline_assets.definitions", "pipeline_assets.steps.weights"]}},
    "max_concurrent": 2,
})

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
