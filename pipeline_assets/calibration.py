"""calibration_package and the two independent weight fits, state_weights and national_weights."""

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, asset

from pipeline_assets import stages
from pipeline_assets.code_versions import code_version
from pipeline_assets.materialize import execute_stage
from pipeline_assets.partitions import run_ids
from pipeline_assets.steps import calibration as calibration_step
from pipeline_assets.steps import weights as weights_step
from resources.dagster_resources import RunStoreResource, RuntimeResource


@asset(
    partitions_def=run_ids,
    code_version=code_version(calibration_step),
    group_name="release",
    deps=[AssetKey("policy_data_db"), AssetKey("source_datasets")],
    kinds={"hdf5"},
)
def calibration_package(
    context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource
) -> MaterializeResult:
    """Sparse X (targets x household clones) and the target vector; every district has records."""
    return execute_stage(
        context, run_store, runtime, "calibration_package", stages.run_calibration_package, "package"
    )


def weights_asset(step: str, description: str):
    @asset(
        name=step,
        partitions_def=run_ids,
        code_version=code_version(weights_step, calibration_step),
        group_name="release",
        deps=[AssetKey("calibration_package")],
        kinds={"pytorch"},
        description=description,
    )
    def fitted_weights(
        context: AssetExecutionContext, run_store: RunStoreResource, runtime: RuntimeResource
    ) -> MaterializeResult:
        return execute_stage(
            context, run_store, runtime, step, lambda store, run_id, config: stages.run_fit(store, run_id, config, step), "weights"
        )

    return fitted_weights


state_weights = weights_asset("state_weights", "L0 fit against the state and district targets.")
national_weights = weights_asset("national_weights", "L0 fit against the national targets.")
