"""Asset checks, one result per run_id partition: artifact hashes re-verified, the 488 areas plus
national present and each as recorded (blocking, so an incomplete or altered run is never staged),
calibration quality (blocking, so a bad fit never reaches the area files), a fit no worse than its
provenance class's history (a warning), one git SHA across a run's assets, and the staged files as
their manifest says.

Every multi-asset check is subsettable: each yields only the checks selected, so any selection of
assets (one stage, national_h5, a few areas) can be materialized from the UI or the CLI."""


import warnings
from collections.abc import Iterable
from pathlib import Path

import h5py
from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    PreviewWarning,
    RunsFilter,
    multi_asset_check,
)

from pipeline_assets import history, promotion, stages
from pipeline_assets.local_areas import AREA_BY_KEY, AREA_KEYS, NATIONAL_KEY
from pipeline_assets.materialize import rounded
from pipeline_assets.partitions import run_ids
from pipeline_assets.steps import geography
from pipeline_assets.steps.config import QualityConfig, RunConfig
from pipeline_assets.steps.policyengine import read_variable
from resources.compute import mark_step_process
from resources.files import sha256_file
from resources.run_store import LocalRunStore

FIT_ERROR = "final_mean_rel_abs_error"  # the fit figure the quality and history checks judge
WEIGHT_ASSETS = ("state_weights", "national_weights")
HASHES_DESCRIPTION = "Re-hash the files against the sha256 their materialization recorded."


def check_spec(name: str, asset: AssetKey | str, description: str, blocking: bool = False) -> AssetCheckSpec:
    """A check with one result per run_id partition. Partitioned checks are a Dagster preview: its
    warning is silenced here only, where every check is made."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PreviewWarning)
        return AssetCheckSpec(name, asset=asset, description=description, blocking=blocking, partitions_def=run_ids)


def selected(context: AssetCheckExecutionContext, asset: AssetKey | str, name: str) -> bool:
    return AssetCheckKey(AssetKey.from_coercible(asset), name) in context.selected_asset_check_keys


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
    specs=[check_spec("sha256_verified", name, HASHES_DESCRIPTION, blocking=name == "calibration_package")
           for name in UPSTREAM_ASSETS],
    can_subset=True,
)
def upstream_hashes(context: AssetCheckExecutionContext):
    """One step for the three upstream artifacts (a Dagster step costs seconds here)."""
    mark_step_process("upstream_hashes")  # a check's step process, too, exits with the run worker
    for name in UPSTREAM_ASSETS:
        if selected(context, name, "sha256_verified"):
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
            FIT_ERROR: rounded(verdict.value),
            "class_median": float("nan") if verdict.class_median is None else rounded(verdict.class_median),
            "history_factor": factor,
            "history_runs": len(verdict.history),
            "class": f"config_hash {run.config_hash}, dataset_sha256 {run.dataset_sha256}",
        },
    )


def quality_checks(name: str):
    specs = [
        check_spec("sha256_verified", name, HASHES_DESCRIPTION + " Blocking: the area files read these weights.",
                   blocking=True),
        check_spec("calibration_quality", name, "Mean and max rel_abs_error of the fit within the run's thresholds.",
                   blocking=True),
        check_spec("calibration_error_vs_class_history", name,
                   "Warn when the fit's final mean rel_abs_error exceeds quality.history_factor "
                   "x the median of the completed runs with the same config_hash and dataset."),
    ]

    @multi_asset_check(specs=specs, name=f"{name}_checks", required_resource_keys={"run_store"}, can_subset=True)
    def checks(context: AssetCheckExecutionContext):
        mark_step_process(f"{name}_checks")  # a check's step process, too, exits with the run worker
        key = AssetKey(name)
        if selected(context, key, "sha256_verified"):
            yield verify_hashes(context, key)
        store = context.resources.run_store.store()
        quality = RunConfig.model_validate(store.read_meta(context.partition_key).config).quality
        if selected(context, key, "calibration_quality"):
            yield quality_result(key, latest_metadata(context, key) or {}, quality)
        if selected(context, key, "calibration_error_vs_class_history"):
            yield class_history_check(store, context.partition_key, name, quality.history_factor)

    return checks


def quality_result(key: AssetKey, metadata: dict, quality: QualityConfig) -> AssetCheckResult:
    """The fit's recorded mean and max rel_abs_error against the run's thresholds."""
    mean, worst = metadata.get(FIT_ERROR), metadata.get("final_max_rel_abs_error")
    passed = (
        mean is not None and worst is not None
        and mean <= quality.max_mean_rel_abs_error and worst <= quality.max_max_rel_abs_error
    )
    return AssetCheckResult(
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


def area_file_problems(key: AssetKey, metadata: dict | None) -> list[str]:
    """Why an area file is not the one its materialization recorded (none: it is): present, the
    recorded sha256, and read by h5py with the recorded household count and weight sum."""
    if metadata is None:
        return [f"{AREA_BY_KEY[key].relpath}: not materialized"]
    problems = hash_mismatches(recorded_files(metadata))
    if problems:
        return problems
    with h5py.File(str(metadata["path"]), "r") as h5:
        weights = read_variable(h5, "household_weight").astype(float)
    found = {"households": len(weights), "weight_sum": rounded(float(weights.sum()))}
    return [f"{AREA_BY_KEY[key].relpath}: {name} recorded {metadata.get(name)}, the file has {value}"
            for name, value in found.items() if metadata.get(name) is None
            or (value != metadata[name] if name == "households" else value != rounded(metadata[name]))]


RELEASE_CHECKS = (
    ("all_areas_present", NATIONAL_KEY, f"Exactly the {geography.AREA_COUNT} area files plus national on disk, each "
                                        "with a recorded materialization, the sha256 it recorded, and read by h5py with "
                                        "the household count and weight sum it recorded. Blocking: an incomplete or "
                                        "altered run is never staged."),
    ("no_version_skew", NATIONAL_KEY, "Every asset of the run was materialized at the run's pinned SHA."),
    ("sha256_verified", AssetKey("run_diagnostics"), HASHES_DESCRIPTION),
)


@multi_asset_check(
    specs=[check_spec(name, asset, description, blocking=name == "all_areas_present")
           for name, asset, description in RELEASE_CHECKS],
    required_resource_keys={"run_store"},
    can_subset=True,
)
def release_integrity(context: AssetCheckExecutionContext):
    """The run as a whole, once its last files exist: areas, skew, diagnostics."""
    mark_step_process("release_integrity")  # a check's step process, too, exits with the run worker
    if selected(context, "run_diagnostics", "sha256_verified"):
        yield verify_hashes(context, AssetKey("run_diagnostics"))
    store = context.resources.run_store.store()
    recorded = partition_metadata(context)
    if selected(context, NATIONAL_KEY, "all_areas_present"):
        yield areas_present_result(store, context.partition_key, recorded)
    if selected(context, NATIONAL_KEY, "no_version_skew"):
        yield version_skew_result(store.read_meta(context.partition_key).sha, recorded)


def areas_present_result(store: LocalRunStore, run_id: str, recorded: dict[AssetKey, dict]) -> AssetCheckResult:
    """The run's area files on disk are exactly the expected set, and each is the file its
    materialization recorded. One check for all 489 files, not one per area asset: each check
    spec adds three events to every run and a live status to every page that shows the areas."""
    h5_root = store.path(store.run_key(run_id, stages.H5_ROOT))
    expected = {area.relpath for area in AREA_BY_KEY.values()}
    found = {str(p.relative_to(h5_root)) for p in h5_root.rglob("*.h5")} if h5_root.is_dir() else set()
    per_area = [area_file_problems(key, recorded.get(key)) for key in AREA_KEYS]
    problems = [problem for area_problems in per_area for problem in area_problems]
    return AssetCheckResult(
        asset_key=NATIONAL_KEY,
        check_name="all_areas_present",
        passed=found == expected and not problems,
        metadata={
            "areas_found": len(found - {geography.NATIONAL.relpath}),
            "files_verified": sum(not area_problems for area_problems in per_area),
            "missing": ", ".join(sorted(expected - found)) or "none",
            "unexpected": ", ".join(sorted(found - expected)) or "none",
            "problems": "\n".join(problems[:20]) + (f"\nand {len(problems) - 20} more" if len(problems) > 20 else "")
            or "none",
        },
    )


def version_skew_result(pinned: str, recorded: dict[AssetKey, dict]) -> AssetCheckResult:
    shas: dict[str, list[str]] = {}
    for key, metadata in recorded.items():
        if "git_sha" in metadata:
            shas.setdefault(metadata["git_sha"], []).append(key.to_user_string())
    skewed = {sha: keys for sha, keys in shas.items() if sha != pinned}
    return AssetCheckResult(
        asset_key=NATIONAL_KEY,
        check_name="no_version_skew",
        passed=not skewed,
        metadata={
            "pinned_sha": pinned,
            "shas_seen": len(shas),
            "skewed": "; ".join(f"{sha}: {', '.join(keys[:5])}" for sha, keys in skewed.items()) or "none",
        },
    )


@multi_asset_check(
    # model_validation's hashes are checked here, in a step that runs after it anyway: a spec on it in
    # release_integrity would split that step in two (the model's check waits for all_areas_present).
    specs=[check_spec("staged_files_verified", "staged_release",
                      "Every file under staging/{run_id}/ has the sha256 the staging manifest gives it."),
           check_spec("sha256_verified", "model_validation", HASHES_DESCRIPTION)],
    required_resource_keys={"run_store"},
    can_subset=True,
)
def staged_files(context: AssetCheckExecutionContext):
    mark_step_process("staged_files")  # a check's step process, too, exits with the run worker
    if selected(context, "model_validation", "sha256_verified"):
        yield verify_hashes(context, AssetKey("model_validation"))
    if not selected(context, "staged_release", "staged_files_verified"):
        return
    store = context.resources.run_store.store()
    manifest = promotion.read_staging(store, context.partition_key)
    files = {str(store.path(promotion.staging_key(context.partition_key, rel))): digest for rel, digest in manifest.files.items()}
    problems = hash_mismatches(files)
    yield AssetCheckResult(
        asset_key=AssetKey("staged_release"),
        check_name="staged_files_verified",
        passed=not problems,
        metadata={"files_checked": len(files), "mismatches": "\n".join(problems) or "none"},
    )


ALL_CHECKS = [
    upstream_hashes, *(quality_checks(name) for name in WEIGHT_ASSETS), release_integrity, staged_files,
]
