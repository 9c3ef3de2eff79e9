"""The weight fit on a GPU (needs a CUDA GPU), on one reference calibration package.

Three fits of the local targets, each timed (median of --repeats) with the sha256 of every repeat's
weights: this project's model (ReproducibleCalibrationWeights) on the GPU; l0-python's own
SparseCalibrationWeights on the GPU (its COO product: is it as fast, does it repeat bit for bit?);
and this project's model on the CPU with every core (one repeat: it is the slow side).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from l0.calibration import SparseCalibrationWeights

from bench.common import add_run_options, bench_parser, median_seconds, pinned_code, result_name, run_config, timed, write_result
from pipeline_assets import stages, step_graph
from pipeline_assets.driver import run_release
from pipeline_assets.reuse import read_record
from pipeline_assets.steps.calibration import load_calibration_package, relative_errors
from pipeline_assets.steps.weights import FitProblem, ReproducibleCalibrationWeights, fit_l0, fit_problem
from resources.run_store import LocalRunStore


def repeated_fits(problem: FitProblem, config, repeats: int, model_class) -> dict:
    """Median seconds of `repeats` fits, whether their weights are bit-identical, the fit's error."""
    fits: list[np.ndarray] = []
    median, samples = median_seconds(
        lambda: fits.append(fit_l0(problem.matrix, problem.values, problem.groups, problem.initial, config, model_class)),
        repeats,
    )
    digests = sorted({hashlib.sha256(weights.tobytes()).hexdigest() for weights in fits})
    errors = np.abs(relative_errors(problem.matrix @ fits[-1], problem.values))
    return {
        "model": model_class.__name__,
        "device": config.device,
        "threads": config.threads,
        "median_s": median,
        "samples_s": samples,
        "bit_identical_repeats": len(digests) == 1,
        "weights_sha256": digests,
        "final_mean_rel_abs_error": float(errors.mean()),
        "final_max_rel_abs_error": float(errors.max()),
    }


def differing_outputs(store: LocalRunStore, run_a: str, run_b: str) -> list[str]:
    """The output files of two runs whose sha256 differ, by path in the run."""
    differing = []
    for step in step_graph.STEP_ORDER:
        a, b = read_record(store, run_a, step).outputs, read_record(store, run_b, step).outputs
        differing += sorted(rel for rel in a.keys() | b.keys() if a.get(rel) != b.get(rel))
    return differing


def main(argv: list[str] | None = None) -> None:
    parser = add_run_options(bench_parser(__doc__, repeats=3))
    parser.set_defaults(fit_device="cuda")
    args = parser.parse_args(argv)
    config = run_config(args)
    sha, code = pinned_code()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalRunStore(Path(tmp))
        run_seconds, (meta, _) = timed(lambda: run_release(store, config, code, running_sha=sha))
        again, _ = run_release(store, config.model_copy(update={"reuse": False}), code, running_sha=sha)
        differing = differing_outputs(store, meta.run_id, again.run_id)
        package = load_calibration_package(stages.artifact(store, meta.run_id, "calibration_package"))
    fit = config.local_fit
    problem = fit_problem(package, fit.scope)
    ours = repeated_fits(problem, fit, args.repeats, ReproducibleCalibrationWeights)
    stock = repeated_fits(problem, fit, args.repeats, SparseCalibrationWeights)
    cpu = repeated_fits(problem, fit.model_copy(update={"device": "cpu", "threads": os.cpu_count()}), 1, ReproducibleCalibrationWeights)
    write_result(
        result_name("fit_device", args),
        {
            "scale": args.scale,
            "epochs": fit.epochs,
            "columns": int(problem.matrix.shape[1]),
            "targets": int(problem.matrix.shape[0]),
            "whole_run_s": run_seconds,
            # A second whole run without reuse: every output's sha256 against the first run's.
            "rerun_outputs_differing": differing,
            "run_steps_s": {step: t.duration_s for step, t in meta.step_timings.items()},
            "ours_on_device": ours,
            "l0_python_on_device": stock,
            "ours_on_cpu_all_cores": cpu,
            "l0_python_over_ours": stock["median_s"] / ours["median_s"],
            "cpu_over_device": cpu["median_s"] / ours["median_s"],
            "torch": torch.__version__,
        },
    )


if __name__ == "__main__":
    main()
