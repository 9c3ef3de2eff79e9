"""Issue 6's bench: the 489 area files (488 areas + national) built from one reference-scale run's
inputs with 1 and with 2 local worker processes; the ratio of medians is the scale-out."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import bench_parser, median_seconds, pinned_code, write_result
from pipeline_assets import stages
from pipeline_assets.driver import run_release
from pipeline_assets.steps.config import config_for_scale
from resources.compute import LocalPool
from resources.run_store import LocalRunStore


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, repeats=3).parse_args(argv)
    config = config_for_scale(args.scale)
    sha, code = pinned_code()
    areas = stages.wanted_areas(None)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalRunStore(Path(tmp) / "store")
        meta, _ = run_release(store, config, code, running_sha=sha)
        timings = {}
        for workers in (1, 2):
            out = Path(tmp) / f"areas_{workers}"
            timings[workers] = median_seconds(
                lambda: list(stages.build_areas(store, meta.run_id, LocalPool(workers), areas, out)), args.repeats
            )
    write_result(
        f"scaleout_{args.scale}",
        {
            "scale": args.scale,
            "areas": len(areas),
            "one_worker_s": {"median": timings[1][0], "samples": timings[1][1]},
            "two_workers_s": {"median": timings[2][0], "samples": timings[2][1]},
            "speedup": timings[1][0] / timings[2][0],
            "goal_speedup": 1.7,
        },
    )


if __name__ == "__main__":
    main()
