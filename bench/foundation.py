"""Issue 2's bench: every step of a reference-scale release through the bare driver; the fit step
against its model called directly on the same matrix (ratio of medians: the step's overhead); and
that model against l0-python's own SparseCalibrationWeights on the same fit."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from l0.calibration import SparseCalibrationWeights

from bench.common import bench_parser, median_seconds, pinned_code, write_result
from pipeline_assets import stages
from pipeline_assets.driver import run_release
from pipeline_assets.steps.calibration import load_calibration_package
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.steps.weights import fit_l0, fit_problem, fit_weights
from resources.run_store import LocalRunStore


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, repeats=3).parse_args(argv)
    config = config_for_scale(args.scale)
    sha, code = pinned_code()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalRunStore(Path(tmp) / "store")
        meta, results = run_release(store, config, code, running_sha=sha)
        steps = {name: timing.duration_s for name, timing in meta.step_timings.items()}
        package_path = stages.artifact(store, meta.run_id, "calibration_package")
        package = load_calibration_package(package_path)
        fit = config.local_fit
        problem = fit_problem(package, fit.scope)
        direct_args = (problem.matrix, problem.values, problem.groups, problem.initial, fit)

        step_median, step_samples = median_seconds(
            lambda: fit_weights(package_path, Path(tmp) / "w.npy", Path(tmp) / "log.csv", fit), args.repeats
        )
        direct_median, direct_samples = median_seconds(
            lambda: fit_l0(*direct_args), args.repeats
        )
        stock_median, stock_samples = median_seconds(
            lambda: fit_l0(*direct_args, SparseCalibrationWeights), args.repeats
        )
        fit_figures = results["state_weights"].figures
        nonzero = int(np.count_nonzero(np.load(stages.artifact(store, meta.run_id, "state_weights"))))
    write_result(
        f"foundation_{args.scale}",
        {
            "scale": args.scale,
            "households": config.dataset.households,
            "clones": config.calibration.clones,
            "columns": int(problem.matrix.shape[1]),
            "targets_total": int(package.matrix.shape[0]),
            "targets_local_fit": int(problem.matrix.shape[0]),
            "epochs": fit.epochs,
            "step_seconds": steps,
            "total_seconds": round(sum(steps.values()), 3),
            "fit_step_vs_direct_l0": {
                "step_median_s": step_median,
                "direct_median_s": direct_median,
                "ratio": step_median / direct_median,
                "step_samples_s": step_samples,
                "direct_samples_s": direct_samples,
            },
            # The same fit with l0-python's own SparseCalibrationWeights (its COO sparse product)
            # instead of ReproducibleCalibrationWeights (fixed-order CSR products).
            "l0_python_model_vs_ours": {
                "l0_python_median_s": stock_median,
                "l0_python_samples_s": stock_samples,
                "ours_median_s": direct_median,
                "speedup": stock_median / direct_median,
            },
            "local_fit_error": {
                "initial_mean_rel_abs_error": fit_figures["initial_mean_rel_abs_error"],
                "final_mean_rel_abs_error": fit_figures["final_mean_rel_abs_error"],
            },
            "areas_built": len(results["local_areas"]),
            "nonzero_weights": nonzero,
        },
    )


if __name__ == "__main__":
    main()
