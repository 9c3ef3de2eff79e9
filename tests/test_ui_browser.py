"""Issue 18's acceptance in a real browser: the Dagster UI (webserver and daemon on 127.0.0.1) over an
instance holding one tiny release made with the CLI; every stage asset, three areas and promotion
materialized by clicking through the UI for that run's partition; an area's lineage; the release
job's runs; a sensor preview; a refused promotion. Screenshots in tests/artifacts/ui/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_assets.release import REFUSED_TAG
from tests.ui_browser import (
    ARTIFACTS,
    CHROMIUM,
    PROJECT_ROOT,
    Ui,
    asset_path,
    chromium,
    dagster_ui,
    write_instance_settings,
)

STAGE_ASSETS = ["policy_data_db", "source_datasets", "calibration_package", "state_weights", "national_weights",
                "national_h5", "run_diagnostics", "model_validation", "staged_release"]
AREAS = ["districts/AL_01", "states/AK", "cities/NYC"]
AREA_INPUTS = ["source_datasets", "calibration_package", "state_weights"]
NOT_AREA_INPUTS = ["policy_data_db", "national_weights", "national_h5"]
RELEASE_VERSION = "1.0.0"
CLI_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)"
)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """One tiny release made by `usdata-pipeline run` over a fresh instance and store: (env, root, run_id)."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    write_instance_settings(home, queued=False)  # the command line's run starts at once; the UI's queue for the daemon
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    env = {
        "DAGSTER_HOME": str(home),
        "PIPELINE_STORE": str(root / "store"),
        "PIPELINE_CODE_SHA": sha,
        # The sensor watches this checkout's HEAD, so its preview always sees a commit it has not run.
        "PIPELINE_WATCH_REPO": str(PROJECT_ROOT),
        "PIPELINE_WATCH_BRANCH": "HEAD",
        "PIPELINE_WATCH_SCALE": "tiny",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    cli = subprocess.run([sys.executable, "-m", "pipeline_assets.cli", "run", "--scale", "tiny"], cwd=PROJECT_ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    (root / "cli.log").write_text(cli.stdout + cli.stderr)
    assert cli.returncode == 0, f"usdata-pipeline run failed ({cli.returncode}):\n{(cli.stdout + cli.stderr)[-3000:]}"
    run_id = re.search(r"^run_id\s+(\S+)", cli.stdout, re.MULTILINE)
    assert run_id, f"no run_id in the CLI's summary:\n{cli.stdout[-2000:]}"
    write_instance_settings(home, queued=True)
    return {"env": env, "root": root, "run_id": run_id.group(1)}


@pytest.fixture(scope="module")
def ui(released):
    """One webserver, daemon and browser page for the whole module; tests/artifacts/ui/ holds this
    session's evidence only."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with dagster_ui(released["env"], released["root"]) as base, chromium() as browser:
        page = Ui(browser, base, ARTIFACTS)
        try:
            yield page
        finally:
            page.close()


@pytest.fixture(scope="module")
def launches(ui, released):
    """Every stage asset from its own page, and the three areas as one selection, launched for the
    release's partition before any is waited for (the daemon runs them side by side): target -> the
    Dagster run id, or the error that kept it from launching."""
    run_id = released["run_id"]
    targets = {asset: (lambda asset=asset: ui.materialize_asset(asset, run_id)) for asset in STAGE_ASSETS}
    targets["areas"] = lambda: ui.materialize_selection(AREAS, run_id)
    launched: dict[str, str | AssertionError] = {}
    for target, launch in targets.items():
        try:
            with ui.step(f"launch_{target}"):
                launched[target] = launch()
        except AssertionError as error:
            launched[target] = error
    return launched


def launched_run(launches: dict, target: str) -> str:
    outcome = launches[target]
    if isinstance(outcome, AssertionError):
        raise outcome
    return outcome


def assert_run_succeeded(ui: Ui, dagster_run_id: str, name: str) -> None:
    status = ui.wait_for_run(dagster_run_id)
    with ui.step(f"{name}_run"):
        text = ui.open_run(dagster_run_id)
        assert status == "SUCCESS", f"run {dagster_run_id} ended {status}; its page: {text[:1500]}"
        assert "Success" in text, f"run {dagster_run_id}'s page does not show Success"


def assert_materialization_shows(ui: Ui, asset: str, run_id: str, dagster_run_id: str, name: str) -> None:
    with ui.step(name):
        ui.open(f"{asset_path(asset)}?view=events")
        line = f"Partition {run_id} materialized in run {dagster_run_id[:8]}"
        ui.page.get_by_text(line).first.wait_for()


# ------------------------------------------------------------------------------------------------ tests


def test_cli_launched_run_appears_under_jobs_release(ui, released):
    run_id = released["run_id"]
    with ui.step("jobs_release_runs"):
        ui.open("/assets")
        ui.click_nav("link", "Jobs")
        ui.click_nav("link", "release")
        ui.click_nav("tab", "Runs")
        ui.page.wait_for_url(re.compile(r"/jobs/release/runs"))
        # Runs launched from the UI are the asset job's; a release-job run of this partition is the CLI's.
        ui.page.get_by_text(f"partition: {run_id}").first.wait_for()


@pytest.mark.parametrize("asset", STAGE_ASSETS)
def test_stage_asset_materializes_from_its_page(ui, released, launches, asset):
    dagster_run_id = launched_run(launches, asset)
    assert_run_succeeded(ui, dagster_run_id, asset)
    assert_materialization_shows(ui, asset, released["run_id"], dagster_run_id, f"{asset}_materialized")


def test_three_areas_materialize_as_one_selection(ui, released, launches):
    dagster_run_id = launched_run(launches, "areas")
    assert_run_succeeded(ui, dagster_run_id, "areas")
    for area in AREAS:
        assert_materialization_shows(ui, area, released["run_id"], dagster_run_id,
                                     f"{area.replace('/', '_')}_materialized")


@pytest.mark.parametrize("direction, expected, absent", [
    ("Upstream", AREA_INPUTS, NOT_AREA_INPUTS),
    ("Downstream", ["staged_release"], AREA_INPUTS),
])
def test_area_lineage_shows_its_inputs_and_staged_release_downstream(ui, direction, expected, absent):
    with ui.step(f"area_lineage_{direction.lower()}"):
        ui.open(f"{asset_path(AREAS[0])}?view=lineage")
        ui.click_nav("button", direction)
        ui.page.get_by_text(AREAS[0].split("/")[-1], exact=True).first.wait_for()
        shown = ui.shown_names(expected, absent)
        assert set(expected) <= shown, f"{direction} of {AREAS[0]} lacks {sorted(set(expected) - shown)}"
        assert not shown & set(absent), f"{direction} of {AREAS[0]} wrongly shows {sorted(shown & set(absent))}"


def test_promotion_from_the_ui_then_a_duplicate_version_is_refused(ui, released):
    """promotion is partitioned by release version (config: run_id, allow_dirty): promoting the run
    as 1.0.0 succeeds and shows; promoting as 1.0.0 again is refused, its run page saying why in one
    line, and fails nothing. The run is staged again first: the stage tests' rebuilds added TRO
    revisions, which a promotion refuses to publish from an older staging."""
    run_id = released["run_id"]
    with ui.step("promotion_restage"):
        staged = ui.materialize_asset("staged_release", run_id)
    assert_run_succeeded(ui, staged, "promotion_restaged")
    # allow_dirty: a run made from a developer's work tree is dirty; CI's is clean either way.
    config = f"ops:\n  promotion:\n    config:\n      run_id: {run_id}\n      allow_dirty: true\n"
    with ui.step("promotion_launch"):
        first = ui.launch_from_launchpad("promotion", RELEASE_VERSION, config)
    assert_run_succeeded(ui, first, "promotion_first")
    refusal = ui.run_tags(first).get(REFUSED_TAG)
    assert refusal is None, f"the first promotion of {RELEASE_VERSION} was refused: {refusal}"
    assert_materialization_shows(ui, "promotion", RELEASE_VERSION, first, "promotion_materialized")

    with ui.step("promotion_launch_again"):
        again = ui.launch_from_launchpad("promotion", RELEASE_VERSION, config)
    status = ui.wait_for_run(again)
    with ui.step("promotion_refused_run"):
        ui.open_run(again)
        ui.page.get_by_text("promotion refused:").first.wait_for()  # the event log streams in after the status
        text = ui.text()
        assert status == "SUCCESS", f"a refused promotion of {RELEASE_VERSION} ended {status}: a refusal fails nothing"
        reasons = [line for line in text.splitlines()
                   if "promotion refused:" in line and RELEASE_VERSION in line and "already" in line]
        assert reasons, f"the refused promotion's run page shows no reason naming {RELEASE_VERSION}"


def test_preview_tick_writes_nothing_under_the_store(ui, released):
    store = Path(released["env"]["PIPELINE_STORE"])
    before = {path: path.stat().st_mtime_ns for path in store.rglob("*")}
    with ui.step("sensor_preview"):
        ui.open("/locations/pipeline_assets/sensors/git_commit_sensor")
        ui.page.get_by_role("button", name="Preview tick result").click()
        dialog = ui.page.get_by_role("dialog")
        dialog.get_by_role("button", name="Continue").click()
        dialog.get_by_text("Requested runs (1)").wait_for()
    after = {path: path.stat().st_mtime_ns for path in store.rglob("*")}
    added = sorted(str(p.relative_to(store)) for p in after.keys() - before.keys())
    changed = sorted(str(p.relative_to(store)) for p in before.keys() & after.keys() if before[p] != after[p])
    assert not added and not changed, f"the preview tick wrote under the store: added {added[:5]}, changed {changed[:5]}"
