"""calibration_package and the two independent weight fits, state_weights and national_weights."""

from dagster import MetadataValue

from pipeline_assets.materialize import column_schema, stage_asset
from pipeline_assets.stages import ARTIFACTS
from pipeline_assets.steps.calibration import LOG_COLUMNS

LOG_TYPES = {name: {"target": "string", "epoch": "int"}.get(name, "float") for name in LOG_COLUMNS}


def fit_asset(step: str, log: str, description: str):
    """A weight fit: the weights file, and the calibration log (one row per target) beside it."""
    log_file = ARTIFACTS[log].rsplit("/", 1)[1]
    return stage_asset(step, description, kinds={"pytorch"},
                       metadata={f"columns/{log_file}": MetadataValue.table_schema(column_schema(LOG_TYPES))})


calibration_package = stage_asset(
    "calibration_package",
    "Sparse X (targets x household clones) and the target vector; every district has records.",
    kinds={"hdf5"},
)
state_weights = fit_asset("state_weights", "state_calibration_log", "L0 fit against the state and district targets.")
national_weights = fit_asset("national_weights", "national_calibration_log", "L0 fit against the national targets.")
