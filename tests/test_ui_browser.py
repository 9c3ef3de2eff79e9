"""The Dagster UI in a real browser: a webserver on 127.0.0.1 over an instance holding one release run,
headless Chromium on the asset graph and on one area asset's page, screenshots in tests/artifacts/."""

from __future__ import annotations

import html
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from pipeline_assets.launch import instance_settings, launch_release
from pipeline_assets.steps.config import config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore
from tests.conftest import PINNED_SHA

CHROMIUM = Path("/usr/bin/chromium")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKSPACE = PROJECT_ROOT / "workspace.yaml"
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
LOCATION = "pipeline_assets"

STAGE_ASSETS = ["policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights",
                "run_diagnostics"]
AREA_KEY = AssetKey(["districts", "AL_01"])
ENV_KEYS = ["runtime_environment", "python_version", "compute_pool", "cloud_region", "hostname"]

SERVER_START_TIMEOUT_S = 120
CHROMIUM_TIMEOUT_S = 90
# Virtual time: Chromium fast-forwards timers and waits for pending fetches, so a budget renders the
# React app deterministically; a second, longer try covers a slow first paint.
VIRTUAL_TIME_BUDGETS_MS = (15_000, 45_000)

# No "join the community" modal over the pages, and no telemetry from a test.

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)"
)


# ---------------------------------------------------------------------------------------------- helpers


class _Text(HTMLParser):
    """Visible text of a DOM dump: no scripts or styles, whitespace collapsed."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    return " ".join(html.unescape(" ".join(parser.parts)).split())


def snippet(text: str, limit: int = 2500) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... [{len(text) - limit} more chars]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Terminate the process we started, then kill what is left of its session (the code server)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


LOCATION_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message stack } } } } } }"""


def wait_until_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    """server_info answers first; the code location loads after, so wait for it too (bounded)."""

    def log_tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode} before serving; log tail:\n{log_tail()}")
        try:
            urllib.request.urlopen(f"{base}/server_info", timeout=5).read()
            entries = graphql(base, LOCATION_QUERY)["data"]["workspaceOrError"]["locationEntries"]
            entry = next(e for e in entries if e["name"] == LOCATION)
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                pytest.fail(f"code location {LOCATION} failed to load in the webserver: {loaded['message']}\n"
                            f"{''.join(loaded.get('stack') or [])[-3000:]}")
            if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
                return
            last = f"location {entry['loadStatus']}"
        except (urllib.error.URLError, ConnectionError, OSError, KeyError, StopIteration, ValueError) as error:
            last = repr(error)
        time.sleep(1)
    pytest.fail(f"dagster-webserver not ready at {base} within {SERVER_START_TIMEOUT_S}s ({last}); "
                f"log tail:\n{log_tail()}")


def render(url: str, screenshot: Path, profile_root: Path, expected: list[str]) -> str:
    """Headless Chromium: the rendered DOM's visible text, with a screenshot of the same page load.

    Tries again with a longer virtual time budget when an expected string is missing."""
    text = ""
    for attempt, budget in enumerate(VIRTUAL_TIME_BUDGETS_MS):
        profile = profile_root / f"chromium-profile-{screenshot.stem}-{attempt}"
        profile.mkdir(parents=True, exist_ok=True)
        screenshot.unlink(missing_ok=True)
        command = [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget}", "--window-size=2600,1300", "--hide-scrollbars",
            f"--screenshot={screenshot}", "--dump-dom", url,
        ]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            dom, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_process_group(proc, grace_s=2)
            pytest.fail(f"chromium did not finish {url} within {CHROMIUM_TIMEOUT_S}s")
        finally:
            stop_process_group(proc, grace_s=2)  # renderer/GPU helpers left behind, if any
        if proc.returncode != 0 or not dom.strip():
            pytest.fail(f"chromium failed on {url} (exit {proc.returncode}); stderr tail:\n{err[-2000:]}")
        screenshot.with_suffix(".html").write_text(dom)
        text = visible_text(dom)
        if all(needle in text for needle in expected):
            break
    assert screenshot.is_file() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (
        f"no screenshot of {url} at {screenshot}")
    return text


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A persistent on-disk Dagster instance holding one tiny release run: (env, run_id, AL_01 metadata)."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_bytes(instance_settings(home) + b"nux:\n  enabled: false\n")  # as users get it
    store = LocalRunStore(root / "store")
    env = {"DAGSTER_HOME": str(home), "PIPELINE_STORE": str(store.root), "PIPELINE_CODE_SHA": PINNED_SHA}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)  # launch_release exports PIPELINE_STORE; the undo restores it
        code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
        with DagsterInstance.get() as instance:
            outcome = launch_release(store, instance, config_for_scale("tiny"), code, running_sha=PINNED_SHA)
            assert outcome.success and not outcome.failed_checks, (
                f"the release run failed: {outcome.meta.error} {outcome.failed_checks}")
            run_id = outcome.meta.run_id
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AREA_KEY, asset_partitions=[run_id]), limit=1).records
            assert records, f"{AREA_KEY.to_user_string()} has no materialization for {run_id}"
            area_metadata = records[0].asset_materialization.metadata
    return {"env": env, "root": root, "run_id": run_id, "area_metadata": area_metadata}


@pytest.fixture(scope="module")
def webserver(released):
    """dagster-webserver on a free 127.0.0.1 port over that instance; killed by its PID afterwards."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = released["root"] / "webserver.log"
    executable = Path(sys.executable).parent / "dagster-webserver"  # the venv's, next to its python
    assert executable.is_file(), f"{executable} is missing: install the project (make venv)"
    command = [str(executable), "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **released["env"]},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(base, proc, log)
        yield base
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# ------------------------------------------------------------------------------------------------ tests


def test_asset_graph_shows_the_stage_assets(webserver, released, artifacts):
    selection = quote('group:"release"', safe="")
    url = f"{webserver}/asset-groups~{selection}/"  # the global lineage graph, filtered to the release group
    text = render(url, artifacts / "asset_graph.png", released["root"], [f"{a} Latest event" for a in STAGE_ASSETS])
    for asset in STAGE_ASSETS:
        # A node card reads "<name> Latest event ... Partitions 100% filled ... 1 partition".
        card = re.search(rf"\b{asset} Latest event (.{{0,200}}?)1 partition", text)
        assert card, f"no graph node for {asset} at {url}; DOM text: {snippet(text)}"
        assert "100% filled" in card.group(1), f"{asset}'s node is not materialized: {card.group(0)!r}"


def test_area_page_lists_the_run_partition_and_its_environment(webserver, released, artifacts):
    run_id = released["run_id"]
    metadata = released["area_metadata"]
    url = f"{webserver}/assets/{'/'.join(AREA_KEY.path)}?view=partitions&partition={quote(run_id, safe='')}"
    text = render(url, artifacts / "area_asset.png", released["root"], [run_id, "runtime_environment", "hostname"])
    where = f"at {url}; DOM text: {snippet(text)}"

    assert "Materialized (1)" in text, f"the partitions list does not show one materialized partition {where}"
    assert text.count(run_id) >= 3, f"run_id {run_id} missing from the partition list/header/metadata {where}"
    assert f"run_id {run_id}" in text and f"git_sha {PINNED_SHA}" in text, f"run metadata missing {where}"
    for key in ENV_KEYS:
        assert key in text, f"environment metadata key {key!r} missing {where}"

    # What the UI shows is what the run recorded, and what it recorded is this machine.
    python_version = metadata["python_version"].value
    hostname = metadata["hostname"].value
    assert python_version == platform.python_version() and hostname == socket.gethostname()
    for key in ("python_version", "compute_pool", "cloud_region", "hostname"):
        value = metadata[key].value
        assert f"{key} {value}" in text, f"{key} = {value!r} not shown {where}"
    env = metadata["runtime_environment"].value
    for key in ("python_version", "hostname", "compute_pool", "architecture"):
        assert f'"{key}": "{env[key]}"' in text, f"runtime_environment JSON lacks {key} = {env[key]!r} {where}"
