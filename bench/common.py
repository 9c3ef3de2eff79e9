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

from pipeline_assets.identity import running_code_sha
from resources.git import CodeState

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
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    samples = [timed(fn)[0] for _ in range(repeats)]
    return statistics.median(samples), samples


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "measured_at": datetime.now(timezone.utc).isoformat(), "machine": machine(), **payload}
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


def pinned_code() -> tuple[str, CodeState]:
    """The running code's SHA, pinned for every run a bench makes (a commit mid-bench must not skew it)."""
    sha = running_code_sha()
    return sha, CodeState(sha=sha, branch=None, dirty=False, diff_sha256=None)
