"""policy_data_db: the SQLite targets database, built by ETL from the packaged public statistics."""

import sqlite3

from dagster import MetadataValue

from pipeline_assets.materialize import column_schema, stage_asset
from pipeline_assets.steps.database import SCHEMA


def table_columns() -> dict[str, dict[str, str]]:
    """table -> {column: SQL type} of the database's tables, read from the step's own schema."""
    with sqlite3.connect(":memory:") as conn:
        conn.executescript(SCHEMA)
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        return {table: {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({table})")} for table in tables}


TABLE_COLUMNS = table_columns()

policy_data_db = stage_asset(
    "policy_data_db",
    "Targets (Census ACS, IRS SOI, USDA SNAP) by geography, validated before it is published.",
    kinds={"sqlite"},
    metadata={
        "dagster/column_schema": column_schema(TABLE_COLUMNS["targets"]),
        **{f"columns/{table}": MetadataValue.table_schema(column_schema(columns)) for table, columns in TABLE_COLUMNS.items()},
    },
)
