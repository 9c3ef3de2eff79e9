"""Issue 4's bench: streamed hashing against `openssl dgst -sha256` on the same files, the cost of
one runtime-environment capture, and fit-settings-only re-runs (with step reuse: one changing the local
fit's settings, one the national fit's) against a full run."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.common import add_run_options, bench_parser, median_seconds, pinned_code, result_name, run_config, timed, write_result
from pipeline_assets.driver import run_release
from pipeline_assets.steps.config import RunConfig
from resources.files import sha256_file
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunMeta
from resources.runtime import capture


def hashing(tmp: Path, size_mb: int, repeats: int) -> dict:
    files = []
    for i in range(3):
        path = tmp / f"blob_{i}.bin"
        with open(path, "wb") as handle:
            for _ in range(size_mb):
                handle.write(os.urandom(1 << 20))
        files.append(path)
    total_bytes = sum(p.stat().st_size for p in files)
    for path in files:  # warm the page cache for both contenders
        sha256_file(path)
    ours, _ = median_seconds(lambda: [sha256_file(p) for p in files], repeats)
    openssl, _ = median_seconds(
        lambda: subprocess.run(["openssl", "dgst", "-sha256", *map(str, files)], check=True, capture_output=True), repeats
    )
    return {
        "bytes": total_bytes,
        "ours_gb_per_s": total_bytes / ours / 1e9,
        "openssl_gb_per_s": total_bytes / openssl / 1e9,
        "ratio_ours_over_openssl": openssl / ours,
        "goal_ratio": 0.9,
    }


def environment_capture(repeats: int) -> dict:
    first, _ = timed(capture)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        capture()
        samples.append(time.perf_counter() - started)
    return {"first_call_ms": first * 1e3, "median_ms": statistics.median(samples) * 1e3, "goal_ms": 50}


def timed_release(root: str, config_json: str, sha: str) -> tuple[float, str]:
    """One release into the store at `root`, timed from its start; returns (seconds, meta JSON)."""
    code = CodeState(sha=sha, branch=None, dirty=False, diff_sha256=None)
    config = RunConfig.model_validate_json(config_json)
    seconds, (meta, _) = timed(lambda: run_release(LocalRunStore(root), config, code, running_sha=sha))
    return seconds, meta.model_dump_json()


def release_in_fresh_process(root: str, config: RunConfig, sha: str) -> tuple[float, RunMeta]:
    """timed_release in a new interpreter, as each `usdata-pipeline run` is: a GPU fit pays for
    starting CUDA in every run, not in the first alone (imports are not timed)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds, meta_json = pool.submit(timed_release, root, config.model_dump_json(), sha).result()
    return seconds, RunMeta.model_validate_json(meta_json)


def steps_of(meta: RunMeta) -> dict:
    return {step: {"reuse": t.reuse, "seconds": t.duration_s} for step, t in meta.step_timings.items()}


def refit_rerun(args) -> dict:
    """A full run, then a run that changes only the local (state) fit's settings, then one that changes
    only the national fit's, each re-run against the full run; `args.rerun_repeats` times, each in a
    new store, and the medians."""
    sha, _code = pinned_code()
    base = run_config(args)
    local = run_config(args, local_fit={"lambda_l0": base.local_fit.lambda_l0 * 2})
    national = run_config(args, national_fit={"lambda_l0": base.national_fit.lambda_l0 * 2})
    samples: dict[str, list[float]] = {"full": [], "local": [], "national": []}
    last: dict[str, RunMeta] = {}
    for _ in range(args.rerun_repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for kind, config in (("full", base), ("local", local), ("national", national)):
                seconds, last[kind] = release_in_fresh_process(tmp, config, sha)
                samples[kind].append(seconds)
    full, local_rerun, national_rerun = (statistics.median(samples[kind]) for kind in ("full", "local", "national"))
    return {
        "area_workers": base.areas.workers,
        "repeats": args.rerun_repeats,
        "full_run_s": full,
        "fit_settings_rerun_s": local_rerun,
        "ratio": local_rerun / full,
        "national_fit_settings_rerun_s": national_rerun,
        "national_ratio": national_rerun / full,
        "samples_s": samples,
        "ratio_samples": [rerun / whole for rerun, whole in zip(samples["local"], samples["full"])],
        "national_ratio_samples": [rerun / whole for rerun, whole in zip(samples["national"], samples["full"])],
        "goal_ratio": 0.35,
        # the steps of the last repeat
        "full_run_steps_s": {step: t.duration_s for step, t in last["full"].step_timings.items()},
        "rerun_steps": steps_of(last["local"]),
        "national_rerun_steps": steps_of(last["national"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = add_run_options(bench_parser(__doc__, repeats=5))
    parser.add_argument("--hash-mb", type=int, default=256, help="size of each of the three hashed files")
    parser.add_argument("--rerun-repeats", type=int, default=5, help="full run + the two re-runs, this many times")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        hashed = hashing(Path(tmp), args.hash_mb, args.repeats)
    write_result(
        result_name("provenance", args),
        {
            "hashing": hashed,
            "environment_capture": environment_capture(200),
            "fit_settings_only_rerun": refit_rerun(args),
            "scale": args.scale,
            "fit_device": args.fit_device,
        },
    )


if __name__ == "__main__":
    main()
