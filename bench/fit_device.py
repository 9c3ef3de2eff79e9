"""The weight fit on a GPU against the CPU, on one reference calibration package (needs a CUDA GPU).

The local fit on cuda: median wall time of --repeats fits, and whether the repeats give bit-identical
weights, with torch's default algorithms and with its deterministic ones. The same fit on the CPU with
every core (one fit: it is the slow side). And how close the two devices' fits are in quality.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from bench.common import add_run_options, bench_parser, median_seconds, pinned_code, result_name, run_config, timed, write_result
from pipeline_assets import stages
from pipeline_assets.driver import run_release
from pipeline_assets.steps.weights import fit_weights
from resources.run_store import LocalRunStore


def repeated_fits(package: Path, out: Path, config, repeats: int) -> dict:
    """Median seconds of `repeats` fits, the weights' sha256 of each, and the last fit's figures."""
    digests, figures = [], {}

    def fit():
        figures.update(fit_weights(package, out / "weights.npy", out / "log.csv", config).figures)
        digests.append(hashlib.sha256((out / "weights.npy").read_bytes()).hexdigest())

    median, samples = median_seconds(fit, repeats)
    return {
        "median_s": median,
        "samples_s": samples,
        "bit_identical_repeats": len(set(digests)) == 1,
        "weights_sha256": sorted(set(digests)),
        "final_mean_rel_abs_error": figures["final_mean_rel_abs_error"],
        "final_max_rel_abs_error": figures["final_max_rel_abs_error"],
        "fit_seconds_in_step": figures["fit_seconds"],
    }


def deterministic_fits(package: Path, out: Path, config, repeats: int) -> dict:
    """The same repeats under torch.use_deterministic_algorithms(True), or the error it raises."""
    torch.use_deterministic_algorithms(True)
    try:
        return repeated_fits(package, out, config, repeats)
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0]}
    finally:
        torch.use_deterministic_algorithms(False)


def main(argv: list[str] | None = None) -> None:
    parser = add_run_options(bench_parser(__doc__, repeats=3))
    parser.set_defaults(fit_device="cuda")
    args = parser.parse_args(argv)
    config = run_config(args)
    sha, code = pinned_code()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = LocalRunStore(tmp / "store")
        run_seconds, (meta, _) = timed(lambda: run_release(store, config, code, running_sha=sha))
        package = stages.artifact(store, meta.run_id, "calibration_package")
        gpu = repeated_fits(package, tmp, config.local_fit, args.repeats)
        gpu_deterministic = deterministic_fits(package, tmp, config.local_fit, 2)
        cpu_fit = config.local_fit.model_copy(update={"device": "cpu", "threads": os.cpu_count()})
        cpu = repeated_fits(package, tmp, cpu_fit, 1)
    write_result(
        result_name("fit_device", args),
        {
            "scale": args.scale,
            "epochs": config.local_fit.epochs,
            "whole_run_s": run_seconds,
            "run_steps_s": {step: t.duration_s for step, t in meta.step_timings.items()},
            "fit_device": args.fit_device,
            "local_fit_on_device": gpu,
            "local_fit_on_device_deterministic_algorithms": gpu_deterministic,
            "local_fit_on_cpu_all_cores": {**cpu, "threads": cpu_fit.threads},
            "cpu_over_device": cpu["median_s"] / gpu["median_s"],
            "torch": torch.__version__,
        },
    )


if __name__ == "__main__":
    main()
