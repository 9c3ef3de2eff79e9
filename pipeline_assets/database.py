"""policy_data_db: the SQLite targets database, built by ETL from the packaged public statistics."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.code_versions import code_version
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from pipeline_assets.steps import database as database_step
from pipeline_assets.steps import geography
from resources.dagster_resources import RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=code_version(database_step, geography),
    group_name="release",
    kinds={"sqlite"},
)
def policy_data_db(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource
) -> MaterializeResult:
    """Targets (Census ACS, IRS SOI, USDA SNAP) by geography, validated before it is published."""
    return execute_stage(context, run_store, runtime, "policy_data_db", stages.run_database, "database")
