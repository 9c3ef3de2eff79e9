"""The fault suite: kill -9 of the orchestrator and of the step processes at every step, a killed
promotion, and pool workers that raise or die.

Each kill hits a real `usdata-pipeline run` / `resume` (a subprocess with its own PIPELINE_STORE and
DAGSTER_HOME) while the step is running: meta.json says so and a process named after the step
(mark_step_process) is alive. Kill points share a run (kill, resume, kill again further on), in two
chains: a step can be killed at most twice in a run as only a step that did not succeed runs again,
and the steps that run side by side (the database and the datasets, the two fits, the area files and
the diagnostics) finish while their neighbour is killed. After each kill: the next command (`status`)
tells the truth, no partial file sits at a final path, no process of the run is left; at the end of
each chain the last resume completes and `verify` passes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline_assets.launch import worker_death
from pipeline_assets.steps.config import config_for_scale
from resources.compute import LocalPool, WorkerDied
from resources.run_store import LocalRunStore, Orchestrator, RunMeta, RunStatus, settle_if_orphaned, settle_orphans
from tests.conftest import PINNED_SHA
from tests.processes import Proc, processes_of, wait_no_process_left

STEP_NAME_CHARS = 15
POLL_S = 0.02
HIT_TIMEOUT_S = 600  # staged_release waits for the area checks and reads 490 input versions
ORCHESTRATOR, STEP, WORKER = "orchestrator", "step process", "pool worker"

# (what is killed, the step running at the time), in the order each chain meets them. The two
# chains run side by side.
CHAIN_A = [
    (ORCHESTRATOR, "policy_data_db"),
    (STEP, "source_datasets"),
    (ORCHESTRATOR, "source_datasets"),
    (STEP, "calibration_package"),
    (ORCHESTRATOR, "national_weights"),
    (STEP, "national_weights"),
    (STEP, "run_diagnostics"),
    (ORCHESTRATOR, "staged_release"),
]
CHAIN_B = [
    (STEP, "policy_data_db"),
    (ORCHESTRATOR, "calibration_package"),
    (ORCHESTRATOR, "state_weights"),
    (STEP, "state_weights"),
    (ORCHESTRATOR, "run_diagnostics"),
    (WORKER, "local_areas"),
    (STEP, "local_areas"),
    (ORCHESTRATOR, "local_areas"),
    (STEP, "staged_release"),
]
CHAINS = {"a": CHAIN_A, "b": CHAIN_B}
POINTS = [(chain, kind, step) for chain, points in CHAINS.items() for kind, step in points]


# --- the command line, as a subprocess ------------------------------------------------------------
@dataclass
class Pipeline:
    """One store and one DAGSTER_HOME, and the commands run against them."""

    root: Path
    log: list[str] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.root / "store"

    def env(self) -> dict:
        return {**os.environ, "PIPELINE_STORE": str(self.store), "DAGSTER_HOME": str(self.root / "dagster_home")}

    def start(self, *args: str) -> subprocess.Popen:
        out = open(self.root / f"cli-{len(self.log)}.log", "w")
        self.log.append(out.name)
        return subprocess.Popen([sys.executable, "-m", "pipeline_assets.cli", *args], env=self.env(),
                                stdout=out, stderr=subprocess.STDOUT, cwd=self.root)

    def cli(self, *args: str, timeout: float = 300) -> tuple[int, str]:
        proc = self.start(*args)
        code = proc.wait(timeout=timeout)
        return code, Path(self.log[-1]).read_text()

    def output(self) -> str:
        return Path(self.log[-1]).read_text()

    def run_id(self) -> str | None:
        metas = sorted((self.store / "runs").glob("*/meta.json"))
        return metas[0].parent.name if metas else None

    def meta(self) -> RunMeta:
        return LocalRunStore(self.store).read_meta(self.run_id())


def wait_for_step(pipeline: Pipeline, proc: subprocess.Popen, step: str) -> Proc:
    """Poll until `step` is running: recorded so in meta.json, with its step process alive."""
    deadline = time.monotonic() + HIT_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the command ended ({proc.returncode}) before {step} ran:\n{pipeline.output()[-3000:]}")
        run_id = pipeline.run_id()
        try:
            timing = pipeline.meta().step_timings.get(step) if run_id else None
        except Exception:  # being replaced this instant
            timing = None
        if timing is not None and timing.status == "running":
            named = [p for p in processes_of(pipeline.store) if p.name == step[:STEP_NAME_CHARS]]
            pids = {p.pid for p in named}
            top = [p for p in named if p.ppid not in pids]  # its pool workers, forked from it, share its name
            if top:
                return top[0]
        time.sleep(POLL_S)
    pytest.fail(f"{step} never ran within {HIT_TIMEOUT_S} s")


def pool_workers(store: Path, step_process: Proc) -> list[Proc]:
    """The step process's pool workers: forked from it, so named as it is (its other children,
    such as a git or nvidia-smi call, are not)."""
    return [p for p in processes_of(store) if p.ppid == step_process.pid and p.name == step_process.name]


def kill(pipeline: Pipeline, proc: subprocess.Popen, kind: str, step: str) -> int:
    """SIGKILL the orchestrator (the Dagster run worker driving the run), the step's process or one
    of its pool workers while `step` runs, then wait for the command to end with the run failed;
    returns the pid killed."""
    step_process = wait_for_step(pipeline, proc, step)
    if kind == ORCHESTRATOR:
        killed = pipeline.meta().orchestrator.pid
        assert killed not in (proc.pid, step_process.pid), "the run worker drives the run, not the command or the step"
        os.kill(killed, signal.SIGKILL)
    elif kind == STEP:
        killed = step_process.pid
        os.kill(killed, signal.SIGKILL)
    else:
        deadline = time.monotonic() + 60
        while not (workers := pool_workers(pipeline.store, step_process)) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert workers, f"{step} started no pool worker"
        killed = workers[0].pid
        os.kill(killed, signal.SIGKILL)
    code = proc.wait(timeout=120)
    assert code == 1, pipeline.output()[-3000:]
    return killed


# --- what must hold after a kill ------------------------------------------------------------------
def partial_files(store: Path, since: float = 0) -> list[str]:
    """Files at final (not hidden) paths, changed since `since` (a time.time()), that do not read
    as complete files of their kind."""
    bad = []
    for path in store.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or path.stat().st_mtime < since:
            continue
        try:
            if path.suffix in (".json", ".jsonld"):
                json.loads(path.read_bytes())
            elif path.suffix == ".h5":
                with h5py.File(path, "r") as handle:
                    list(handle)
            elif path.suffix == ".npy":
                np.load(path)
            elif path.suffix == ".db":
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        except Exception as exc:
            bad.append(f"{path.relative_to(store)}: {type(exc).__name__}")
    return bad


def check_settled(pipeline: Pipeline, kind: str, step: str, orchestrator_pid: int) -> None:
    """`status RUN` (the next command) names the run failed under `step`; meta.json agrees."""
    run_id = pipeline.run_id()
    code, out = pipeline.cli("status", run_id)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"{run_id}  failed"), out
    error = next((line for line in lines if line.startswith("error in ")), "")
    if kind == ORCHESTRATOR:
        assert f"the orchestrator (pid {orchestrator_pid}) died while" in error and step in error, out
    else:
        assert error.startswith(f"error in {step}: "), out
        if kind == STEP:
            assert f"child process for step {step} was terminated by signal 9 (SIGKILL)" in error, out
    meta = pipeline.meta()
    assert meta.status is RunStatus.failed and meta.step_timings[step].status == "failed", meta.step_timings
    assert not [s for s, t in meta.step_timings.items() if t.status == "running"], meta.step_timings
    if kind == WORKER:
        assert "pool worker (pid" in error and "killed by SIGKILL" in error, out


def run_chain(pipeline: Pipeline, points: list[tuple[str, str]]) -> dict:
    """Kill at each point in turn, resuming after each, then let the last resume complete; per
    point, the first assertion that failed at it (None: it held), and whether the run then
    completed and verified (`final`: None, else why not)."""
    results: dict[tuple[str, str], str | None] = {}
    started = 0.0  # the time the command that was killed last started (mtimes before it were checked)
    proc = pipeline.start("run", "--scale", "tiny")
    try:
        for kind, step in points:
            try:
                pid = kill(pipeline, proc, kind, step)
                assert not (left := wait_no_process_left(pipeline.store)), f"processes left: {left}"
                check_settled(pipeline, kind, step, pid)
                assert not (bad := partial_files(pipeline.store, since=started)), f"partial files: {bad}"
                results[(kind, step)] = None
            except (AssertionError, pytest.fail.Exception) as exc:
                results[(kind, step)] = str(exc)[:4000]
                raise
            started = time.time()
            proc = pipeline.start("resume", pipeline.run_id())
        code = proc.wait(timeout=300)
        assert code == 0, pipeline.output()[-3000:]
        assert pipeline.meta().status is RunStatus.completed
        code, out = pipeline.cli("verify", pipeline.run_id())
        assert code == 0 and out.startswith("OK "), out
        assert not (left := wait_no_process_left(pipeline.store)), f"processes left: {left}"
    except (AssertionError, pytest.fail.Exception) as exc:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        return {"points": results, "final": str(exc)[:4000], "pipeline": pipeline}
    return {"points": results, "final": None, "pipeline": pipeline}


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> dict[str, dict]:
    """Every chain's outcome; the chains run side by side, each in its own store and DAGSTER_HOME."""
    with ThreadPoolExecutor(len(CHAINS)) as pool:
        running = {name: pool.submit(run_chain, Pipeline(tmp_path_factory.mktemp(f"chain_{name}")), points)
                   for name, points in CHAINS.items()}
        return {name: future.result() for name, future in running.items()}


@pytest.mark.reliability("fault")
@pytest.mark.parametrize("chain, kind, step", POINTS, ids=[f"{c}-{k.replace(' ', '_')}-{s}" for c, k, s in POINTS])
def test_kill_at_step(chains, chain, kind, step):
    """kill -9 while `step` runs: settled truthfully by the next command, nothing partial, nothing
    left running, and the run then resumes to completion and verifies."""
    outcome = chains[chain]
    assert (kind, step) in outcome["points"], f"not reached: the chain stopped earlier: {outcome['final']}"
    assert outcome["points"][(kind, step)] is None, outcome["points"][(kind, step)]
    assert outcome["final"] is None, outcome["final"]


@pytest.mark.reliability("fault")
def test_killed_promotion_leaves_the_registry_unchanged_and_promoting_again_completes(chains):
    """kill -9 of the promotion's step process while it publishes: the command fails in one line,
    the registry is as it was, and promoting the version again completes."""
    outcome = chains["a"]
    assert outcome["final"] is None, f"chain a did not complete: {outcome['final']}"
    pipeline = outcome["pipeline"]
    run_id, registry = pipeline.run_id(), pipeline.store / "version_manifest.json"
    before = registry.read_bytes() if registry.exists() else None
    proc = pipeline.start("promote", run_id, "--version", "1.0.0", "--allow-dirty")
    deadline = time.monotonic() + 300
    release, killed = pipeline.store / "production" / "1.0.0", None
    while proc.poll() is None and time.monotonic() < deadline:
        if release.is_dir() and any(p.is_file() for p in release.rglob("*")):
            publishing = [p for p in processes_of(pipeline.store) if p.name == "promotion"]
            if publishing:  # mid-way: publishing its files
                killed = publishing[0].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    assert killed is not None, f"the promotion's step process was not seen publishing: {pipeline.output()[-2000:]}"
    assert proc.wait(timeout=120) == 1, pipeline.output()[-2000:]
    assert f"promotion of {run_id} failed" in pipeline.output(), pipeline.output()[-2000:]
    assert not wait_no_process_left(pipeline.store)
    after = registry.read_bytes() if registry.exists() else None
    assert after == before, "a killed promotion changed the registry"
    assert not partial_files(pipeline.store)
    code, out = pipeline.cli("promote", run_id, "--version", "1.0.0", "--allow-dirty")
    assert code == 0, out
    entry = json.loads(registry.read_text())
    assert entry["current"] == "1.0.0" and [v["version"] for v in entry["versions"]] == ["1.0.0"]
    assert pipeline.meta().status is RunStatus.promoted


# --- pool workers that fail -----------------------------------------------------------------------
def _load() -> int:
    return 0


def _task(item: int, _inputs, _out: Path) -> int:
    if item == 7:
        how = os.environ["FAULT_HOW"]
        if how == "raise":
            raise ValueError(f"area {item} cannot be built")
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.005)
    return item


@pytest.mark.reliability("fault")
@pytest.mark.parametrize("how, error", [
    ("raise", "area 7 cannot be built"),
    ("exit", "died: exit status 3"),
    ("kill", "died: killed by SIGKILL"),
])
def test_a_failing_pool_worker_fails_the_step_promptly_and_stops_the_pool(tmp_path, monkeypatch, how, error):
    monkeypatch.setenv("FAULT_HOW", how)
    started = time.monotonic()
    with pytest.raises((ValueError, WorkerDied), match=error):
        list(LocalPool(2).iter_with_inputs(_task, range(2000), _load, (), tmp_path))
    assert time.monotonic() - started < 5  # 2000 items take 5 s on two workers: it did not finish them
    assert multiprocessing.active_children() == []


# --- settlement of a run whose orchestrator died, without a run ------------------------------------
def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running_run(store: LocalRunStore, orchestrator: Orchestrator, steps: dict[str, str]) -> str:
    from pipeline_assets.driver import start_run
    from resources.git import CodeState

    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    run_id = start_run(store, config_for_scale("tiny"), code, orchestrator=orchestrator).run_id
    for step, status in steps.items():
        store.update_meta(run_id, lambda m: m.step_started(step))
        if status != "running":
            store.update_meta(run_id, lambda m: m.step_ended(step, status))
    return run_id


def test_a_run_whose_orchestrator_died_is_settled_failed_under_the_running_step(tmp_path):
    store = LocalRunStore(tmp_path)
    dead = Orchestrator.current().model_copy(update={"pid": _gone_pid()})
    run_id = _running_run(store, dead, {"policy_data_db": "succeeded", "calibration_package": "running"})
    meta = settle_if_orphaned(store, run_id)
    assert meta.status is RunStatus.failed and meta.error.step == "calibration_package"
    assert meta.error.message == f"the orchestrator (pid {dead.pid}) died while calibration_package was running"
    assert meta.step_timings["calibration_package"].status == "failed"
    assert meta.step_timings["calibration_package"].ended_at is not None
    assert settle_if_orphaned(store, run_id) == store.read_meta(run_id)  # settled once


def test_a_run_between_steps_names_the_last_step_started(tmp_path):
    store = LocalRunStore(tmp_path)
    dead = Orchestrator.current().model_copy(update={"pid": _gone_pid()})
    run_id = _running_run(store, dead, {"policy_data_db": "succeeded", "source_datasets": "succeeded"})
    meta = settle_if_orphaned(store, run_id)
    assert meta.error.step == "source_datasets"
    assert "died after source_datasets succeeded, before the next step started" in meta.error.message


def test_a_worker_death_seen_first_by_the_code_server_is_settled_under_the_running_step(tmp_path):
    """Dagster's code server may fail a run whose worker was killed before the command asks how the
    worker died: the run is still settled under the step that was running, and a run that failed
    with no step running (its worker exited after failing it) is not taken for a death."""
    store = LocalRunStore(tmp_path)
    dead = Orchestrator.current().model_copy(update={"pid": _gone_pid()})
    killed = _running_run(store, dead, {"policy_data_db": "succeeded", "source_datasets": "running"})
    error = worker_death(store, killed)
    assert error.step == "source_datasets" and error.message == f"the orchestrator (pid {dead.pid}) died while source_datasets was running"
    assert store.read_meta(killed).status is RunStatus.failed
    exited = _running_run(store, dead, {"policy_data_db": "succeeded"})
    assert worker_death(store, exited) is None and store.read_meta(exited).status is RunStatus.running


def test_only_orchestrators_certainly_gone_are_settled(tmp_path):
    """Alive: left running. A reused pid (same pid, another start time): settled. Another host's
    orchestrator cannot be checked from here: left running."""
    store = LocalRunStore(tmp_path)
    alive = Orchestrator.current()
    reused = alive.model_copy(update={"start_ticks": (alive.start_ticks or 0) + 1})
    elsewhere = alive.model_copy(update={"host": "another-host", "pid": _gone_pid()})
    ids = {}
    for name, orchestrator in {"alive": alive, "reused": reused, "elsewhere": elsewhere, "none": None}.items():
        ids[name] = _running_run(store, orchestrator, {"policy_data_db": "running"})
    assert settle_orphans(store) == [ids["reused"]]
    statuses = {name: store.read_meta(run_id).status for name, run_id in ids.items()}
    assert statuses == {"alive": RunStatus.running, "reused": RunStatus.failed, "elsewhere": RunStatus.running,
                        "none": RunStatus.running}


@pytest.mark.reliability("fault")
def test_a_staging_error_is_recorded_under_staged_release_with_its_first_line(tmp_path):
    from dagster import instance_for_test, materialize

    from pipeline_assets.driver import start_run
    from pipeline_assets.partitions import RUN_IDS
    from pipeline_assets.release import staged_release
    from pipeline_assets.run_events import step_failure_error
    from resources.dagster_resources import RunStoreResource
    from resources.git import CodeState

    store = LocalRunStore(tmp_path / "store")
    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    run_id = start_run(store, config_for_scale("tiny"), code).run_id  # no step has run: nothing to stage
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(RUN_IDS, [run_id])
        result = materialize([staged_release], instance=instance, partition_key=run_id, raise_on_error=False,
                             resources={"run_store": RunStoreResource(root=str(store.root))})
    assert not result.success
    meta = store.read_meta(run_id)
    assert meta.status is RunStatus.failed and meta.step_timings["staged_release"].status == "failed"
    assert meta.error.step == "staged_release"
    assert meta.error.message.startswith(f"RunStoreError: run {run_id} has 489 of its area files missing")
    from_events = step_failure_error(result.all_events)
    assert from_events.step == "staged_release" and "489 of its area files missing" in from_events.message
    assert "\n" not in from_events.message


def test_status_of_all_runs_settles_the_one_whose_orchestrator_died(tmp_path, monkeypatch, capsys):
    from pipeline_assets.cli import main

    monkeypatch.setenv("PIPELINE_STORE", str(tmp_path / "store"))
    store = LocalRunStore()
    dead = Orchestrator.current().model_copy(update={"pid": _gone_pid()})
    orphan = _running_run(store, dead, {"policy_data_db": "running"})
    live = _running_run(store, Orchestrator.current(), {"policy_data_db": "running"})
    assert main(["status"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {orphan: "failed", live: "running"}
    assert store.read_meta(orphan).error.message == f"the orchestrator (pid {dead.pid}) died while policy_data_db was running"
