"""Helpers of the browser tests of the Dagster UI: the webserver and daemon over a test instance,
headless Chromium through Playwright, and page steps that leave a screenshot at each assertion and,
when a step fails, the screenshot and the page's text, so the failure explains itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from pipeline_assets.launch import instance_settings
from tests.processes import free_port, stop_process_group

CHROMIUM = Path("/usr/bin/chromium")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKSPACE = PROJECT_ROOT / "workspace.yaml"
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts" / "ui"
LOCATION = "pipeline_assets"

SERVER_START_TIMEOUT_S = 180
UI_TIMEOUT_MS = 30_000  # one page action: the code server answers slowly on a loaded machine
RUN_TIMEOUT_S = 420
CONFIG_CHECK_TIMEOUT_MS = 10_000
MAX_CONCURRENT_RUNS = 3
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


def write_instance_settings(home: Path, queued: bool) -> None:
    """The settings users get (instance_settings), with no "join the community" modal over the pages;
    `queued`: runs wait for the test's daemon, at most MAX_CONCURRENT_RUNS at once (each is a process
    importing the fit's libraries, on a machine of few cores)."""
    settings = yaml.safe_load(instance_settings()) or {}
    settings["nux"] = {"enabled": False}
    if queued:
        settings["run_coordinator"] = {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                                       "config": {"max_concurrent_runs": MAX_CONCURRENT_RUNS}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    if answer.get("errors"):
        raise AssertionError(f"GraphQL errors: {answer['errors']}")
    return answer["data"]


LOCATION_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message stack } } } } } }"""


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def wait_until_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    """server_info answers first; the code location loads after, so wait for it too (bounded)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode} before serving; log tail:\n{log_tail(log)}")
        try:
            urllib.request.urlopen(f"{base}/server_info", timeout=5).read()
            entries = graphql(base, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
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
                f"log tail:\n{log_tail(log)}")


def dagster_command(name: str) -> str:
    executable = Path(sys.executable).parent / name  # the venv's, next to its python
    assert executable.is_file(), f"{executable} is missing: install the project (make venv)"
    return str(executable)


@contextmanager
def dagster_ui(env: dict[str, str], logs: Path):
    """dagster-webserver on a free 127.0.0.1 port and dagster-daemon (which dequeues the runs the UI
    launches, as under `dagster dev`), both over `env`'s instance; yields the UI's base URL. Both are
    stopped by their PIDs afterwards."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    environment = {**os.environ, **env}
    commands = {
        "webserver": [dagster_command("dagster-webserver"), "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)],
        "daemon": [dagster_command("dagster-daemon"), "run", "-w", str(WORKSPACE)],
    }
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("w") as out:
                processes[name] = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_ready(base, processes["webserver"], logs / "webserver.log")
        yield base
    finally:
        for proc in processes.values():
            stop_process_group(proc)


@contextmanager
def chromium():
    """Headless system Chromium (never a downloaded browser)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


def whole_words(text: str, names: list[str]) -> set[str]:
    """The names the text shows whole, or as the lineage graph's narrow nodes cut them in the middle
    ("calibrati…_package")."""
    cut = [(left, right) for left, right in re.findall(r"(?<![\w/])([\w/]+)…([\w/]+)(?![\w/])", text)]
    return {name for name in names if re.search(rf"(?<![\w/]){re.escape(name)}(?![\w/])", text)
            or any(name.startswith(left) and name.endswith(right) and len(left) + len(right) < len(name) for left, right in cut)}


def asset_path(key: str) -> str:
    return "/assets/" + "/".join(quote(part, safe="") for part in key.split("/"))


class Ui:
    """One browser page on the Dagster UI, with the steps the tests take and their evidence."""

    def __init__(self, browser: Browser, base: str, artifacts: Path):
        self.base = base
        self.artifacts = artifacts
        self.page: Page = browser.new_page(viewport={"width": 1600, "height": 1000})
        self.page.set_default_timeout(UI_TIMEOUT_MS)

    def close(self) -> None:
        self.page.close()

    def open(self, path: str) -> Page:
        self.page.goto(self.base + path)
        return self.page

    def text(self) -> str:
        return self.page.inner_text("body")

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path

    @contextmanager
    def step(self, name: str):
        """A step of a test: a screenshot when it passes; when it fails, a screenshot and the page's
        text (name.failed.png, name.failed.txt), named in the error."""
        try:
            yield self.page
        except BaseException as error:
            screenshot, page_text = self.artifacts / f"{name}.failed.png", self.artifacts / f"{name}.failed.txt"
            try:
                self.page.screenshot(path=screenshot, full_page=True)
                page_text.write_text(f"{self.page.url}\n\n{error}\n\n{self.text()}")
            except Exception as capture_error:  # the page itself is gone: the original error says why
                page_text.write_text(f"{error}\n\n(no page: {capture_error})")
            raise AssertionError(f"step {name} failed (evidence: {screenshot}, {page_text}): {error}") from error
        self.shot(name)

    # ------------------------------------------------------------------ launching

    def pick_partition(self, partition: str) -> None:
        """In the open launch dialog, select `partition` in the partition picker."""
        dialog = self.page.get_by_role("dialog").first
        dialog.get_by_text("Select a partition or create one").click()
        picker = self.page.get_by_role("dialog").last
        picker.get_by_placeholder("Filter partitions").fill(partition)
        picker.get_by_role("menuitem").filter(has_text=partition).first.click()
        self.page.keyboard.press("Escape")
        dialog.get_by_text("1 partition", exact=True).wait_for()

    def launch_from_dialog(self, partition: str) -> str:
        """Materialize… is open: pick the partition, launch one run; the Dagster run id (from the
        toast's link to the run)."""
        dialog = self.page.get_by_role("dialog").first
        dialog.get_by_text("Partition selection").wait_for()
        self.pick_partition(partition)
        error = dialog.get_by_text("Error loading base asset job")
        if error.count():
            raise AssertionError(f"the launch dialog cannot launch: {dialog.inner_text()[-400:]!r}")
        dialog.get_by_role("button", name="Launch 1 run").click()
        toast_link = self.page.locator('a[href*="/runs/"]', has_text="View").first  # "Launched run abcd1234 View"
        toast_link.wait_for()
        return toast_link.get_attribute("href").rstrip("/").split("/runs/")[-1]

    def materialize_asset(self, key: str, partition: str) -> str:
        """Open the asset's page, Materialize… one partition; the Dagster run id."""
        self.open(asset_path(key))
        self.page.get_by_role("button", name="Materialize…").click()
        return self.launch_from_dialog(partition)

    def materialize_selection(self, keys: list[str], partition: str) -> str:
        """The catalog filtered to `keys`, all of them checked, Materialize selected: one run."""
        selection = " or ".join(f'key:"{key}"' for key in keys)
        self.open(f"/assets?asset-selection={quote(selection, safe='')}")
        for key in keys:
            self.page.get_by_text(key.replace("/", " / "), exact=True).first.wait_for()
        self.page.locator("label").filter(has=self.page.get_by_role("checkbox")).first.click()  # the header's: every row
        self.page.get_by_role("button", name=re.compile(r"Materialize selected")).click()  # "… (3)…", after its icon's name
        return self.launch_from_dialog(partition)

    def choose_launchpad_partition(self, partition: str) -> None:
        """In the open launchpad: select `partition`, adding it first where the asset has no such partition yet."""
        launchpad = self.page.get_by_role("dialog").first
        picker = launchpad.get_by_role("combobox")
        picker.click()
        picker.press_sequentially(partition)  # typed: a filled value opens no suggestions
        existing = self.page.get_by_role("menuitem").filter(has_text=re.compile(rf"^{re.escape(partition)}$"))
        try:
            existing.first.wait_for(timeout=3000)
        except PlaywrightTimeoutError:
            launchpad.get_by_role("button", name="Add new partition").click()
            adding = self.page.get_by_role("dialog").last
            adding.get_by_role("textbox").first.fill(partition)
            adding.get_by_role("button", name="Save").click()
        else:
            existing.first.click()
        launchpad.get_by_text(f"partition: {partition}").first.wait_for()

    def launch_from_launchpad(self, key: str, partition: str, config_yaml: str) -> str:
        """Open the asset's page, Materialize… (its launchpad: the asset takes config), choose the
        partition, replace the config with `config_yaml`, launch; the Dagster run id (from the run
        page the launch opens)."""
        self.open(asset_path(key))
        self.page.get_by_role("button", name="Materialize…").click()
        launchpad = self.page.get_by_role("dialog").first
        launchpad.get_by_text("Launchpad").first.wait_for()
        self.choose_launchpad_partition(partition)
        launchpad.locator(".CodeMirror").first.click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.press("Delete")
        self.page.keyboard.insert_text(config_yaml)  # no key events: the editor does not re-indent it
        self.expect_valid_config(launchpad)
        launchpad.get_by_role("button", name=re.compile(r"\bMaterialize$")).click()  # after its icon's name
        self.page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
        return self.page.url.split("/runs/")[-1].split("?")[0].rstrip("/")

    def expect_valid_config(self, launchpad) -> None:
        """The launchpad's own validation: "No errors", else its error list as the failure."""
        try:
            launchpad.get_by_text("No errors").wait_for(timeout=CONFIG_CHECK_TIMEOUT_MS)
        except PlaywrightTimeoutError:
            panel = launchpad.inner_text()
            errors = panel[panel.find("ERRORS"):panel.find("CONFIG ACTIONS")].strip()
            raise AssertionError(f"the launchpad refuses the config: {errors or panel[-800:]}") from None

    def shown_names(self, wanted: list[str], others: list[str], timeout_s: float = UI_TIMEOUT_MS / 1000) -> set[str]:
        """Which of `wanted` + `others` the page shows as whole names, once all of `wanted` do (or at
        the timeout, for the assertion to name what is missing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            shown = whole_words(self.text(), wanted + others)
            if set(wanted) <= shown or time.monotonic() > deadline:
                return shown
            time.sleep(1)

    def click_nav(self, role: str, name: str) -> None:
        """A link, tab or button by its visible name (after any icon's name, which Dagster's include)."""
        self.page.get_by_role(role, name=re.compile(rf"(^|\s){re.escape(name)}$")).first.click()

    # ------------------------------------------------------------------ runs

    def wait_for_run(self, dagster_run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
        """The run's terminal status (SUCCESS, FAILURE, CANCELED), polled from the UI's own API."""
        query = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
        deadline = time.monotonic() + timeout_s
        status = "unknown"
        while time.monotonic() < deadline:
            answer = graphql(self.base, query, {"id": dagster_run_id})["runOrError"]
            status = answer.get("status", answer["__typename"])
            if status in TERMINAL_RUN_STATUSES:
                return status
            time.sleep(2)
        raise AssertionError(f"run {dagster_run_id} still {status} after {timeout_s:.0f}s")

    def run_tags(self, dagster_run_id: str) -> dict[str, str]:
        query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { tags { key value } } } }"
        answer = graphql(self.base, query, {"id": dagster_run_id})["runOrError"]
        return {tag["key"]: tag["value"] for tag in answer.get("tags", [])}

    def open_run(self, dagster_run_id: str) -> str:
        """The run's page, once its status shows; its text."""
        self.open(f"/runs/{dagster_run_id}")
        self.page.get_by_text(dagster_run_id[:8]).first.wait_for()
        self.page.get_by_text(re.compile(r"^(Success|Failure|Failed|Canceled)$")).first.wait_for()
        return self.text()
