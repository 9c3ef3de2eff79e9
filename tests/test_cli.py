"""The command line: exit codes and one-line errors for every bad argument."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline_assets.cli import main
from pipeline_assets.driver import start_run
from pipeline_assets.identity_contract import config_hash
from pipeline_assets.steps.config import RunConfig, config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus
from tests.conftest import PINNED_SHA


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return LocalRunStore()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("usdata-pipeline: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "--scale", "huge"], "huge"),
        (["run", "--epochs", "0"], "0 must be at least 1"),
        (["run", "--epochs", "many"], "'many' is not an integer"),
        (["run", "--branch", "main", "--sha", "abc1234"], "not both"),
        (["run", "--branch", "no-such-branch-anywhere"], "no-such-branch-anywhere"),
        (["run", "--build-database", "--reuse-database"], "not allowed with"),
        (["run", "--fit-device", "gpu"], "invalid choice: 'gpu'"),
        (["run", "--fit-threads", "0"], "0 must be at least 1"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
        (["status", "latest"], "malformed run_id 'latest'"),
        (["status", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_exit_2(store, capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in one_line_error(capsys)


def test_run_refuses_a_sha_other_than_the_installed_code(store, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_CODE_SHA", "f" * 40)
    assert main(["run", "--scale", "tiny"]) == 2
    err = one_line_error(capsys)
    assert "f" * 40 in err and "check out" in err
    assert store.list_runs() == []  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_cuda_fits_without_a_gpu_are_refused_before_a_run_is_made(store, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_CODE_SHA", PINNED_SHA)
    monkeypatch.setattr("pipeline_assets.cli.code_state", lambda repo, ref=None: CodeState(PINNED_SHA, "main", False, None))
    monkeypatch.delenv("PIPELINE_COMPUTE", raising=False)
    assert main(["run", "--scale", "tiny", "--fit-device", "cuda"]) == 2
    assert "device 'cuda'" in one_line_error(capsys)
    assert store.list_runs() == []


def test_resume_refuses_a_run_that_has_not_failed(store, capsys):
    run_id = start_run(store, config_for_scale("tiny"), CodeState(PINNED_SHA, "main", False, None)).run_id
    assert main(["resume", run_id]) == 2
    assert f"run {run_id} is running: only a failed run can be resumed" in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_resume_of_gpu_fits_without_a_gpu_is_refused(store, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_COMPUTE", raising=False)
    config = config_for_scale("tiny", local_fit={"device": "cuda"})
    run_id = start_run(store, config, CodeState(PINNED_SHA, "main", False, None)).run_id
    store.update_meta(run_id, lambda m: m.transition(RunStatus.failed))
    assert main(["resume", run_id]) == 2
    assert "local fit device 'cuda'" in one_line_error(capsys)
    assert store.read_meta(run_id).status is RunStatus.failed  # left as it was


def test_status_lists_runs_and_one_run(store, capsys):
    assert main(["status"]) == 0 and "no runs" in capsys.readouterr().out
    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    run_id = start_run(store, config_for_scale("tiny"), code).run_id
    store.update_meta(run_id, lambda m: m.step_started("policy_data_db"))
    store.update_meta(run_id, lambda m: m.step_ended("policy_data_db", "succeeded"))
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert run_id in table and "running" in table and PINNED_SHA[:8] in table and "1/8" in table
    assert main(["status", run_id]) == 0
    detail = capsys.readouterr().out
    assert "policy_data_db" in detail and "succeeded" in detail


def test_a_failing_step_exits_1_and_leaves_meta_failed(store, capsys, monkeypatch):
    """--reuse-database with no completed run to take it from fails the first step."""
    monkeypatch.setenv("PIPELINE_CODE_SHA", PINNED_SHA)
    monkeypatch.setattr("pipeline_assets.cli.code_state", lambda repo, ref=None: CodeState(PINNED_SHA, "main", False, None))
    assert main(["run", "--scale", "tiny", "--reuse-database"]) == 1
    out = capsys.readouterr().out
    (meta,) = store.list_runs()
    assert meta.status is RunStatus.failed
    assert meta.error.step == "policy_data_db" and "no completed run" in meta.error.message
    assert "failed" in out and meta.run_id in out


def test_resource_sizes_reach_the_run_config_but_not_its_hash(store, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_CODE_SHA", PINNED_SHA)
    monkeypatch.setattr("pipeline_assets.cli.code_state", lambda repo, ref=None: CodeState(PINNED_SHA, "main", False, None))
    assert main(["run", "--scale", "tiny", "--reuse-database", "--workers", "3", "--fit-threads", "2"]) == 1  # fails at once
    (meta,) = store.list_runs()
    config = RunConfig.model_validate(meta.config)
    assert config.areas.workers == 3
    assert config.local_fit.threads == config.national_fit.threads == 2
    assert meta.config_hash == config_hash(config_for_scale("tiny", build_database=False))


def test_a_new_dagster_home_gets_quiet_offline_settings_and_an_existing_one_is_kept(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    from pipeline_assets.instance_storage import PooledSqliteEventLogStorage
    from pipeline_assets.launch import dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "new_home"))
    home = dagster_home()
    with DagsterInstance.get() as instance:
        assert instance.python_log_level == "WARNING"  # step start-up lines off the console
        assert instance.telemetry_enabled is False  # no network at run time
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)  # Dagster's files, kept open
        assert Path(instance.event_log_storage.path_for_shard("index")).parent == home / "history" / "runs"
    mine = tmp_path / "own_home"
    mine.mkdir()
    (mine / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    monkeypatch.setenv("DAGSTER_HOME", str(mine))
    dagster_home()
    assert (mine / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"
    assert home == (tmp_path / "new_home").resolve()
