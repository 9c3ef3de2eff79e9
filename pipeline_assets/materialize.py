"""What every asset does around its step: resolve the run, guard against skew, time the step in
meta.json, and turn the step's files and figures into small, typed metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from pipeline_assets.driver import run_step
from pipeline_assets.identity import running_code_sha
from pipeline_assets.steps.config import RunConfig
from pipeline_assets.steps.io import sha256_file
from pipeline_assets.steps.results import StepResult
from resources.dagster_resources import RunStoreResource, RuntimeResource
from resources.run_store import LocalRunStore, RunMeta
from resources.runtime import RuntimeEnvironment

StageWork = Callable[[LocalRunStore, str, RunConfig], StepResult]


def environment_metadata(env: RuntimeEnvironment) -> dict:
    """The runtime environment: a JSON entry plus the few fields people filter on, as text."""
    return {
        "runtime_environment": MetadataValue.json(env.model_dump()),
        "python_version": env.python_version,
        "compute_pool": env.compute_pool,
        "cloud_region": env.cloud_region,
        "hostname": env.hostname,
        "container_image_digest": env.container_image_digest or f"null ({env.container_image_reason})",
    }


def file_metadata(path: Path, sha256: str | None = None) -> dict:
    return {
        "path": MetadataValue.path(str(path)),
        "uri": MetadataValue.url(path.as_uri()),
        "sha256": sha256 or sha256_file(path),
        "size_bytes": path.stat().st_size,
    }


def run_metadata(meta: RunMeta) -> dict:
    return {"run_id": meta.run_id, "git_sha": meta.sha}


def figures_metadata(figures: dict) -> dict:
    """Figures as plain numbers so the UI plots them across runs."""
    return {name: (float(value) if isinstance(value, float) else int(value)) for name, value in figures.items()}


def stage_metadata(meta: RunMeta, env: RuntimeEnvironment, result: StepResult, primary: str) -> dict:
    outputs = {role: path for role, path in result.outputs.items() if path.is_file()}
    hashes = {role: sha256_file(path) for role, path in outputs.items()}
    metadata = {
        **run_metadata(meta),
        **file_metadata(result.outputs[primary], hashes[primary]),
        **figures_metadata(result.figures),
        **environment_metadata(env),
    }
    metadata["reuse"] = "reused" if result.reused_from else "computed"
    if result.reused_from:
        metadata["reused_from"] = result.reused_from
    if len(outputs) > 1:
        metadata["files"] = MetadataValue.json(
            {role: {"path": str(path), "sha256": hashes[role]} for role, path in outputs.items()}
        )
    return metadata


def execute_stage(
    context: AssetExecutionContext,
    run_store: RunStoreResource,
    runtime: RuntimeResource,
    step: str,
    work: StageWork,
    primary: str,
) -> MaterializeResult:
    """Run one release stage for the partition's run_id and describe what it wrote."""
    store = run_store.store()
    run_id = context.partition_key
    meta = store.read_meta(run_id)
    config = RunConfig.model_validate(meta.config)
    result = run_step(store, run_id, step, lambda: work(store, run_id, config), running_code_sha())
    return MaterializeResult(metadata=stage_metadata(meta, runtime.capture(), result, primary))
