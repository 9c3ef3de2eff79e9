"""The layer contracts (pyproject's [tool.importlinter], run by `make test`) hold, and fail when a
forbidden import is added: to a copy of the packages, so the checkout is never touched."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("pipeline_assets", "resources", "sensors")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True)


def test_the_project_keeps_its_layers():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("sensors/run_status.py", "from pipeline_assets.launch import launch_release", "sensors.run_status -> pipeline_assets.launch"),
    ("sensors/git_sensor.py", "import pipeline_assets.definitions", "sensors.git_sensor -> pipeline_assets.definitions"),
    ("resources/registry.py", "from pipeline_assets.stages import STEP_ORDER", "resources.registry -> pipeline_assets.stages"),
    ("resources/compute.py", "from pipeline_assets.steps.datasets import build_datasets", "resources.compute -> pipeline_assets.steps.datasets"),
    ("pipeline_assets/steps/uprating.py", "from resources.run_store import LocalRunStore", "pipeline_assets.steps.uprating -> resources.run_store"),
    ("pipeline_assets/steps/geography.py", "import dagster", "pipeline_assets.steps.geography -> dagster"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, broken):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as source:
        source.write(f"\n{line}  # added by the test\n")
    done = lint(tmp_path)
    assert done.returncode == 1 and broken in done.stdout, done.stdout
