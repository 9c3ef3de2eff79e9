"""The runtime environment of the process running a step, captured at every step.

Only named, non-secret variables are read; the environment is never copied wholesale, so no token,
key or credential value can end up in metadata, a TRO, a log or meta.json.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

TRACKED_LIBRARIES = (
    "numpy", "scipy", "scikit-learn", "quantile-forest", "huggingface_hub", "torch", "l0-python", "h5py",
    "dagster",
)
IMAGE_DIGEST_VARIABLES = ("PIPELINE_IMAGE_DIGEST", "MODAL_IMAGE_ID")
REGION_VARIABLES = ("PIPELINE_CLOUD_REGION", "MODAL_REGION", "CLOUD_REGION")
PROVIDER_VARIABLES = ("PIPELINE_CLOUD_PROVIDER", "MODAL_CLOUD_PROVIDER")
POOL_VARIABLES = ("PIPELINE_COMPUTE_POOL",)
INSTANCE_VARIABLES = ("MODAL_TASK_ID", "PIPELINE_INSTANCE_ID", "POD_NAME", "K8S_POD_NAME")
CI_SHA_VARIABLES = ("GITHUB_SHA", "CI_COMMIT_SHA", "BUILDKITE_COMMIT")


class RuntimeEnvironment(BaseModel):
    model_config = ConfigDict(frozen=True)

    container_image_digest: str | None
    container_image_reason: str | None
    python_version: str
    python_implementation: str
    library_versions: dict[str, str | None]
    os: str
    kernel: str
    architecture: str
    cpu_model: str
    cpu_count: int
    gpu_model: str | None
    cloud_provider: str
    cloud_region: str
    compute_pool: str
    instance_id: str | None
    hostname: str
    ci_git_sha: str | None
    ci_run_url: str | None
    installed_distributions_sha256: str


def _first_set(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Versions from distribution metadata: nothing is imported to learn them."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def installed_distributions_sha256() -> str:
    """sha256 of the installed distributions (their *.dist-info names carry name and version): the
    environment where no image digest exists. Names only, so no metadata file is parsed."""
    names = sorted(
        {entry.name.lower() for folder in map(Path, sys.path) if folder.is_dir() for entry in folder.glob("*.dist-info")}
    )
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_model() -> str | None:
    """The first NVIDIA GPU's name from the driver's /proc entry (cheap: no nvidia-smi call)."""
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text().splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip()
    return None


def _in_container() -> bool:
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def ci_run_url() -> str | None:
    server, repo, run = (os.environ.get(v) for v in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID"))
    if server and repo and run:
        return f"{server}/{repo}/actions/runs/{run}"
    return os.environ.get("CI_PIPELINE_URL") or os.environ.get("BUILDKITE_BUILD_URL")


def capture(compute_pool: str | None = None, cloud_region: str | None = None) -> RuntimeEnvironment:
    """This process's environment; explicit configuration wins over platform variables."""
    digest = _first_set(IMAGE_DIGEST_VARIABLES)
    if digest:
        reason = None
    elif _in_container():
        reason = "in a container, but no image digest variable is set (PIPELINE_IMAGE_DIGEST)"
    else:
        reason = "not running in a container"
    uname = platform.uname()
    return RuntimeEnvironment(
        container_image_digest=digest,
        container_image_reason=reason,
        python_version=platform.python_version(),
        python_implementation=platform.python_implementation(),
        library_versions=library_versions(),
        os=f"{uname.system} {platform.freedesktop_os_release().get('PRETTY_NAME', '') if uname.system == 'Linux' else uname.version}".strip(),
        kernel=uname.release,
        architecture=uname.machine,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        gpu_model=gpu_model(),
        cloud_provider=_first_set(PROVIDER_VARIABLES) or "local",
        cloud_region=cloud_region or _first_set(REGION_VARIABLES) or "local",
        compute_pool=compute_pool or _first_set(POOL_VARIABLES) or "local",
        instance_id=_first_set(INSTANCE_VARIABLES),
        hostname=socket.gethostname(),
        ci_git_sha=_first_set(CI_SHA_VARIABLES),
        ci_run_url=ci_run_url(),
        installed_distributions_sha256=installed_distributions_sha256(),
    )
