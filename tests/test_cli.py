"""The command line: exit codes and one-line errors for every bad argument."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_assets.cli import main
from pipeline_assets.driver import start_run
from pipeline_assets.identity_contract import config_hash
from pipeline_assets.run_start import START_TAGS, run_tags
from pipeline_assets.steps.config import RunConfig, config_for_scale
from resources.git import SOURCE_ROOT, CodeState
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
    assert run_id in table and "running" in table and PINNED_SHA[:8] in table and "1/9" in table  # the eight steps and staging
    assert main(["status", run_id]) == 0
    detail = capsys.readouterr().out
    assert "policy_data_db" in detail and "succeeded" in detail


RELEASE_RUNS_QUERY = """{ runsOrError(filter: {pipelineName: "release"}) { __typename ... on Runs { results {
  runId jobName repositoryOrigin { repositoryLocationName } tags { key value } } } } }"""


def webserver_release_runs(home: Path, timeout_s: float = 180) -> list[dict]:
    """The release job's runs as the UI's GraphQL lists them: a webserver on a free 127.0.0.1 port over
    the instance at `home`, stopped by its PID afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "dagster_webserver", "-w", str(SOURCE_ROOT / "workspace.yaml"), "-h", "127.0.0.1",
               "-p", str(port)]
    server = subprocess.Popen(command, env={**os.environ, "DAGSTER_HOME": str(home)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and server.poll() is None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": RELEASE_RUNS_QUERY}).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.load(response)["data"]["runsOrError"]["results"]
            except OSError:  # not serving yet
                time.sleep(1)
        raise AssertionError(f"dagster-webserver did not answer on port {port} within {timeout_s} s (exit {server.poll()})")
    finally:
        server.terminate()
        server.wait(30)


def test_a_run_is_launched_through_the_instance_and_a_failing_step_exits_1(store, capsys, monkeypatch):
    """--reuse-database with no completed run to take it from fails the first step. The run is the
    code location's, under the release job, with the run's tags: in the instance and in the UI. Its
    resource sizes reach its configuration, but not its hash."""
    from dagster import DagsterInstance, RunsFilter

    monkeypatch.setenv("PIPELINE_CODE_SHA", PINNED_SHA)
    monkeypatch.setattr("pipeline_assets.cli.code_state", lambda repo, ref=None: CodeState(PINNED_SHA, "main", False, None))
    assert main(["run", "--scale", "tiny", "--reuse-database", "--workers", "3", "--fit-threads", "2"]) == 1
    out = capsys.readouterr().out
    (meta,) = store.list_runs()
    assert meta.status is RunStatus.failed
    config = RunConfig.model_validate(meta.config)
    assert config.areas.workers == 3
    assert config.local_fit.threads == config.national_fit.threads == 2
    assert meta.config_hash == config_hash(config_for_scale("tiny", build_database=False))
    assert meta.error.step == "policy_data_db" and "no completed run" in meta.error.message
    assert "failed" in out and meta.run_id in out and "[FAILED] policy_data_db" in out

    home = Path(os.environ["DAGSTER_HOME"])
    with DagsterInstance.get() as instance:
        (run,) = instance.get_runs(RunsFilter(job_name="release"))
    assert run.remote_job_origin is not None and run.remote_job_origin.location_name == "pipeline_assets"
    assert {name: run.tags[name] for name in START_TAGS} == run_tags(meta)
    (listed,) = webserver_release_runs(home)
    assert listed["runId"] == run.run_id and listed["repositoryOrigin"]["repositoryLocationName"] == "pipeline_assets"
    assert {tag["key"]: tag["value"] for tag in listed["tags"]}["run_id"] == meta.run_id


def test_a_new_dagster_home_gets_quiet_offline_settings_and_an_existing_one_is_kept(tmp_path, monkeypatch):
    from dagster import DagsterInstance, QueuedRunCoordinator

    from pipeline_assets.launch import dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "new_home"))
    home = dagster_home()
    with DagsterInstance.get() as instance:
        assert instance.python_log_level == "WARNING"  # step start-up lines off the console
        assert instance.telemetry_enabled is False  # no network at run time
        assert not isinstance(instance.run_coordinator, QueuedRunCoordinator)  # no daemon needed to start a run
        assert instance.get_runs() == [] and (home / "history" / "runs.db").is_file()  # Dagster's stock SQLite storage
    assert "storage" not in yaml.safe_load((home / "dagster.yaml").read_text())
    mine = tmp_path / "own_home"
    mine.mkdir()
    (mine / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    monkeypatch.setenv("DAGSTER_HOME", str(mine))
    dagster_home()
    assert (mine / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"
    assert home == (tmp_path / "new_home").resolve()


def test_commands_started_at_once_on_a_new_home_open_one_instance(tmp_path):
    """Opening a new home creates Dagster's SQLite schemas; four processes opening it at the same
    instant all get the instance (unserialized, some fail with "table ... already exists")."""
    home = tmp_path / "new_home"
    code = ("import sys, time; from pipeline_assets.launch import open_instance; time.sleep(max(0, float(sys.argv[1]) - time.time()))\n"
            "with open_instance() as instance: print(len(instance.get_runs()))")
    start = time.time() + 8  # every process imported and waiting, then all at once
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(SOURCE_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 and out.strip() == "0" for rc, out, _ in results), [err[-500:] for _, _, err in results]
