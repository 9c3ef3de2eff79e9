"""model_validation: PolicyEngine-US loads a sample of the run's area files and computes on them."""

from dagster import AssetKey, MetadataValue

from pipeline_assets.local_areas import AREA_KEYS
from pipeline_assets.materialize import column_schema, stage_asset
from pipeline_assets.steps.model_validation import COMPARISON_COLUMNS

model_validation = stage_asset(
    "model_validation",
    "PolicyEngine-US (in its own pinned environment) loads the configured sample of area files (default AL, "
    "AL-01 and NYC; `all` for every file) and computes persons, households, income tax, EITC, SNAP and household "
    "net income on each, plotted per area across runs. Fails when the model cannot load a file or counts other "
    "persons than the release weighted; compared with the population, SNAP-household and EITC targets in "
    "diagnostics/model_comparison.csv.",
    kinds={"json", "csv"},
    metadata={"columns/model_comparison.csv": MetadataValue.table_schema(column_schema(
        {name: "string" if name in ("area", "measure") else "float" for name in COMPARISON_COLUMNS}))},
    # It reads the sampled area files (any of them, by configuration) and the targets they are compared with.
    deps=[AssetKey("policy_data_db"), *AREA_KEYS],
)
