"""The model's check of the release: what it records and when it fails, with a stand-in model. The
real model runs on a tiny release's sample in tests/test_dagster_release.py (the end-to-end job), on
fixture files in tests/test_model_environment.py and in Modal's image stand-in in
tests/test_modal_compute.py."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from pipeline_assets import stages
from pipeline_assets.steps.model_validation import (
    ModelEnvironmentInfo,
    ModelFigures,
    ModelValidationFailed,
    ModelValidationRecord,
    validate_with_model,
)

SAMPLE = {"AL": "states/AL.h5", "AL-01": "districts/AL-01.h5", "NYC": "cities/NYC.h5"}
ENVIRONMENT = ModelEnvironmentInfo(env_id="e" * 64, libraries={"policyengine-us": "2.68.0"})


def sample_files(store, meta) -> dict:
    return {code: store.path(store.run_key(meta.run_id, f"{stages.H5_ROOT}/{rel}")) for code, rel in SAMPLE.items()}


def release_figures(store, meta) -> dict:
    figures = stages.read_record(store, meta.run_id, "local_areas").output_figures
    return {code: figures[f"{stages.H5_ROOT}/{rel}"] for code, rel in SAMPLE.items()}


def validate(tiny_release, out_dir, run_model):
    store, meta, _ = tiny_release
    return validate_with_model(
        sample_files(store, meta), release_figures(store, meta), stages.artifact(store, meta.run_id, "policy_data_db"),
        meta.config["dataset"]["period"], 1e-4, run_model, out_dir,
    )


def agreeing(tiny_release):
    """A stand-in model that finds exactly the release's figures (the unit tests' model)."""
    ours = release_figures(*tiny_release[:2])
    by_path = {str(path): ours[code] for code, path in sample_files(*tiny_release[:2]).items()}

    def run(paths, period):
        return ENVIRONMENT, [ModelFigures(path=str(p), persons=by_path[str(p)]["population"],
                                          households=by_path[str(p)]["weight_sum"], income_tax=1.0, eitc=2.0, snap=3.0,
                                          snap_households=4.0, household_net_income=5.0)
                             for p in paths]
    return run


def test_a_passing_check_records_every_area_and_compares_with_the_targets(tiny_release, tmp_path):
    result = validate(tiny_release, tmp_path, agreeing(tiny_release))
    record = ModelValidationRecord.model_validate_json((tmp_path / "model_validation.json").read_text())
    assert record.areas == list(SAMPLE) and record.failures == [] and record.environment == ENVIRONMENT
    assert result.figures["areas_checked"] == 3 and result.figures["AL_income_tax"] == 1.0
    assert result.environment["model_package"] == {"name": "policyengine-us", "version": "2.68.0", "locked_version": "2.68.0"}
    assert result.environment["model_environment"]["env_id"] == "e" * 64
    comparison = pd.read_csv(tmp_path / "model_comparison.csv")
    persons = comparison[comparison["measure"] == "persons"].set_index("area")
    assert list(persons["model_over_release"]) == [1.0, 1.0, 1.0]
    assert persons.loc["AL", "target"] > 0 and persons.loc["AL", "target_period"] == 2024  # ACS population
    assert not math.isnan(comparison.set_index(["area", "measure"]).loc[("AL", "eitc"), "target"])  # the state's EITC


def test_a_file_the_model_cannot_load_or_a_wrong_count_fails_the_step_after_recording_why(tiny_release, tmp_path):
    good = agreeing(tiny_release)

    def broken(paths, period):
        environment, found = good(paths, period)
        found[0] = ModelFigures(path=found[0].path, error="Missing person_id column")
        found[1] = found[1].model_copy(update={"unknown_variables": ["employment_income_before_lsr"]})
        found[2] = found[2].model_copy(update={"persons": found[2].persons * 1.01})
        return environment, found

    with pytest.raises(ModelValidationFailed, match="model validation failed on 3 of 3 areas: AL: the model could not "
                                                    "load or compute AL.h5: Missing person_id column"):
        validate(tiny_release, tmp_path, broken)
    record = json.loads((tmp_path / "model_validation.json").read_text())
    assert record["failures"][1] == "AL-01: the model does not know the variables ['employment_income_before_lsr'] of AL-01.h5"
    assert len(record["failures"]) == 3 and record["failures"][2].startswith("NYC: the model counts ")


def test_an_empty_sample_runs_no_model_and_says_so(tiny_release, tmp_path):
    store, meta, _ = tiny_release
    result = validate_with_model({}, {}, stages.artifact(store, meta.run_id, "policy_data_db"), 2024, 1e-4, None, tmp_path)
    record = ModelValidationRecord.model_validate_json((tmp_path / "model_validation.json").read_text())
    assert record.areas == [] and record.environment is None and result.figures == {"areas_checked": 0}
    # the tiny run itself sampled nothing: its step record says the same
    assert stages.read_record(store, meta.run_id, "model_validation").figures == {"areas_checked": 0}
