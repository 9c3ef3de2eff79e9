"""Reliability suite, concurrency: transitions that must be exclusive, run as real processes at once.

Six promotions of one run at once register one version; two runs started in the same second get two
run_ids; a promotion racing a clean never leaves a registry entry without its run; a clean during
a run leaves the running run alone.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from pipeline_assets.cli import main
from pipeline_assets.driver import start_run
from pipeline_assets.steps.config import config_for_scale
from resources.git import CodeState
from resources.registry import LocalRegistry, VersionManifest
from resources.run_store import LocalRunStore, RunStatus
from tests.conftest import PINNED_SHA

CODE = CodeState(PINNED_SHA, "main", False, None)
PROMOTERS = 6
CLI_TIMEOUT_S = 240


def cli(store: LocalRunStore, home, *argv: str) -> subprocess.Popen:
    """`usdata-pipeline ARGV` as its own process, on `store` and the Dagster instance at `home`."""
    env = {**os.environ, "PIPELINE_STORE": str(store.root), "DAGSTER_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "pipeline_assets.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=CLI_TIMEOUT_S)
    return process.returncode, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usdata-pipeline: error: "), err
    return lines[0]


def failed_runs(store: LocalRunStore, count: int) -> list[str]:
    """`count` failed runs, the newest a minute ago (older than anything the test makes next)."""
    start = datetime.now(timezone.utc) - timedelta(minutes=10)
    runs = []
    for i in range(count):
        run_id = start_run(store, config_for_scale("tiny"), CODE, start + timedelta(seconds=i)).run_id
        store.update_meta(run_id, lambda m: m.transition(RunStatus.failed))
        runs.append(run_id)
    return runs


@pytest.mark.reliability("concurrency")
def test_concurrent_promotions_of_one_run_register_exactly_one_version(store, tmp_path):
    store, run_id = store
    home = tmp_path / "dagster_home"
    processes = [cli(store, home, "promote", run_id, "--version", f"3.0.{n}") for n in range(PROMOTERS)]
    results = [finish(p) for p in processes]
    winners = [f"3.0.{n}" for n, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, [r[2] for r in results]
    (winner,) = winners
    for n, (code, out, err) in enumerate(results):
        if f"3.0.{n}" != winner:
            assert code != 0
            assert f"run {run_id} is already promoted as {winner}" in one_line(err), err
    registry = LocalRegistry.in_store(store.root).read()
    assert [entry.version for entry in registry.versions] == [winner] and registry.current == winner
    meta = store.read_meta(run_id)
    assert meta.status is RunStatus.promoted and meta.promotion.version == winner
    assert sorted(p.name for p in store.path("production").iterdir() if not p.name.startswith(".")) == [winner]
    assert sorted(p.name for p in store.path("releases").iterdir()) == [winner]


def _start_at_once(root: str, barrier, results) -> None:
    barrier.wait(timeout=60)
    results.put(start_run(LocalRunStore(root), config_for_scale("tiny"), CODE).run_id)


@pytest.mark.reliability("concurrency")
def test_two_runs_started_in_the_same_second_get_two_run_ids(tmp_path):
    """Both processes compute the same second's run_id; the loser of the create moves on to the next."""
    store = LocalRunStore(tmp_path / "store")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    for _ in range(2):  # two rounds: the race is between the two creates, not a matter of luck once
        barrier, results = context.Barrier(2), context.Queue()
        starters = [context.Process(target=_start_at_once, args=(str(store.root), barrier, results)) for _ in range(2)]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join(timeout=120)
        assert [starter.exitcode for starter in starters] == [0, 0]
        first, second = sorted(results.get(timeout=5) for _ in range(2))
        assert first != second
        stamps = [datetime.strptime(r[-15:], "%Y%m%d_%H%M%S") for r in (first, second)]
        assert stamps[1] - stamps[0] <= timedelta(seconds=2)  # the next free second, not a failure and retry later
    runs = store.list_runs()
    assert len(runs) == 4 and all(m.status is RunStatus.running for m in runs)


@pytest.mark.reliability("concurrency")
def test_a_promotion_during_clean_never_leaves_a_registry_entry_without_its_run(store, tmp_path):
    store, run_id = store
    home = tmp_path / "dagster_home"
    old = failed_runs(store, 3)
    cleaner = cli(store, home, "clean", "--keep", "0")
    promoter = cli(store, home, "promote", run_id, "--version", "3.1.0")
    (clean_code, clean_out, clean_err), (promote_code, _, promote_err) = finish(cleaner), finish(promoter)
    assert clean_code == 0, clean_err
    assert all(not store.exists(f"runs/{r}") for r in old)  # what nothing refers to is removed either way
    registry = LocalRegistry.in_store(store.root).read()
    if promote_code == 0:  # the promotion went first: the promoted run is kept
        assert store.read_meta(run_id).status is RunStatus.promoted and run_id not in clean_out
        assert [e.version for e in registry.versions] == ["3.1.0"]
    else:  # clean went first and took the unpromoted run: the promotion is refused, nothing half made
        assert f"unknown run {run_id}" in one_line(promote_err)
        assert not store.exists(f"runs/{run_id}") and registry.versions == []
        assert not store.path("production").exists()


def _orchestrate(root: str, ready) -> None:
    """A run's orchestrator that stays alive (the run is running) until it is killed."""
    run_id = start_run(LocalRunStore(root), config_for_scale("tiny"), CODE).run_id
    ready.put(run_id)
    time.sleep(600)


@pytest.mark.reliability("concurrency")
def test_clean_during_a_run_leaves_the_running_run(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    old = failed_runs(store, 2)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    ready = context.Queue()
    orchestrator = context.Process(target=_orchestrate, args=(str(store.root), ready))
    orchestrator.start()
    try:
        running = ready.get(timeout=60)
        code, out, err = finish(cli(store, tmp_path / "dagster_home", "clean", "--keep", "0"))
        assert code == 0, err
        assert store.read_meta(running).status is RunStatus.running
        assert running not in out and all(r in out for r in old)
        assert [m.run_id for m in store.list_runs()] == [running]
    finally:
        orchestrator.kill()
        orchestrator.join(timeout=30)


# --- what current is, and a refusal from inside the promotion job --------------------------------
def _register_elsewhere(registry: LocalRegistry, version: str) -> None:
    registry.add(VersionManifest(version=version, created_at=datetime.now(timezone.utc), hf=None, gcs=None,
                                 run_id="0.1.0_a1b2c3d4_20250101_000000", diagnostics_path="d", git_sha="s",
                                 env_id=None, config_hash=None, tro_path="t", tro_sha256="h"))


def test_current_moves_only_up_or_to_a_rollback(store, monkeypatch, capsys, tmp_path):
    """A lower version is registered but leaves current where it was (and the command says so); a
    rollback is an explicit choice and becomes current whatever its number."""
    store, run_id = store
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    registry = LocalRegistry.in_store(store.root)
    _register_elsewhere(registry, "9.0.0")
    assert main(["promote", run_id, "--version", "3.0.0"]) == 0
    assert "current stays 9.0.0: 3.0.0 is lower" in capsys.readouterr().out
    assert registry.read().current == "9.0.0" and [e.version for e in registry.read().versions] == ["3.0.0", "9.0.0"]
    assert main(["rollback", "--to", "3.0.0", "--as", "3.0.1"]) == 0
    assert "current is 3.0.1" in capsys.readouterr().out
    assert registry.read().current == "3.0.1"
    _register_elsewhere(registry, "3.0.1-rc.1")  # a pre-release of the current version is lower
    assert registry.read().current == "3.0.1"
    _register_elsewhere(registry, "10.0.0")
    assert registry.read().current == "10.0.0"


def test_a_refusal_inside_the_promotion_job_reaches_the_user_as_its_line(store, monkeypatch, capsys, tmp_path):
    """The CLI's own check passes; the asset's check under the lock, in the run's own process,
    refuses (the run failed in between): one line, exit 2, nothing registered."""
    from pipeline_assets import promotion

    store, run_id = store
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    real_check, calls = promotion.check_promotable, []

    def check_then_fail_the_run(*args, **kwargs):
        calls.append(args)
        staged = real_check(*args, **kwargs)
        if len(calls) == 1:
            store.update_meta(run_id, lambda m: setattr(m, "status", RunStatus.failed))
        return staged

    monkeypatch.setattr(promotion, "check_promotable", check_then_fail_the_run)
    assert main(["promote", run_id, "--version", "3.2.0"]) == 2
    err = capsys.readouterr().err
    assert len(calls) == 1 and err == f"usdata-pipeline: error: run {run_id} is failed: only a completed run can be promoted\n"
    assert LocalRegistry.in_store(store.root).read().versions == []
