"""calibration_package and the two independent weight fits, state_weights and national_weights."""

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from resources.dagster_resources import CodeResource, RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=stages.CODE_VERSIONS["calibration_package"],
    group_name="release",
    deps=[AssetKey("policy_data_db"), AssetKey("source_datasets")],
    kinds={"hdf5"},
)
def calibration_package(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource, code: CodeResource
) -> MaterializeResult:
    """Sparse X (targets x household clones) and the target vector; every district has records."""
    return execute_stage(context, run_store, runtime, code, "calibration_package", stages.ARTIFACTS["calibration_package"])


def weights_asset(step: str, description: str):
    @asset(
        name=step,
        partitions_def=run_ids,
        code_version=stages.CODE_VERSIONS[step],
        group_name="release",
        deps=[AssetKey("calibration_package")],
        kinds={"pytorch"},
        description=description,
    )
    def fitted_weights(
        context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource, code: CodeResource
    ) -> MaterializeResult:
        return execute_stage(context, run_store, runtime, code, step, stages.ARTIFACTS[step])

    return fitted_weights


state_weights = weights_asset("state_weights", "L0 fit against the state and district targets.")
national_weights = weights_asset("national_weights", "L0 fit against the national targets.")
