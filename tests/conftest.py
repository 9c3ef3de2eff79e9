"""Shared fixtures: one tiny release through the bare driver, reused by the tests that read it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline_assets.driver import run_release
from pipeline_assets.launch import instance_settings
from pipeline_assets.promotion import stage_release
from pipeline_assets.steps.config import config_for_scale
from resources.compute import CoreShare, LocalPool
from resources.git import CodeState
from resources.run_store import LocalRunStore

PINNED_SHA = "a1b2c3d4" + "e" * 32


def shipped_settings() -> dict:
    """The settings a new $DAGSTER_HOME gets, as instance_for_test overrides: runs launch as they
    are submitted (instance_for_test's own settings queue them for a daemon no test runs)."""
    return yaml.safe_load(instance_settings())
# fixtures: the GCS emulator (gcs_endpoint, gcs_client, gcs_bucket), PostgreSQL (postgres_server, postgres_database),
# PolicyEngine's published readers (policyengine_wheel, policyengine_tro_schema, policyengine_read_registry)
pytest_plugins = ["tests.gcs_emulator", "tests.postgres", "tests.policyengine_wheel"]


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """(store, meta, step results) of one whole tiny release through the bare driver. Its fits divide
    the cores among themselves only: a fit of another test running at the same moment does not count."""
    store = LocalRunStore(tmp_path_factory.mktemp("store"))
    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    config = config_for_scale("tiny")
    pool = LocalPool(config.areas.workers, cores=CoreShare(tmp_path_factory.mktemp("fits")))
    meta, results = run_release(store, config, code, pool=pool, running_sha=PINNED_SHA)
    return store, meta, results


def copy_store(store: LocalRunStore, where: Path) -> LocalRunStore:
    """A copy of `store` at where/store: its own files (no links), so changing them leaves `store` as it was."""
    copy = LocalRunStore(where / "store")
    shutil.copytree(store.root, copy.root)
    return copy


@pytest.fixture
def tiny_copy(tiny_release, tmp_path):
    """(store, meta): a copy of the session's completed tiny run, free to change: a test that needs a
    first default tiny run and then changes it copies the one run instead of computing its own."""
    source, meta, _ = tiny_release
    copy = copy_store(source, tmp_path)
    return copy, copy.read_meta(meta.run_id)


@pytest.fixture
def store(tiny_copy):
    """(store, run_id): a staged copy of the session's completed tiny run, so promotion can change it."""
    copy, meta = tiny_copy
    stage_release(copy, meta.run_id)
    return copy, meta.run_id


# --- the reliability suite's own figures ------------------------------------------------------------
# Tests marked @pytest.mark.reliability("bad_input" | "fault" | "concurrency" | "tamper") are counted
# per class (each parametrized case once); the session (under xdist, its controller, which receives
# every worker's reports) writes the tally to tests/artifacts/
# reliability.json, which is where the README's reliability figures come from.
RELIABILITY_REPORT = Path(__file__).resolve().parent / "artifacts" / "reliability.json"
_reliability: dict[str, dict[str, int]] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(kind): a case of the reliability suite, counted by kind")


def pytest_runtest_logreport(report):
    kind = getattr(report, "reliability_kind", None)
    if kind is None or (report.when != "call" and not (report.failed or report.skipped)):
        return
    tally = _reliability.setdefault(kind, {"tried": 0, "handled": 0})
    tally["tried"] += 1
    tally["handled"] += int(report.passed and report.when == "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    marker = item.get_closest_marker("reliability")
    if marker is not None:
        outcome.get_result().reliability_kind = marker.args[0]


def pytest_sessionfinish(session):
    if _reliability and not hasattr(session.config, "workerinput"):  # under xdist: the controller, which hears every report
        RELIABILITY_REPORT.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(RELIABILITY_REPORT.read_text()) if RELIABILITY_REPORT.is_file() else {}
        RELIABILITY_REPORT.write_text(json.dumps({**previous, **_reliability}, indent=2, sort_keys=True) + "\n")
