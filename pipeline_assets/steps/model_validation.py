"""The model checks the release: PolicyEngine-US loads a sample of the area files and computes on
them, and what it finds is set against what the release says of those areas.

The model runs in an environment of its own (its pins clash with the project's), so the step takes
it as a callable: `run_model(paths, period)` gives the environment it ran in and one `ModelFigures`
per file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
from pydantic import BaseModel

from pipeline_assets.steps.results import MODEL_PACKAGE, StepResult
from resources.files import atomic_path, write_bytes_atomic

MODEL = "policyengine-us"
MODEL_ENVIRONMENT = "model_environment"  # its record's environment key for the model's own env_id and versions
MEASURES = ("persons", "households", "income_tax", "eitc", "snap", "snap_households", "household_net_income")
# The model's figures that the targets database has a target for: (measure, target variable).
TARGETED = (("persons", "person_count"), ("snap_households", "household_snap_count"), ("eitc", "eitc_amount"))
COMPARISON_COLUMNS = ["area", "measure", "model", "release", "target", "target_period", "model_over_release", "model_over_target"]


class ModelFigures(BaseModel):
    """What the model computed on one area file: weighted totals for the period, or why it could not."""

    path: str
    persons: float | None = None
    households: float | None = None
    income_tax: float | None = None
    eitc: float | None = None
    snap: float | None = None
    snap_households: float | None = None
    household_net_income: float | None = None
    load_seconds: float | None = None
    compute_seconds: float | None = None
    unknown_variables: list[str] = []  # in the file but not in the model: it would ignore them
    error: str | None = None


class ModelEnvironmentInfo(BaseModel):
    """The environment the model ran in, as provenance names it."""

    env_id: str
    libraries: dict[str, str]  # distribution -> version (policyengine-us, policyengine-core, ...)
    ran_on: list[str] = []  # each runner process or container the areas were dealt to


class ModelValidationRecord(BaseModel):
    """diagnostics/model_validation.json: which areas the model checked, in which environment, what it
    found, and why the step failed (empty: it passed)."""

    period: int
    areas: list[str]
    environment: ModelEnvironmentInfo | None  # None: no area sampled, the model did not run
    figures: dict[str, ModelFigures]
    failures: list[str]


class ModelValidationFailed(RuntimeError):
    """The model could not load an area file, ignores some of its variables, or counts other persons
    than the release weighted."""


def sampled(codes: Iterable[str] | str, all_codes: list[str]) -> list[str]:
    """The sample's area codes in release order (`"all"`: every area and the nation)."""
    wanted = set(all_codes) if codes == "all" else set(codes)
    return [code for code in all_codes if code in wanted]


def targets_of(db_path: Path, areas: list[str]) -> dict[tuple[str, str], tuple[float, int]]:
    """(area, variable) -> (value, period) of the untargeted-stratum targets the model is compared with."""
    if not areas:
        return {}
    variables = [variable for _, variable in TARGETED]
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            f"SELECT geo_id, variable, value, period FROM targets WHERE stratum = 'all' AND geo_id IN "
            f"({','.join('?' * len(areas))}) AND variable IN ({','.join('?' * len(variables))}) ORDER BY target_id",
            [*areas, *variables],
        ).fetchall()
    return {(geo, variable): (value, period) for geo, variable, value, period in rows}


def validate_with_model(
    area_files: dict[str, Path],
    release_figures: dict[str, dict[str, float]],
    db_path: Path,
    period: int,
    person_tolerance: float,
    run_model: Callable[[list[Path], int], tuple[ModelEnvironmentInfo, list[ModelFigures]]] | None,
    out_dir: Path,
) -> StepResult:
    """Run the model on `area_files` (area code -> file), compare, write the record and the
    comparison table; raise ModelValidationFailed (after writing both) when the model could not
    load a file, does not know one of its variables, or its person count is off the release's
    weighted population by more than `person_tolerance` (relative)."""
    codes = list(area_files)
    environment, found = None, {}
    if codes:
        environment, figures = run_model([area_files[c] for c in codes], period)
        found = dict(zip(codes, figures))
    targets = targets_of(db_path, codes)
    failures, rows = [], []
    for code, figures in found.items():
        if figures.error is not None:
            failures.append(f"{code}: the model could not load or compute {area_files[code].name}: {figures.error}")
            continue
        if figures.unknown_variables:
            failures.append(f"{code}: the model does not know the variables {figures.unknown_variables} of {area_files[code].name}")
        ours = release_figures[code]["population"]
        if abs(figures.persons / ours - 1) > person_tolerance:
            failures.append(f"{code}: the model counts {figures.persons:,.0f} persons, the release weighted {ours:,.0f}")
        release = {"persons": ours, "households": release_figures[code]["weight_sum"]}
        for measure in MEASURES:
            value = getattr(figures, measure)
            target_variable = dict(TARGETED).get(measure)
            target, target_period = targets.get((code, target_variable), (None, None))
            rows.append({
                "area": code, "measure": measure, "model": value, "release": release.get(measure),
                "target": target, "target_period": target_period,
                "model_over_release": value / release[measure] if measure in release else None,
                "model_over_target": value / target if target else None,
            })
    record = ModelValidationRecord(
        period=period, areas=codes, environment=environment, figures=found, failures=failures,
    )
    paths = {"model_validation": out_dir / "model_validation.json", "comparison": out_dir / "model_comparison.csv"}
    write_bytes_atomic(paths["model_validation"], record.model_dump_json(indent=2).encode())
    with atomic_path(paths["comparison"]) as tmp:
        pd.DataFrame(rows, columns=COMPARISON_COLUMNS).to_csv(tmp, index=False, float_format="%.10g")
    if failures:
        raise ModelValidationFailed(f"model validation failed on {len(failures)} of {len(codes)} areas: {failures[0]}")
    figures: dict[str, float | int] = {"areas_checked": len(codes)}
    for code, result in found.items():
        for measure in MEASURES:
            figures[f"{code}_{measure}"] = float(getattr(result, measure))
        figures[f"{code}_model_seconds"] = float((result.load_seconds or 0) + (result.compute_seconds or 0))
    # The model's version, as tro.ModelPackage has it: its environment installs exactly the lock's pins.
    ran = {MODEL_PACKAGE: {"name": MODEL, "version": environment.libraries[MODEL], "locked_version": environment.libraries[MODEL]},
           MODEL_ENVIRONMENT: environment.model_dump()} if environment else {}
    return StepResult(outputs=paths, figures=figures, environment=ran)
