"""reproduce: the environment is compared first, then the run is made again and compared byte for byte."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from dagster import instance_for_test

from pipeline_assets import reproduce as reproduction
from pipeline_assets.cli import main
from pipeline_assets.driver import run_release, start_run
from pipeline_assets.identity import VersionSkewError
from pipeline_assets.reproduce import REPORT, EnvironmentMismatch, ReproductionReport, environment_differences, reproduce
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import TRO_NAME, tro_revisions
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStoreError
from resources.runtime import capture
from tests.conftest import PINNED_SHA, shipped_settings

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)


@pytest.fixture()
def original(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    meta, _ = run_release(store, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA)
    return store, meta.run_id


def test_reproduce_gives_identical_bytes_and_reports_into_the_new_run(original):
    store, run_id = original
    with instance_for_test(overrides=shipped_settings()) as instance:
        report = reproduce(store, instance, run_id, CODE, running_sha=PINNED_SHA)

    new_run = report.reproduced_run_id
    assert new_run != run_id and report.pinned_sha == PINNED_SHA
    assert report.environment_differences == [] and report.original_env_id == report.current_env_id
    by_path = {a.path: a for a in report.artifacts}
    deterministic = [p for p in by_path if p.startswith(("artifacts/", "h5s/", "diagnostics/"))]
    assert len([p for p in deterministic if p.startswith("h5s/")]) == 489
    assert all(by_path[p].identical and by_path[p].original_sha256 for p in deterministic)
    assert report.unexpected == []
    # Only the run's own records differ, each with the reason.
    assert {p for p, a in by_path.items() if not a.identical} == {p for p in by_path if p.startswith("steps/")}
    assert all(a.reason for a in report.artifacts if not a.identical)

    saved = ReproductionReport.model_validate_json(store.path(store.run_key(new_run, REPORT)).read_text())
    assert saved == report
    revisions = tro_revisions(store, new_run)
    assert len(revisions) == 2 and revisions[0].name == TRO_NAME  # the report is covered by a new revision
    assert REPORT in json.dumps(json.loads(revisions[1].read_text()))
    assert REPORT not in json.dumps(json.loads(revisions[0].read_text()))


def test_a_different_environment_is_refused_naming_every_difference(original, monkeypatch):
    store, run_id = original
    now = capture()
    changed = now.model_copy(update={
        "library_versions": {**now.library_versions, "torch": "9.9.9"},
        "installed_distributions_sha256": "0" * 64,
        "kernel": "other-kernel",
    })
    monkeypatch.setattr(reproduction, "capture", lambda: changed)
    runs_before = [m.run_id for m in store.list_runs()]
    with instance_for_test(overrides=shipped_settings()) as instance, pytest.raises(EnvironmentMismatch) as refused:
        reproduce(store, instance, run_id, CODE, running_sha=PINNED_SHA)
    message = str(refused.value)
    assert "\n" not in message and "--force" in message
    assert "library_versions.torch" in message and "9.9.9" in message and "kernel" in message
    assert [m.run_id for m in store.list_runs()] == runs_before  # nothing started

    fields = [d.field for d in environment_differences(now, changed)]
    assert fields == ["kernel", "installed_distributions_sha256", "library_versions.torch"]


def test_other_code_or_an_unfinished_run_is_refused(original):
    store, run_id = original
    other = "0badc0de" + "f" * 32
    unfinished = start_run(store, config_for_scale("tiny"), CODE).run_id
    with instance_for_test(overrides=shipped_settings()) as instance:
        with pytest.raises(VersionSkewError, match=other):
            reproduce(store, instance, run_id, CODE, running_sha=other)
        with pytest.raises(RunStoreError, match="uncommitted"):
            reproduce(store, instance, run_id, replace(CODE, dirty=True, diff_sha256="d" * 64), running_sha=PINNED_SHA)
        with pytest.raises(RunStoreError, match="only a completed run"):
            reproduce(store, instance, unfinished, CODE, running_sha=PINNED_SHA)
    assert {m.run_id for m in store.list_runs()} == {run_id, unfinished}  # nothing new


def test_cli_reproduce_rejects_a_bad_run_id(capsys):
    assert main(["reproduce", "not-a-run-id"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usdata-pipeline: error:") and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_cli_reproduce_of_gpu_fits_without_a_gpu_is_refused_before_a_run_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("PIPELINE_COMPUTE", raising=False)
    store = LocalRunStore()
    run_id = start_run(store, config_for_scale("tiny", national_fit={"device": "cuda"}), CODE).run_id
    assert main(["reproduce", run_id]) == 2
    err = capsys.readouterr().err.strip()
    assert "national fit device 'cuda'" in err and "\n" not in err
    assert [m.run_id for m in store.list_runs()] == [run_id]
