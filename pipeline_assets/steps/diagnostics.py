"""Run diagnostics: the calibration logs of both fits, validation per area, and the run's config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_assets.steps.calibration import load_calibration_package, relative_errors
from pipeline_assets.steps.results import StepResult
from resources.files import atomic_path, write_bytes_atomic

VALIDATION_COLUMNS = ["area", "level", "variable", "stratum", "target", "estimate", "error", "rel_error", "rel_abs_error"]


def validate_areas(package_path: Path, local_weights: Path, national_weights: Path) -> pd.DataFrame:
    """Each area's targets against its weighted estimate (local weights for states and districts)."""
    package = load_calibration_package(package_path, column_names=[])
    targets = package.targets
    estimate = np.where(
        targets["level"].to_numpy() == "national",
        package.matrix @ np.load(national_weights),
        package.matrix @ np.load(local_weights),
    )
    value = targets["value"].to_numpy(float)
    rel = relative_errors(estimate, value)
    return pd.DataFrame(
        {
            "area": targets["geo_id"], "level": targets["level"], "variable": targets["variable"],
            "stratum": targets["stratum"], "target": value, "estimate": estimate, "error": estimate - value,
            "rel_error": rel, "rel_abs_error": np.abs(rel),
        },
        columns=VALIDATION_COLUMNS,
    )


def write_diagnostics(
    package_path: Path,
    local_weights: Path,
    national_weights: Path,
    fit_logs: dict[str, Path],
    run_config: dict,
    out_dir: Path,
) -> StepResult:
    validation = validate_areas(package_path, local_weights, national_weights)
    log = pd.concat(
        [pd.read_csv(path).assign(fit=name) for name, path in sorted(fit_logs.items())], ignore_index=True
    )
    paths = {
        "validation": out_dir / "validation.csv",
        "calibration_log": out_dir / "calibration_log.csv",
        "run_config": out_dir / "run_config.json",
    }
    with atomic_path(paths["validation"]) as tmp:
        validation.to_csv(tmp, index=False, float_format="%.10g")
    with atomic_path(paths["calibration_log"]) as tmp:
        log.to_csv(tmp, index=False, float_format="%.10g")
    write_bytes_atomic(paths["run_config"], json.dumps(run_config, indent=2, sort_keys=True).encode())

    by_level = validation.groupby("level")["rel_abs_error"]
    figures: dict[str, float | int] = {"validated_targets": len(validation), "areas_validated": validation["area"].nunique()}
    for level, errors in by_level:
        figures[f"{level}_mean_rel_abs_error"] = float(errors.mean())
        figures[f"{level}_max_rel_abs_error"] = float(errors.max())
    return StepResult(outputs=paths, figures=figures)
