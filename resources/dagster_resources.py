"""Dagster resources: each wraps one system and is chosen by configuration, never by the assets."""

from __future__ import annotations

from dagster import ConfigurableResource

from pipeline_assets.identity import running_code_sha
from resources.compute import LocalPool
from resources.run_store import LocalRunStore
from resources.runtime import RuntimeEnvironment, capture


class RunStoreResource(ConfigurableResource):
    """The run store; root defaults to $PIPELINE_STORE, else ./.pipeline-data."""

    root: str | None = None

    def store(self) -> LocalRunStore:
        return LocalRunStore(self.root)


class CodeResource(ConfigurableResource):
    """The SHA of the code the steps run: configured (an image's pinned SHA), else $PIPELINE_CODE_SHA or git."""

    sha: str | None = None

    def running_sha(self) -> str:
        return self.sha or running_code_sha()


class ComputeResource(ConfigurableResource):
    """Where the 488 areas are built: a local process pool of `workers` processes."""

    workers: int = 2
    start_method: str = "forkserver"

    def pool(self) -> LocalPool:
        return LocalPool(self.workers, self.start_method)


class RuntimeResource(ConfigurableResource):
    """Captures the runtime environment; pool and region come from here or from platform variables."""

    compute_pool: str | None = None
    cloud_region: str | None = None

    def capture(self) -> RuntimeEnvironment:
        return capture(compute_pool=self.compute_pool, cloud_region=self.cloud_region)
