"""run_diagnostics: calibration logs of both fits, validation per area, and the run's config."""

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.code_versions import code_version
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from pipeline_assets.steps import diagnostics as diagnostics_step
from resources.dagster_resources import RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=code_version(diagnostics_step),
    group_name="release",
    deps=[AssetKey("calibration_package"), AssetKey("state_weights"), AssetKey("national_weights")],
    kinds={"csv"},
)
def run_diagnostics(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource
) -> MaterializeResult:
    """Per-area validation (target vs weighted estimate) and the calibration log, for review."""
    return execute_stage(context, run_store, runtime, "run_diagnostics", stages.run_diagnostics, "validation")
