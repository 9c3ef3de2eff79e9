"""Shared bench helpers: medians, the machine description, and result files under bench/results/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline_assets.steps.config import RunConfig, config_for_scale
from resources.git import CodeState, running_code_sha
from resources.runtime import gpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu_model(), "python": platform.python_version(), "os": platform.platform(),
    }


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    samples = [timed(fn)[0] for _ in range(repeats)]
    return statistics.median(samples), samples


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name, "measured_at": datetime.now(timezone.utc).isoformat(), "code_sha": running_code_sha(),
        "machine": machine(), **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return path


def bench_parser(doc: str | None, repeats: int) -> argparse.ArgumentParser:
    """--scale (default reference) and --repeats, the options every bench takes."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--scale", default="reference")
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--fit-device and --workers, for the benches that make whole runs (a GPU machine uses both)."""
    parser.add_argument("--fit-device", choices=["cpu", "cuda"], default="cpu", help="where the runs' fits run")
    parser.add_argument("--workers", type=int, help="area workers (default: the scale's)")
    return parser


def run_config(args: argparse.Namespace, **overrides) -> RunConfig:
    """The scale's RunConfig with the bench's fit device and area workers, then `overrides` (by section)."""
    sections: dict = {fit: {"device": args.fit_device} for fit in ("local_fit", "national_fit")}
    if args.workers:
        sections["areas"] = {"workers": args.workers}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return config_for_scale(args.scale, **sections)


def result_name(bench: str, args: argparse.Namespace) -> str:
    """bench_scale, with _cuda where the fits ran on a GPU (those results sit beside the CPU ones)."""
    return f"{bench}_{args.scale}" + ("_cuda" if args.fit_device == "cuda" else "")


def pinned_code() -> tuple[str, CodeState]:
    """The running code's SHA, pinned for every run a bench makes (a commit mid-bench must not skew it)."""
    sha = running_code_sha()
    return sha, CodeState(sha=sha, branch=None, dirty=False, diff_sha256=None)
