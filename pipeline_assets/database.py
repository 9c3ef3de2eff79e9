"""policy_data_db: the SQLite targets database, built by ETL from the packaged public statistics."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from resources.dagster_resources import CodeResource, RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=stages.CODE_VERSIONS["policy_data_db"],
    group_name="release",
    kinds={"sqlite"},
)
def policy_data_db(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource, code: CodeResource
) -> MaterializeResult:
    """Targets (Census ACS, IRS SOI, USDA SNAP) by geography, validated before it is published."""
    return execute_stage(context, run_store, runtime, code, "policy_data_db", stages.ARTIFACTS["policy_data_db"])
