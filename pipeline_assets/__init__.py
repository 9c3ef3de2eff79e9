"""The US microdata release as a Dagster code location (`dagster ... -m pipeline_assets`)."""

from pipeline_assets.definitions import defs

__all__ = ["defs"]
