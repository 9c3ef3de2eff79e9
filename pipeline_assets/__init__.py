"""The US microdata release as a Dagster code location (`dagster ... -m pipeline_assets`).

`defs` is loaded on first use (PEP 562), so that importing one module of the package (the CLI, a
step, a sensor) does not build the whole code location first, and nothing imports in a circle.
"""

__all__ = ["defs"]


def __getattr__(name: str):
    if name == "defs":
        from pipeline_assets.definitions import defs

        return defs
    raise AttributeError(f"module 'pipeline_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "defs"]
