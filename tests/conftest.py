"""Shared fixtures: one tiny release through the bare driver, reused by the tests that read it."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipeline_assets.driver import run_release
from pipeline_assets.launch import instance_settings
from pipeline_assets.promotion import stage_release
from pipeline_assets.steps.config import config_for_scale
from resources.git import CodeState
from resources.run_store import LocalRunStore

PINNED_SHA = "a1b2c3d4" + "e" * 32


def shipped_storage(home) -> dict:
    """The instance storage a new $DAGSTER_HOME gets, as instance_for_test(temp_dir=home) overrides."""
    return {"storage": yaml.safe_load(instance_settings(home))["storage"]}
pytest_plugins = ["tests.gcs_emulator"]  # the GCS emulator fixtures: gcs_endpoint, gcs_client, gcs_bucket


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """(store, meta, step results) of one whole tiny stages."""
    store = LocalRunStore(tmp_path_factory.mktemp("store"))
    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    meta, results = run_release(store, config_for_scale("tiny"), code, running_sha=PINNED_SHA)
    return store, meta, results


@pytest.fixture
def store(tiny_release, tmp_path):
    """(store, run_id): a staged copy of the session's completed tiny run, so promotion can change it."""
    source, meta, _ = tiny_release
    copy = LocalRunStore(tmp_path / "store")
    shutil.copytree(source.root, copy.root)
    stage_release(copy, meta.run_id)
    return copy, meta.run_id
