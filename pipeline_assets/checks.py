"""Asset checks: artifact hashes re-verified, 488 areas plus national present, calibration quality
(blocking, so a bad fit never reaches the area files), a fit no worse than its provenance class's
history (a warning), and one git SHA across a run's assets."""


from collections.abc import Iterable
from pathlib import Path

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    RunsFilter,
    multi_asset_check,
)

from pipeline_assets import history, stages
from pipeline_assets.local_areas import AREA_KEYS, NATIONAL_KEY
from pipeline_assets.steps import geography
from pipeline_assets.steps.config import RunConfig
from resources.files import sha256_file
from resources.run_store import LocalRunStore

FIT_ERROR = "final_mean_rel_abs_error"  # the fit figure the quality and history checks judge
STAGE_ASSETS = ("policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights", "run_diagnostics")
WEIGHT_ASSETS = ("state_weights", "national_weights")


def latest_metadata(context: AssetCheckExecutionContext, key: AssetKey) -> dict | None:
    """The metadata of the partition's latest materialization of `key`, as plain values."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        return None
    metadata = records[0].asset_materialization.metadata
    return {name: getattr(value, "value", value) for name, value in metadata.items()}


def partition_metadata(context: AssetCheckExecutionContext) -> dict[AssetKey, dict]:
    """The latest materialization metadata of every asset of this partition, in one read per
    Dagster run of the partition (not one query per asset: there are 489 area assets)."""
    runs = context.instance.get_runs(RunsFilter(tags={"dagster/partition": context.partition_key}))
    latest: dict[AssetKey, tuple[float, dict]] = {}
    for run in runs:
        for record in context.instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            materialization = record.dagster_event.event_specific_data.materialization
            if materialization.partition != context.partition_key:
                continue
            known = latest.get(materialization.asset_key)
            if known is None or record.timestamp >= known[0]:
                values = {name: getattr(value, "value", value) for name, value in materialization.metadata.items()}
                latest[materialization.asset_key] = (record.timestamp, values)
    return {key: values for key, (_, values) in latest.items()}


def recorded_files(metadata: dict) -> dict[str, str]:
    """path -> sha256 of every file a materialization recorded."""
    files = {str(metadata["path"]): metadata["sha256"]}
    for entry in (metadata.get("files") or {}).values():
        files[entry["path"]] = entry["sha256"]
    return files


def hash_mismatches(files: dict[str, str]) -> list[str]:
    problems = []
    for path, expected in sorted(files.items()):
        if not Path(path).is_file():
            problems.append(f"{path}: missing")
        elif (found := sha256_file(path)) != expected:
            problems.append(f"{path}: expected {expected}, found {found}")
    return problems


def verify_hashes(context: AssetCheckExecutionContext, key: AssetKey) -> AssetCheckResult:
    metadata = latest_metadata(context, key)
    if metadata is None:
        return AssetCheckResult(asset_key=key, check_name="sha256_verified", passed=False, description="not materialized")
    problems = hash_mismatches(recorded_files(metadata))
    return AssetCheckResult(
        asset_key=key,
        check_name="sha256_verified",
        passed=not problems,
        metadata={"files_checked": len(recorded_files(metadata)), "mismatches": "\n".join(problems) or "none"},
    )


def failing_checks(evaluations: Iterable[AssetCheckEvaluation], severity=AssetCheckSeverity.ERROR) -> list[str]:
    """'asset:check' of every evaluation that did not pass at `severity`. At ERROR they fail the run;
    at WARN (a fit worse than its class's history) they are reported and the run still completes."""
    return [
        f"{e.asset_key.to_user_string()}:{e.check_name}"
        for e in evaluations
        if not e.passed and e.severity == severity
    ]


UPSTREAM_ASSETS = ("policy_data_db", "source_datasets", "calibration_package")


@multi_asset_check(
    # Blocking on the package only: the fits wait for all three hashes; blocking on the database
    # too would make the package wait for a check that itself waits for the package.
    specs=[AssetCheckSpec("sha256_verified", asset=name, blocking=name == "calibration_package",
                          description="Re-hash the files against the recorded sha256.") for name in UPSTREAM_ASSETS],
)
def upstream_hashes(context: AssetCheckExecutionContext):
    """One step for the three upstream artifacts (a Dagster step costs seconds here)."""
    for name in UPSTREAM_ASSETS:
        yield verify_hashes(context, AssetKey(name))


def class_history_check(store: LocalRunStore, run_id: str, name: str, factor: float) -> AssetCheckResult:
    """A warning, never a block: a fit worse than its class's history by more than `factor` may
    still be within the absolute thresholds, and a person should look before it is promoted."""
    run = history.read_provenance(store, run_id)
    verdict = history.history_verdict(run, history.class_history(store, run), f"{name}.{FIT_ERROR}", factor)
    return AssetCheckResult(
        asset_key=AssetKey(name),
        check_name="calibration_error_vs_class_history",
        passed=not verdict.excursion,
        severity=AssetCheckSeverity.WARN,
        description=verdict.summary(),
        metadata={
            FIT_ERROR: verdict.value,
            "class_median": float("nan") if verdict.class_median is None else verdict.class_median,
            "history_factor": factor,
            "history_runs": len(verdict.history),
            "class": f"config_hash {run.config_hash}, dataset_sha256 {run.dataset_sha256}",
        },
    )


def quality_checks(name: str):
    specs = [
        AssetCheckSpec("sha256_verified", asset=name, blocking=True),
        AssetCheckSpec("calibration_quality", asset=name, blocking=True,
                       description="Mean and max rel_abs_error of the fit within the run's thresholds."),
        AssetCheckSpec("calibration_error_vs_class_history", asset=name, blocking=False,
                       description="Warn when the fit's final mean rel_abs_error exceeds quality.history_factor "
                                   "x the median of the completed runs with the same config_hash and dataset."),
    ]

    @multi_asset_check(specs=specs, name=f"{name}_checks", required_resource_keys={"run_store"})
    def checks(context: AssetCheckExecutionContext):
        key = AssetKey(name)
        yield verify_hashes(context, key)
        metadata = latest_metadata(context, key) or {}
        store = context.resources.run_store.store()
        quality = RunConfig.model_validate(store.read_meta(context.partition_key).config).quality
        mean, worst = metadata.get(FIT_ERROR), metadata.get("final_max_rel_abs_error")
        passed = (
            mean is not None and worst is not None
            and mean <= quality.max_mean_rel_abs_error and worst <= quality.max_max_rel_abs_error
        )
        yield AssetCheckResult(
            asset_key=key,
            check_name="calibration_quality",
            passed=bool(passed),
            severity=AssetCheckSeverity.ERROR,
            metadata={
                FIT_ERROR: float("nan") if mean is None else float(mean),
                "final_max_rel_abs_error": float("nan") if worst is None else float(worst),
                "max_mean_rel_abs_error": quality.max_mean_rel_abs_error,
                "max_max_rel_abs_error": quality.max_max_rel_abs_error,
            },
        )
        yield class_history_check(store, context.partition_key, name, quality.history_factor)

    return checks


@multi_asset_check(
    specs=[
        AssetCheckSpec("all_areas_present", asset=NATIONAL_KEY,
                       description=f"Exactly {geography.AREA_COUNT} area files plus national, each hash verified."),
        AssetCheckSpec("no_version_skew", asset=NATIONAL_KEY,
                       description="Every asset of the run was materialized at the run's pinned SHA."),
        AssetCheckSpec("sha256_verified", asset="run_diagnostics",
                       description="Re-hash the files against the recorded sha256."),
    ],
    required_resource_keys={"run_store"},
)
def release_integrity(context: AssetCheckExecutionContext):
    """The run as a whole, once its last files exist: areas, skew, diagnostics."""
    yield verify_hashes(context, AssetKey("run_diagnostics"))
    store = context.resources.run_store.store()
    run_id = context.partition_key
    h5_root = store.path(store.run_key(run_id, stages.H5_ROOT))
    expected = {area.relpath for area in (*geography.areas(), geography.NATIONAL)}
    found = {str(p.relative_to(h5_root)) for p in h5_root.rglob("*.h5")} if h5_root.is_dir() else set()
    recorded = partition_metadata(context)
    area_files = {}
    for key in AREA_KEYS:
        if key in recorded:
            area_files.update(recorded_files(recorded[key]))
    problems = hash_mismatches(area_files)
    yield AssetCheckResult(
        asset_key=NATIONAL_KEY,
        check_name="all_areas_present",
        passed=found == expected and len(area_files) == len(expected) and not problems,
        metadata={
            "areas_found": len(found - {geography.NATIONAL.relpath}),
            "missing": ", ".join(sorted(expected - found)) or "none",
            "unexpected": ", ".join(sorted(found - expected)) or "none",
            "hash_mismatches": "\n".join(problems) or "none",
        },
    )
    pinned = store.read_meta(run_id).sha
    shas = {}
    for key, metadata in recorded.items():
        if "git_sha" in metadata:
            shas.setdefault(metadata["git_sha"], []).append(key.to_user_string())
    skewed = {sha: keys for sha, keys in shas.items() if sha != pinned}
    yield AssetCheckResult(
        asset_key=NATIONAL_KEY,
        check_name="no_version_skew",
        passed=not skewed,
        metadata={
            "pinned_sha": pinned,
            "shas_seen": len(shas),
            "skewed": "; ".join(f"{sha}: {', '.join(keys[:5])}" for sha, keys in skewed.items()) or "none",
        },
    )


ALL_CHECKS = [upstream_hashes, *(quality_checks(name) for name in WEIGHT_ASSETS), release_integrity]
