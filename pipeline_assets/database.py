"""policy_data_db: the SQLite targets database, built by ETL from the packaged public statistics."""

from pipeline_assets.materialize import stage_asset

policy_data_db = stage_asset(
    "policy_data_db",
    "Targets (Census ACS, IRS SOI, USDA SNAP) by geography, validated before it is published.",
    kinds={"sqlite"},
)
