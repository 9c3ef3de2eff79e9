"""staged_release and promotion: what a release would publish, and the deliberate act of publishing it.

promotion is outside the release job: it is materialized on purpose, for a new version partition, from
the UI (with the run_id in its config) or with `usdata-pipeline promote RUN_ID --version X.Y.Z`. Its
partitions are the registry's versions, so an unpromoted run is not a missing promotion.
"""

from typing import Iterator

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from pipeline_assets import promotion as promotion_logic
from pipeline_assets.code_versions import code_version
from pipeline_assets.driver import step_timing
from pipeline_assets.local_areas import AREA_KEYS
from pipeline_assets.materialize import OWNERS
from pipeline_assets.partitions import RELEASE_VERSIONS, release_versions, run_ids
from pipeline_assets.run_start import open_run
from resources.compute import mark_step_process
from resources.dagster_resources import ReleaseBackendsResource, RunStoreResource
from resources.registry import InvalidVersion, VersionManifest

PROMOTION_CODE_VERSION = code_version("pipeline_assets.promotion")


@asset(
    partitions_def=run_ids,
    code_version=PROMOTION_CODE_VERSION,
    group_name="release",
    # Every file it stages is an edge: the 488 areas, national_h5, run_diagnostics and model_validation (whose steps
    # comes after the fits, so the earlier artifacts are upstream of it too). The price of the true
    # lineage: Dagster reads each edge's data version at the step's end, one query per edge.
    deps=[*AREA_KEYS, AssetKey("run_diagnostics"), AssetKey("model_validation")],
    kinds={"folder"},
    owners=OWNERS,
    tags={"stage": "staged_release", "layer": "release"},
    description="staging/{run_id}/: the run's files as a release would publish them, with a manifest of their "
                "sha256; materialized only once all_areas_present passes.",
)
def staged_release(context: AssetExecutionContext, run_store: RunStoreResource) -> MaterializeResult:
    """Hard-link the run's published files and its TRO under staging/{run_id}/."""
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


PROMOTION_KEY = AssetKey("promotion")
REFUSED_TAG = "usdata/promotion_refused"  # on a promote run that was refused: its one line


class PromotionConfig(Config):
    run_id: str = Field(description="The completed, staged run to publish: its run_id partition, e.g. "
                                    "1.2.0-a1b2c3d4-20261201T120000Z.")
    allow_dirty: bool = Field(default=False, description="Promote a run made from a dirty work tree (its diff's "
                                                         "sha256 stays in the registry entry's run record).")


def promotion_metadata(entry: VersionManifest, current: str | None) -> dict:
    """What a registry entry shows on the promotion partition of its version."""
    return {
        "version": entry.version,
        "run_id": entry.run_id,
        "git_sha": entry.git_sha,
        "tro_sha256": entry.tro_sha256,
        "current": current or "",
        "roll_back_version": entry.roll_back_version or "",
        "gcs_bucket": entry.gcs.bucket if entry.gcs else "",
        "hf_commit": entry.hf.commit if entry.hf else "",
        "registry_entry": MetadataValue.json(entry.model_dump(mode="json")),
    }


@asset(
    partitions_def=release_versions,
    code_version=PROMOTION_CODE_VERSION,
    group_name="release",
    # A version publishes one run, chosen by config: any run's staged release can be its input.
    deps=[AssetDep(staged_release, partition_mapping=AllPartitionMapping())],
    kinds={"json"},
    owners=OWNERS,
    tags={"stage": "promotion", "layer": "release"},
    output_required=False,
    description="The version registry: one partition per release version (semver), each the registry entry of "
                "the run it published. Materialize a new version partition with config run_id to promote that run.",
)
def promotion(
    context: AssetExecutionContext,
    config: PromotionConfig,
    run_store: RunStoreResource,
    release_backends: ReleaseBackendsResource,
) -> Iterator[MaterializeResult]:
    """Publish config.run_id's staged release as the partition's version on every configured backend,
    then write the registry.

    A refusal (a run that cannot be promoted, a version already registered or not semver) is not a
    failed asset: nothing is published or materialized, its one line is logged and tagged on the
    run, and a version partition the registry does not hold is removed again. A backend that fails
    mid-way fails the step: that version's promotion did fail, and running it again completes it.
    """
    mark_step_process("promotion")  # a killed run worker takes its publishing step with it
    store = run_store.store()
    version = context.partition_key
    registry = release_backends.registry_backend(store)
    try:
        entry = promotion_logic.promote(
            store, config.run_id, version, release_backends.publishers(store), registry, config.allow_dirty
        )
    except (promotion_logic.PromotionRefused, InvalidVersion) as exc:
        line = str(exc).strip().splitlines()[0]
        context.log.error(f"promotion refused: {line}")
        context.instance.add_run_tags(context.run.run_id, {REFUSED_TAG: line})
        if version not in {entry.version for entry in registry.read().versions}:
            context.instance.delete_dynamic_partition(RELEASE_VERSIONS, version)
        return
    yield MaterializeResult(metadata=promotion_metadata(entry, registry.read().current))


def record_rollback(instance, entry: VersionManifest, current: str | None) -> None:
    """A rollback registers a version outside any run: it is reported as that version's promotion
    partition, so the registry's versions are all there to browse."""
    if not instance.has_dynamic_partition(RELEASE_VERSIONS, entry.version):
        instance.add_dynamic_partitions(RELEASE_VERSIONS, [entry.version])
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key=PROMOTION_KEY,
        partition=entry.version,
        description=f"rollback: the files of {entry.roll_back_version}",
        metadata=promotion_metadata(entry, current),
    ))
