"""Pure release steps: no Dagster import, so the same code runs locally, on Modal and in tests."""
