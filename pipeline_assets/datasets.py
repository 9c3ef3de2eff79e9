"""source_datasets: the CPS household sample with persons, geography and QRF-imputed variables."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from resources.dagster_resources import CodeResource, RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=stages.CODE_VERSIONS["source_datasets"],
    group_name="release",
    kinds={"hdf5"},
)
def source_datasets(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource, code: CodeResource
) -> MaterializeResult:
    """Real CPS tax units grouped into households; the same seed gives the same bytes."""
    return execute_stage(context, run_store, runtime, code, "source_datasets", stages.ARTIFACTS["source_datasets"])
