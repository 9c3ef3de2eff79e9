"""Issue 6's bench: the 489 area files (488 areas + national) built from one reference-scale run's
inputs with 1 and with 2 local worker processes; the ratio of medians is the scale-out. Also each
file's own build time in one process, in PolicyEngine's layout (a group per variable, an array per
period) against the same arrays written as entity tables (a group per entity, a dataset per
column: the layout before issue 19), both from the same inputs in the same run."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import bench_parser, median_seconds, pinned_code, write_result
from pipeline_assets import stages
from pipeline_assets.driver import run_release
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.steps.h5io import open_for_write, write_columns
from pipeline_assets.steps.local_areas import AreaInputs, area_columns, area_variables, build_area_h5, load_area_inputs
from pipeline_assets.steps.policyengine import ENTITY_OF, as_model_dtype
from resources.compute import LocalPool
from resources.run_store import LocalRunStore


def entity_tables(area, inputs: AreaInputs, out: Path) -> None:
    """The same file's arrays as entity tables."""
    variables = area_variables(*area_columns(area, inputs), inputs)
    with open_for_write(out) as h5:
        for entity in dict.fromkeys(ENTITY_OF.values()):
            write_columns(h5.create_group(entity), {name: as_model_dtype(np.asarray(values))
                                                    for name, values in variables.items() if ENTITY_OF[name] == entity})


def per_file_ms(store: LocalRunStore, run_id: str, areas: list, out: Path, repeats: int) -> dict:
    """Median milliseconds per file over `repeats` passes of all areas, each layout's pass in turn."""
    inputs = load_area_inputs(*(stages.artifact(store, run_id, name) for name in stages.STEP_INPUTS["local_areas"]))
    out.mkdir()
    layouts = {
        "policyengine": lambda area: build_area_h5(area, inputs, out / "pe"),
        "entity_tables": lambda area: entity_tables(area, inputs, out / "tables.h5"),
    }
    samples = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, build in layouts.items():
            for area in areas:
                started = time.perf_counter()
                build(area)
                samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: {"median_ms": statistics.median(values), "files": len(values)} for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, repeats=3).parse_args(argv)
    config = config_for_scale(args.scale)
    sha, code = pinned_code()
    areas = stages.wanted_areas(None)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalRunStore(Path(tmp) / "store")
        meta, results = run_release(store, config, code, running_sha=sha)
        timings = {}
        for workers in (1, 2):
            out = Path(tmp) / f"areas_{workers}"
            timings[workers] = median_seconds(
                lambda: list(stages.build_areas(store, meta.run_id, LocalPool(workers), areas, out)), args.repeats
            )
        layouts = per_file_ms(store, meta.run_id, areas, Path(tmp) / "layouts", args.repeats)
    write_result(
        f"scaleout_{args.scale}",
        {
            "scale": args.scale,
            "areas": len(areas),
            "one_worker_s": {"median": timings[1][0], "samples": timings[1][1]},
            "two_workers_s": {"median": timings[2][0], "samples": timings[2][1]},
            "speedup": timings[1][0] / timings[2][0],
            "goal_speedup": 1.7,
            "per_file": layouts,
            "policyengine_over_entity_tables": layouts["policyengine"]["median_ms"] / layouts["entity_tables"]["median_ms"],
            "goal_policyengine_over_entity_tables": 2.0,
            # The run's model check on its default sample (import, load and compute, in one runner).
            "model_validation_s": meta.step_timings["model_validation"].duration_s,
            "model_validation_areas": int(results["model_validation"].figures["areas_checked"]),
            "model_seconds_per_area": {name.removesuffix("_model_seconds"): value for name, value
                                       in results["model_validation"].figures.items() if name.endswith("_model_seconds")},
        },
    )


if __name__ == "__main__":
    main()
