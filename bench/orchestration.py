"""Issue 3's bench: the same release through Dagster (the release job, multiprocess executor, on-disk
SQLite instance as `usdata-pipeline` creates it) and through the bare driver, in the same process
run: the ratio of wall times, and the orchestration overhead of each step: Dagster's step time minus
the same step's time in the bare driver (for the check and staging steps, which the driver does not
have, their whole time)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance

from bench.common import bench_parser, pinned_code, timed, write_result
from pipeline_assets.driver import run_release
from pipeline_assets.launch import instance_settings, launch_release
from pipeline_assets.local_areas import AREA_KEYS
from pipeline_assets.steps.config import config_for_scale
from resources.run_store import LocalRunStore


def dagster_step_seconds(instance: DagsterInstance, dagster_run_id: str) -> dict[str, float]:
    """Wall time of each Dagster step, from its STEP_START to its STEP_SUCCESS event."""
    starts, out = {}, {}
    for record in instance.all_logs(dagster_run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == DagsterEventType.STEP_WORKER_STARTING:
            starts.setdefault(event.step_key, record.timestamp)
        elif event.event_type == DagsterEventType.STEP_START:
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


def dagster_release(home: Path, store: LocalRunStore, config, code, sha) -> tuple[float, float, dict[str, float]]:
    """One release through Dagster on the instance at `home`: (wall, launch to first step, step times)."""
    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as instance:
        launched_at = time.time()
        seconds, outcome = timed(lambda: launch_release(store, instance, config, code, running_sha=sha))
        assert outcome.success, outcome.meta.error
        start = seconds_to_first_step(instance, outcome.dagster_run_id, launched_at)
        return seconds, start, dagster_step_seconds(instance, outcome.dagster_run_id)


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, repeats=3).parse_args(argv)
    config = config_for_scale(args.scale)
    sha, code = pinned_code()
    driver_walls, dagster_walls, overheads, starts = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_bytes(instance_settings())
        for repeat in range(args.repeats):
            store = LocalRunStore(Path(tmp) / f"driver_{repeat}")
            seconds, (driver_meta, _) = timed(lambda: run_release(store, config, code, running_sha=sha))
            driver_walls.append(seconds)
            work = {name: t.duration_s for name, t in driver_meta.step_timings.items()}
            seconds, start, steps = dagster_release(home, LocalRunStore(Path(tmp) / f"dagster_{repeat}"), config, code, sha)
            dagster_walls.append(seconds)
            starts.append(start)
            overheads.append({step: round(steps[step] - work.get(step, 0.0), 3) for step in steps})
    driver, dagster = statistics.median(driver_walls), statistics.median(dagster_walls)
    per_step = {step: statistics.median(o[step] for o in overheads) for step in overheads[0]}
    write_result(
        f"orchestration_{args.scale}",
        {
            "scale": args.scale,
            "repeats": args.repeats,
            "bare_driver_wall_s": {"median": driver, "samples": driver_walls},
            "dagster_wall_s": {"median": dagster, "samples": dagster_walls},
            "ratio_dagster_over_driver": dagster / driver,
            # Seconds Dagster adds to a run, net of what running the two fits at once gains back:
            # fixed at a given number of assets, so a faster release makes it a larger ratio.
            "dagster_overhead_s": dagster - driver,
            "area_step_overhead_per_area_ms": per_step["local_areas"] / len(AREA_KEYS) * 1e3,
            "goal_ratio": 1.05,
            "run_start_s": statistics.median(starts),
            "per_step_overhead_s": per_step,
            "median_step_overhead_s": statistics.median(per_step.values()),
            "executor": "multiprocess (forkserver, max_concurrent 2); on-disk SQLite instance (Dagster's stock "
                        "storage), runs launched through it with `dagster job launch`",
        },
    )


if __name__ == "__main__":
    main()
