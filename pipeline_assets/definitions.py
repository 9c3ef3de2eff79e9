"""The code location: every asset, check, job and resource of the release pipeline."""

import os

from dagster import Definitions, load_assets_from_modules

from pipeline_assets import calibration, database, datasets, diagnostics, local_areas, model_validation, release
from pipeline_assets.checks import ALL_CHECKS
from pipeline_assets.jobs import promote_job, release_job
from resources.dagster_resources import (
    CodeResource,
    ComputeResource,
    LineageResource,
    ReleaseBackendsResource,
    RunStoreResource,
    RuntimeResource,
)
from sensors.git_sensor import git_commit_sensor
from sensors.run_status import release_failure_sensor, release_success_sensor

defs = Definitions(
    assets=load_assets_from_modules([database, datasets, calibration, local_areas, diagnostics, model_validation, release]),
    asset_checks=ALL_CHECKS,
    jobs=[release_job, promote_job],
    sensors=[git_commit_sensor, release_success_sensor, release_failure_sensor],
    resources={
        "run_store": RunStoreResource(),
        "compute": ComputeResource(
            backend=os.environ.get("PIPELINE_COMPUTE", "local"), gpu=os.environ.get("PIPELINE_MODAL_GPU") or "A100"
        ),
        "runtime": RuntimeResource(),
        "code": CodeResource(),
        "lineage": LineageResource(),
        "release_backends": ReleaseBackendsResource(
            gcs_bucket=os.environ.get("PIPELINE_GCS_BUCKET"),
            gcs_project=os.environ.get("PIPELINE_GCS_PROJECT"),
            hf_repo=os.environ.get("PIPELINE_HF_REPO"),
            registry=os.environ.get("PIPELINE_REGISTRY", "local"),
        ),
    },
)
