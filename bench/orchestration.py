"""Issue 3's bench: the same release through Dagster (the release job, multiprocess executor) and
through the bare driver, in the same process run, with Dagster on each instance storage it ships
with: the embedded SQLite a new $DAGSTER_HOME gets, and PostgreSQL as the production instance
stores it (a throwaway server, started here). Per storage: the ratio of the median wall times, and
Dagster's fixed seconds per run: from the launch to the first step's process, and each step's time
beyond the step's own work (for the check and staging steps, which the driver does not have, their
whole time)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml
from dagster import DagsterEventType, DagsterInstance

from bench.common import bench_parser, pinned_code, timed, write_result
from pipeline_assets.driver import run_release
from pipeline_assets.launch import instance_settings, launch_release
from pipeline_assets.local_areas import AREA_KEYS
from pipeline_assets.production_instance import PASSWORD_VARIABLE, ProductionInstance
from pipeline_assets.steps.config import config_for_scale
from resources.run_store import LocalRunStore
from tests.postgres import PostgresServer, administer, throwaway_server

STORAGES = ("sqlite", "postgres")


def dagster_step_seconds(instance: DagsterInstance, dagster_run_id: str) -> dict[str, float]:
    """Wall time of each Dagster step, from its STEP_WORKER_STARTING (else STEP_START) to its STEP_SUCCESS event."""
    starts, out = {}, {}
    for record in instance.all_logs(dagster_run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type in (DagsterEventType.STEP_WORKER_STARTING, DagsterEventType.STEP_START):
            starts.setdefault(event.step_key, record.timestamp)
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            out[event.step_key] = record.timestamp - starts[event.step_key]
    return out


def seconds_to_first_step(instance: DagsterInstance, dagster_run_id: str, launched_at: float) -> float:
    """From the launch to the first step's process starting: creating the run (Dagster writes one
    planned event per asset) and the executor's start."""
    for record in instance.all_logs(dagster_run_id, of_type=DagsterEventType.STEP_WORKER_STARTING):
        return record.timestamp - launched_at
    raise ValueError(f"run {dagster_run_id} started no step")


def postgres_settings(home: Path, server: PostgresServer) -> bytes:
    """A new instance's settings with the production instance's storage, in a new database on
    `server`, reached over its Unix socket as a server on the same host is: only the storage differs
    from the SQLite home (the runs are launched at once, not through a queue)."""
    administer(server, 'CREATE DATABASE "dagster"')
    production = ProductionInstance(hostname=str(server.socket_dir), port=server.port, db_name="dagster", username=server.username)
    settings = yaml.safe_load(instance_settings()) | {"storage": yaml.safe_load(production.settings())["storage"]}
    return yaml.safe_dump(settings).encode()


def dagster_release(home: Path, store: LocalRunStore, config, code, sha) -> dict:
    """One release through Dagster on the instance at `home`: its wall time, launch to first step,
    and each step's time beyond its own work (from the run's own step records)."""
    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as instance:
        launched_at = time.time()
        seconds, outcome = timed(lambda: launch_release(store, instance, config, code, running_sha=sha))
        assert outcome.success, outcome.meta.error
        work = {name: t.duration_s for name, t in outcome.meta.step_timings.items()}
        steps = dagster_step_seconds(instance, outcome.dagster_run_id)
        return {
            "wall_s": seconds,
            "run_start_s": seconds_to_first_step(instance, outcome.dagster_run_id, launched_at),
            "step_overhead_s": {step: round(steps[step] - work.get(step, 0.0), 3) for step in steps},
        }


def summary(runs: list[dict], driver: float) -> dict:
    """Medians over the repeats of one storage, against the bare driver's median wall time."""
    wall = statistics.median(r["wall_s"] for r in runs)
    per_step = {step: statistics.median(r["step_overhead_s"][step] for r in runs) for step in runs[0]["step_overhead_s"]}
    return {
        "dagster_wall_s": {"median": wall, "samples": [r["wall_s"] for r in runs]},
        "ratio_dagster_over_driver": wall / driver,
        # Seconds Dagster adds to a run, net of what running the two fits at once gains back:
        # fixed at a given number of assets, so a faster release makes it a larger ratio.
        "dagster_overhead_s": wall - driver,
        "run_start_s": statistics.median(r["run_start_s"] for r in runs),
        "step_overhead_total_s": sum(per_step.values()),
        "area_step_overhead_per_area_ms": per_step["local_areas"] / len(AREA_KEYS) * 1e3,
        "per_step_overhead_s": per_step,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, repeats=3)
    parser.add_argument("--storage", choices=STORAGES, action="append",
                        help="an instance storage to run Dagster on (repeat for both; default both)")
    args = parser.parse_args(argv)
    storages = tuple(dict.fromkeys(args.storage or STORAGES))
    config = config_for_scale(args.scale)
    sha, code = pinned_code()
    driver_walls, runs = [], {storage: [] for storage in storages}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        homes = {storage: Path(tmp) / f"{storage}_home" for storage in storages}
        for storage, home in homes.items():
            home.mkdir()
            if storage == "postgres":
                server = stack.enter_context(throwaway_server())
                os.environ[PASSWORD_VARIABLE] = server.password
                stack.callback(os.environ.pop, PASSWORD_VARIABLE, None)
                (home / "dagster.yaml").write_bytes(postgres_settings(home, server))
            else:
                (home / "dagster.yaml").write_bytes(instance_settings())
        for repeat in range(args.repeats):
            store = LocalRunStore(Path(tmp) / f"driver_{repeat}")
            seconds, _ = timed(lambda: run_release(store, config, code, running_sha=sha))
            driver_walls.append(seconds)
            # The process's first Dagster run also starts its step server: alternate which storage goes first.
            for storage in storages[:: 1 if repeat % 2 == 0 else -1]:
                runs[storage].append(dagster_release(homes[storage], LocalRunStore(Path(tmp) / f"{storage}_{repeat}"),
                                                     config, code, sha))
    driver = statistics.median(driver_walls)
    write_result(
        f"orchestration_{args.scale}",
        {
            "scale": args.scale,
            "repeats": args.repeats,
            "bare_driver_wall_s": {"median": driver, "samples": driver_walls},
            "goal_ratio": 1.05,
            "storages": {storage: summary(storage_runs, driver) for storage, storage_runs in runs.items()},
            "executor": "multiprocess (forkserver, max_concurrent 2); Dagster's stock storages: embedded SQLite "
                        "(a new $DAGSTER_HOME's) and dagster-postgres (the production instance's); runs launched through the "
                        "instance with `dagster job launch`",
        },
    )


if __name__ == "__main__":
    main()
