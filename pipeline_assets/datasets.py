"""source_datasets: the CPS household sample with persons, geography and QRF-imputed variables."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.code_versions import code_version
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from pipeline_assets.steps import datasets as datasets_step
from pipeline_assets.steps import geography, h5io
from resources.dagster_resources import RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=code_version(datasets_step, geography, h5io),
    group_name="release",
    kinds={"hdf5"},
)
def source_datasets(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource
) -> MaterializeResult:
    """Real CPS tax units grouped into households; the same seed gives the same bytes."""
    return execute_stage(context, run_store, runtime, "source_datasets", stages.run_datasets, "dataset")
