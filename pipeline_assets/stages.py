"""The stages of one release, bound to the run store: where each step reads and writes.

The bare driver and the Dagster assets both call these functions, so the layout of a run and the
order of its steps are written once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline_assets.steps import geography
from pipeline_assets.steps.calibration import build_calibration_package
from pipeline_assets.steps.config import FitConfig, RunConfig
from pipeline_assets.steps.database import build_database
from pipeline_assets.steps.datasets import build_datasets
from pipeline_assets.steps.diagnostics import write_diagnostics
from pipeline_assets.steps.io import atomic_path
from pipeline_assets.steps.local_areas import AreaResult, build_area_h5, load_area_inputs
from pipeline_assets.steps.results import StepResult
from resources.compute import LocalPool
from resources.run_store import SEALED, LocalRunStore

ARTIFACTS = {
    "policy_data_db": "artifacts/policy_data.db",
    "source_datasets": "artifacts/source_datasets.h5",
    "calibration_package": "artifacts/calibration_package.h5",
    "state_weights": "artifacts/state_weights.npy",
    "national_weights": "artifacts/national_weights.npy",
    "state_calibration_log": "artifacts/state_calibration_log.csv",
    "national_calibration_log": "artifacts/national_calibration_log.csv",
}
H5_ROOT = "h5s"
DIAGNOSTICS = "diagnostics"
FIT_SCOPES = {"state_weights": "local", "national_weights": "national"}
STEP_ORDER = (
    "policy_data_db",
    "source_datasets",
    "calibration_package",
    "state_weights",
    "national_weights",
    "local_areas",
    "run_diagnostics",
)


def artifact(store: LocalRunStore, run_id: str, name: str) -> Path:
    """Existing input artifact of a run (read side)."""
    return store.path(store.run_key(run_id, ARTIFACTS[name]))


def output(store: LocalRunStore, run_id: str, name: str) -> Path:
    return store.output_path(run_id, ARTIFACTS[name])


def run_database(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    """Build the database from the raw inputs, or (--reuse-database) take the newest completed run's."""
    if config.build_database:
        return build_database(output(store, run_id, "policy_data_db"), config.database)
    return reuse_database(store, run_id)


def reuse_database(store: LocalRunStore, run_id: str) -> StepResult:
    sealed = [m for m in reversed(store.list_runs()) if m.status in SEALED and m.run_id != run_id]
    source = next((m for m in sealed if artifact(store, m.run_id, "policy_data_db").is_file()), None)
    if source is None:
        raise FileNotFoundError(
            f"--reuse-database: no completed run in {store.root} has a policy_data.db; build one with --build-database"
        )
    target = output(store, run_id, "policy_data_db")
    with atomic_path(target) as tmp:
        shutil.copyfile(artifact(store, source.run_id, "policy_data_db"), tmp)
    return StepResult(outputs={"database": target}, figures={"reused": 1}, reused_from=source.run_id)


def run_datasets(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    return build_datasets(output(store, run_id, "source_datasets"), config.dataset)


def run_calibration_package(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    return build_calibration_package(
        artifact(store, run_id, "policy_data_db"),
        artifact(store, run_id, "source_datasets"),
        output(store, run_id, "calibration_package"),
        config.calibration,
    )


def fit_config(config: RunConfig, step: str) -> FitConfig:
    return config.local_fit if FIT_SCOPES[step] == "local" else config.national_fit


def run_fit(store: LocalRunStore, run_id: str, config: RunConfig, step: str) -> StepResult:
    from pipeline_assets.steps.weights import fit_weights  # torch is imported only where a fit runs

    scope = FIT_SCOPES[step]
    log_name = "state_calibration_log" if scope == "local" else "national_calibration_log"
    return fit_weights(
        artifact(store, run_id, "calibration_package"),
        output(store, run_id, step),
        output(store, run_id, log_name),
        fit_config(config, step),
    )


def run_local_areas(
    store: LocalRunStore, run_id: str, pool: LocalPool, area_codes: set[str] | None = None
) -> list[AreaResult]:
    """Build the 488 area files plus national (or the subset `area_codes`) on the worker pool."""
    wanted = [*geography.areas(), geography.NATIONAL]
    if area_codes is not None:
        wanted = [area for area in wanted if area.code in area_codes]
    out_root = store.path(store.run_key(run_id, H5_ROOT))
    for area in wanted:
        store.output_path(run_id, f"{H5_ROOT}/{area.relpath}")  # refuses to rewrite a sealed run's file
    loader_args = tuple(
        artifact(store, run_id, name)
        for name in ("source_datasets", "calibration_package", "state_weights", "national_weights")
    )
    return pool.map_with_inputs(build_area_h5, wanted, load_area_inputs, loader_args, out_root)


def run_diagnostics(store: LocalRunStore, run_id: str, config: RunConfig) -> StepResult:
    out_dir = store.output_path(run_id, DIAGNOSTICS)
    return write_diagnostics(
        artifact(store, run_id, "calibration_package"),
        artifact(store, run_id, "state_weights"),
        artifact(store, run_id, "national_weights"),
        {
            "local": artifact(store, run_id, "state_calibration_log"),
            "national": artifact(store, run_id, "national_calibration_log"),
        },
        config.model_dump(mode="json"),
        out_dir,
    )
