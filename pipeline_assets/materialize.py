"""What every asset does around its step: resolve the run, guard against skew, time the step in
meta.json, and turn the step's record (files, hashes, figures, identity) into small, typed metadata."""


from pathlib import Path

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, TableColumn, TableSchema, asset

from pipeline_assets import stages
from pipeline_assets.driver import run_step
from pipeline_assets.partitions import run_ids
from pipeline_assets.reuse import StepRecord
from pipeline_assets.run_start import open_run
from pipeline_assets.steps.config import RunConfig
from resources.dagster_resources import CodeResource, ComputeResource, LineageResource, RunStoreResource, RuntimeResource
from resources.run_store import RunMeta
from resources.runtime import RuntimeEnvironment

OWNERS = ["team:microdata"]
SIGNIFICANT_DIGITS = 6


def rounded(value: float) -> float:
    """A figure to SIGNIFICANT_DIGITS significant digits: what a reader compares, not float noise."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def column_schema(types: dict[str, str]) -> TableSchema:
    """A table's columns (name -> type, in the file's order) as Dagster shows them."""
    return TableSchema(columns=[TableColumn(name, kind) for name, kind in types.items()])


def environment_metadata(env: RuntimeEnvironment) -> dict:
    """The runtime environment: a JSON entry plus the fields people filter on (each tracked library's
    version as `lib/NAME`), as text."""
    return {
        "runtime_environment": MetadataValue.json(env.model_dump()),
        "lib/python": env.python_version,
        **{f"lib/{name}": version or "not installed" for name, version in env.library_versions.items()},
        "python_version": env.python_version,
        "compute_pool": env.compute_pool,
        "cloud_region": env.cloud_region,
        "hostname": env.hostname,
        "container_image_digest": env.container_image_digest or f"null ({env.container_image_reason})",
    }


def worker_environment_metadata(pool, env: RuntimeEnvironment) -> dict:
    """The environment where the step's files were made: a remote worker's own report when the step
    ran remotely (with the number of remote calls), else this process's."""
    remote = getattr(pool, "last_environments", [])
    if not remote:
        return environment_metadata(env)
    return {**environment_metadata(remote[0]), "remote_calls": len(remote)}


def file_metadata(path: Path, sha256: str) -> dict:
    return {
        "path": MetadataValue.path(str(path)),
        "uri": MetadataValue.url(path.as_uri()),
        "sha256": sha256,
        "size_bytes": path.stat().st_size,
    }


def identity_metadata(meta: RunMeta, record: StepRecord) -> dict:
    metadata = {
        "run_id": meta.run_id,
        "git_sha": meta.sha,
        "env_id": record.env_id,
        "config_hash": meta.config_hash or "",
        "step_config_hash": record.config_hash,
        "reuse": record.reuse,
    }
    if record.reused_from:
        metadata["reused_from"] = record.reused_from
    return metadata


def figures_metadata(figures: dict) -> dict:
    """Figures as plain numbers so the UI plots them across runs."""
    return {name: (rounded(value) if isinstance(value, float) else int(value)) for name, value in figures.items()}


def stage_metadata(meta: RunMeta, environment: dict, record: StepRecord, run_dir: Path, primary: str) -> dict:
    metadata = {
        **identity_metadata(meta, record),
        **file_metadata(run_dir / primary, record.outputs[primary]),
        **figures_metadata(record.figures),
        **environment,
    }
    if len(record.outputs) > 1:
        metadata["files"] = MetadataValue.json(
            {rel: {"path": str(run_dir / rel), "sha256": sha} for rel, sha in record.outputs.items()}
        )
    return metadata


def execute_stage(
    context: AssetExecutionContext,
    run_store: RunStoreResource,
    runtime: RuntimeResource,
    code: CodeResource,
    compute: ComputeResource,
    lineage: LineageResource,
    step: str,
    primary: str,
) -> MaterializeResult:
    """Run (or reuse) one release stage for the partition's run_id and describe what it wrote."""
    store = run_store.store()
    run_id = context.partition_key
    meta = open_run(context, store)
    config = RunConfig.model_validate(meta.config)
    env = runtime.capture()
    pool = compute.pool(meta.sha)
    _result, record = run_step(
        store, run_id, step, lambda: stages.execute_step(store, run_id, step, config, env, pool), code.running_sha(),
        lineage.lineage(store),
    )
    if record.reused_from:
        context.log.info(f"{step}: reused the output of run {record.reused_from}")
    run_dir = store.path(store.run_key(run_id))
    return MaterializeResult(metadata=stage_metadata(meta, worker_environment_metadata(pool, env), record, run_dir, primary))


def stage_asset(step: str, description: str, kinds: set[str], metadata: dict | None = None, deps: list[AssetKey] | None = None):
    """The asset of one single-output stage: partitioned by run_id, versioned by its step's source,
    depending on the stages whose outputs its step reads (`deps` where those are not one asset
    each); `metadata` describes its tables."""

    @asset(
        name=step,
        partitions_def=run_ids,
        code_version=stages.STEPS[step].code_version,
        group_name="release",
        deps=deps or [AssetKey(upstream) for upstream in stages.STEP_INPUTS[step]],
        kinds=kinds,
        description=description,
        owners=OWNERS,
        tags={"stage": step, "layer": "release"},
        metadata=metadata,
    )
    def stage(
        context: AssetExecutionContext,
        run_store: RunStoreResource,
        runtime: RuntimeResource,
        code: CodeResource,
        compute: ComputeResource,
        lineage: LineageResource,
    ) -> MaterializeResult:
        return execute_stage(context, run_store, runtime, code, compute, lineage, step, stages.STEPS[step].primary_output)

    return stage
