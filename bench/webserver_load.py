"""Issue 18's UI bench: what the Dagster UI's busiest pages cost while they stay open, over an
instance holding one completed release (489 area assets downstream of the stages): GraphQL requests a
second from the page, the webserver's CPU (its process and the code server it starts), and the seconds
from opening the page until it stops asking for statuses (no GraphQL request in flight for a second;
null for a page that never stops within the window)."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance
from playwright.sync_api import sync_playwright

from bench.common import bench_parser, pinned_code, write_result
from pipeline_assets.launch import instance_settings, launch_release
from pipeline_assets.steps.config import config_for_scale
from resources.processes import process_tree_cpu_seconds
from resources.run_store import LocalRunStore
from tests.processes import free_port

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PAGES = {
    "global_lineage": "/asset-groups",
    "release_job": "/locations/pipeline_assets/jobs/release",
    "source_datasets": "/assets/source_datasets",
    "state_weights": "/assets/state_weights",
    "one_district": "/assets/districts/AL_01",
}
SERVER_START_TIMEOUT_S = 180
SETTLED_QUIET_S = 1.0


def start_webserver(home: Path, store: LocalRunStore, port: int) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PIPELINE_STORE": str(store.root)}
    return subprocess.Popen(
        [str(Path(os.sys.executable).parent / "dagster-webserver"), "-w", str(PROJECT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def wait_for_location(page, base: str) -> None:
    """The code location is loaded once the asset catalog lists a stage asset."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            page.goto(f"{base}/assets/policy_data_db", wait_until="domcontentloaded", timeout=30_000)
            page.get_by_text("policy_data_db").first.wait_for(timeout=30_000)
            return
        except Exception:
            time.sleep(2)
    raise TimeoutError(f"the webserver at {base} did not load the code location in {SERVER_START_TIMEOUT_S} s")


def measure_page(page, base: str, path: str, server_pid: int, window_s: float) -> dict:
    """Open `path`, time until its GraphQL traffic first goes quiet, then count requests and CPU over `window_s`."""
    in_flight: set = set()
    requests: list[float] = []
    last_activity = [time.monotonic()]

    def started(request):
        if "/graphql" in request.url:
            in_flight.add(request)
            requests.append(time.monotonic())
            last_activity[0] = time.monotonic()

    def ended(request):
        in_flight.discard(request)
        last_activity[0] = time.monotonic()

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    opened = time.monotonic()
    page.goto(f"{base}{path}", wait_until="domcontentloaded")
    settled_s = None  # a page that keeps polling never goes quiet
    while time.monotonic() - opened < window_s:
        if requests and not in_flight and time.monotonic() - last_activity[0] >= SETTLED_QUIET_S:
            settled_s = round(last_activity[0] - opened, 2)
            break
        page.wait_for_timeout(100)
    count_from, cpu_from, window_from = len(requests), process_tree_cpu_seconds(server_pid), time.monotonic()
    page.wait_for_timeout(window_s * 1000)
    elapsed = time.monotonic() - window_from
    cpu = process_tree_cpu_seconds(server_pid) - cpu_from
    page.remove_listener("request", started)
    page.remove_listener("requestfinished", ended)
    page.remove_listener("requestfailed", ended)
    return {
        "seconds_until_quiet": settled_s,
        "graphql_requests_per_s": round((len(requests) - count_from) / elapsed, 2),
        "webserver_cpu_percent": round(100 * cpu / elapsed, 1),
    }


def median_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, repeats=3)
    parser.add_argument("--window", type=float, default=20.0, help="seconds each page stays open")
    args = parser.parse_args(argv)
    sha, code = pinned_code()
    with tempfile.TemporaryDirectory() as tmp:
        home, store = Path(tmp) / "dagster_home", LocalRunStore(Path(tmp) / "store")
        home.mkdir()
        (home / "dagster.yaml").write_bytes(instance_settings())
        os.environ["DAGSTER_HOME"] = str(home)
        with DagsterInstance.get() as instance:
            outcome = launch_release(store, instance, config_for_scale("tiny"), code, running_sha=sha)
        assert outcome.success, outcome.meta.error
        port = free_port()
        server = start_webserver(home, store, port)
        base = f"http://127.0.0.1:{port}"
        samples: dict[str, list[dict]] = {name: [] for name in PAGES}
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                wait_for_location(page, base)
                idle_from, idle_cpu = time.monotonic(), process_tree_cpu_seconds(server.pid)
                page.goto("about:blank")
                time.sleep(args.window)
                idle = 100 * (process_tree_cpu_seconds(server.pid) - idle_cpu) / (time.monotonic() - idle_from)
                for _ in range(args.repeats):
                    for name, path in PAGES.items():
                        samples[name].append(measure_page(page, base, path, server.pid, args.window))
                browser.close()
        finally:
            os.killpg(server.pid, 9)
            server.wait(10)
    pages = {
        name: {field: median_or_none([s[field] for s in runs]) for field in runs[0]} | {"samples": runs}
        for name, runs in samples.items()
    }
    write_result("webserver_load", {
        "repeats": args.repeats,
        "window_s": args.window,
        "webserver_idle_cpu_percent": round(idle, 1),
        "pages": pages,
        "instance": "one completed tiny release on Dagster's stock SQLite storage",
    })


if __name__ == "__main__":
    main()
