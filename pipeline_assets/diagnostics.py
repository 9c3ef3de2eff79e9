"""run_diagnostics: calibration logs of both fits, validation per area, and the run's config."""

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from resources.dagster_resources import CodeResource, RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=stages.CODE_VERSIONS["run_diagnostics"],
    group_name="release",
    deps=[AssetKey("calibration_package"), AssetKey("state_weights"), AssetKey("national_weights")],
    kinds={"csv"},
)
def run_diagnostics(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource, code: CodeResource
) -> MaterializeResult:
    """Per-area validation (target vs weighted estimate) and the calibration log, for review."""
    return execute_stage(context, run_store, runtime, code, "run_diagnostics", f"{stages.DIAGNOSTICS}/validation.csv")
