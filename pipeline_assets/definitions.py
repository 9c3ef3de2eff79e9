"""The code location: every asset, check, job and resource of the release pipeline."""

from dagster import Definitions, load_assets_from_modules

from pipeline_assets import calibration, database, datasets, diagnostics, local_areas
from pipeline_assets.checks import ALL_CHECKS
from pipeline_assets.jobs import release_job
from resources.dagster_resources import CodeResource, ComputeResource, RunStoreResource, RuntimeResource

defs = Definitions(
    assets=load_assets_from_modules([database, datasets, calibration, local_areas, diagnostics]),
    asset_checks=ALL_CHECKS,
    jobs=[release_job],
    resources={
        "run_store": RunStoreResource(),
        "compute": ComputeResource(),
        "runtime": RuntimeResource(),
        "code": CodeResource(),
    },
)
