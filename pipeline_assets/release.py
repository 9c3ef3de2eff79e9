"""staged_release and promotion: what a release would publish, and the deliberate act of publishing it.

promotion is outside the release job: it is materialized on purpose, from the UI (with its config)
or with `usdata-pipeline promote RUN_ID --version X.Y.Z`.
"""

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset

from pipeline_assets import promotion as promotion_logic
from pipeline_assets.code_versions import code_version
from pipeline_assets.driver import step_timing
from pipeline_assets.local_areas import NATIONAL_KEY
from pipeline_assets.partitions import run_ids
from pipeline_assets.run_start import open_run
from resources.dagster_resources import ReleaseBackendsResource, RunStoreResource


PROMOTION_CODE_VERSION = code_version("pipeline_assets.promotion")


@asset(
    partitions_def=run_ids,
    code_version=PROMOTION_CODE_VERSION,
    group_name="release",
    # One edge to the area step (through national_h5), not 489: Dagster fetches the data version of
    # every input of a step one query at a time, about 10 ms each on SQLite. stage_release itself
    # refuses a run whose recorded area files are not all there with their hashes.
    deps=[AssetKey("run_diagnostics"), NATIONAL_KEY],
    kinds={"folder"},
)
def staged_release(context: AssetExecutionContext, run_store: RunStoreResource) -> MaterializeResult:
    """staging/{run_id}/: the area files, national file, database, dataset, weights, diagnostics and TRO."""
    store = run_store.store()
    open_run(context, store)
    with step_timing(store, context.partition_key, "staged_release"):
        manifest = promotion_logic.stage_release(store, context.partition_key)
    path = store.path(promotion_logic.staging_key(context.partition_key))
    return MaterializeResult(metadata={
        "run_id": context.partition_key,
        "path": MetadataValue.path(str(path)),
        "files": len(manifest.files),
        "manifest_sha256": promotion_logic.sha256_file(path / promotion_logic.STAGING_MANIFEST),
    })


class PromotionConfig(Config):
    version: str
    allow_dirty: bool = False


@asset(partitions_def=run_ids, code_version=PROMOTION_CODE_VERSION, group_name="release", deps=[staged_release], kinds={"json"})
def promotion(
    context: AssetExecutionContext,
    config: PromotionConfig,
    run_store: RunStoreResource,
    release_backends: ReleaseBackendsResource,
) -> MaterializeResult:
    """Publish the staged run as config.version on every configured backend, then write the registry."""
    store = run_store.store()
    entry = promotion_logic.promote(
        store,
        context.partition_key,
        config.version,
        release_backends.publishers(store),
        release_backends.registry_backend(store),
        config.allow_dirty,
    )
    return MaterializeResult(metadata={
        "run_id": entry.run_id,
        "version": entry.version,
        "git_sha": entry.git_sha,
        "tro_sha256": entry.tro_sha256,
        "gcs_bucket": entry.gcs.bucket if entry.gcs else "",
        "hf_commit": entry.hf.commit if entry.hf else "",
        "registry_entry": MetadataValue.json(entry.model_dump(mode="json")),
    })
