"""run_diagnostics: calibration logs of both fits, validation per area, and the run's config."""

from dagster import MetadataValue

from pipeline_assets.calibration import LOG_TYPES
from pipeline_assets.materialize import column_schema, stage_asset
from pipeline_assets.steps.diagnostics import VALIDATION_COLUMNS

LABELS = ("area", "level", "variable", "stratum")  # the text columns of validation.csv; the rest are figures
VALIDATION_TYPES = {name: "string" if name in LABELS else "float" for name in VALIDATION_COLUMNS}

run_diagnostics = stage_asset(
    "run_diagnostics",
    "Per-area validation (target vs weighted estimate) and the calibration log, for review.",
    kinds={"csv"},
    metadata={
        "dagster/column_schema": column_schema(VALIDATION_TYPES),
        # both fits' logs, one after the other, each row naming its fit (local or national)
        "columns/calibration_log.csv": MetadataValue.table_schema(column_schema({**LOG_TYPES, "fit": "string"})),
    },
)
