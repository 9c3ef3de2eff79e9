"""Dagster resources: each wraps one system and is chosen by configuration, never by the assets."""

from __future__ import annotations

from dagster import ConfigurableResource

from resources.compute import LocalPool
from resources.git import running_code_sha
from resources.lineage import Lineage, LineageSettings
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
    """Where the fanned-out work runs: `local` (a process pool of `workers`, the default) or `modal`
    (the deployed app: `workers` parallel calls; the fit's GPU type is `gpu`)."""

    backend: str = "local"  # local | modal
    workers: int = 2
    start_method: str | None = None  # fork where the platform has it, else forkserver
    gpu: str = "A100"

    def pool(self, pinned_sha: str | None = None):
        if self.backend == "modal":
            from resources.modal_compute import ModalCompute

            return ModalCompute(workers=self.workers, gpu=self.gpu, pinned_sha=pinned_sha)
        if self.backend != "local":
            raise ValueError(f"unknown compute backend {self.backend!r}: expected 'local' or 'modal'")
        return LocalPool(self.workers, self.start_method)


class RuntimeResource(ConfigurableResource):
    """Captures the runtime environment; pool and region come from here or from platform variables."""

    compute_pool: str | None = None
    cloud_region: str | None = None

    def capture(self) -> RuntimeEnvironment:
        return capture(compute_pool=self.compute_pool, cloud_region=self.cloud_region)


class LineageResource(ConfigurableResource):
    """Where the steps' OpenLineage events go: `transport` file (default: {store}/lineage, or
    `directory`), http (to `url`) or off; unset fields from PIPELINE_LINEAGE / OPENLINEAGE_URL. The
    API key is never configuration: it is read from OPENLINEAGE_API_KEY."""

    transport: str | None = None
    url: str | None = None
    directory: str | None = None

    def lineage(self, store: LocalRunStore) -> Lineage:
        return Lineage(LineageSettings.resolve(self.transport, self.url, self.directory), store.root)


class ReleaseBackendsResource(ConfigurableResource):
    """Where promotion publishes and which registry it writes; the choice is configuration.

    The local store's production/ and version_manifest.json by default; a GCS bucket (through
    dagster-gcp) and a Hugging Face repo (huggingface_hub reads HF_TOKEN itself) when named.
    """

    local: bool = True
    gcs_bucket: str | None = None
    gcs_project: str | None = None
    hf_repo: str | None = None
    registry: str = "local"  # local | gcs

    def publishers(self, store: LocalRunStore) -> dict:
        from resources.publishers import GcsPublisher, HfPublisher, LocalPublisher

        chosen = {}
        if self.local:
            chosen["local"] = LocalPublisher(store.root)
        if self.gcs_bucket:
            chosen["gcs"] = GcsPublisher(self._gcs_client(), self.gcs_bucket)
        if self.hf_repo:
            from huggingface_hub import HfApi

            chosen["hf"] = HfPublisher(HfApi(), self.hf_repo)
        return chosen

    def registry_backend(self, store: LocalRunStore):
        from resources.registry import GcsRegistry, LocalRegistry

        if self.registry == "gcs":
            if not self.gcs_bucket:
                raise ValueError("registry 'gcs' needs gcs_bucket (PIPELINE_GCS_BUCKET)")
            return GcsRegistry(self._gcs_client(), self.gcs_bucket)
        if self.registry != "local":
            raise ValueError(f"unknown registry backend {self.registry!r}: expected 'local' or 'gcs'")
        return LocalRegistry.in_store(store.root)

    def _gcs_client(self):
        from dagster_gcp import GCSResource

        return GCSResource(project=self.gcs_project).get_client()
