"""No credential value leaves the environment: a whole run through the CLI (a fresh interpreter, so
every step process sees the variables) writes none of them to the store, the instance or the logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.processes import wait_no_process_left

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "HF_TOKEN": "hf_SecretTokenValue0123456789abcdef",
    "MODAL_TOKEN_ID": "ak-SecretModalTokenId42",
    "MODAL_TOKEN_SECRET": "as-SecretModalTokenSecret42",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY42",
    "OPENLINEAGE_API_KEY": "ol-SecretLineageApiKey42",
}
FAKE_PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\\nMIIEvFakeKeyMaterialSecret42\\n-----END PRIVATE KEY-----\\n"


def test_no_secret_value_is_written_anywhere(tmp_path):
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"type": "service_account", "private_key_id": "SecretKeyId42", "private_key": FAKE_PRIVATE_KEY}))
    env = {
        **os.environ,
        **SECRETS,
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
        "PIPELINE_STORE": str(tmp_path / "store"),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline_assets.cli", "run", "--scale", "tiny"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # the run worker may still be closing the instance (its SQLite -wal comes and goes) after the
    # command has seen the run end: read the files once nothing of the run writes them
    assert not (left := wait_no_process_left(tmp_path / "store")), f"processes left: {left}"

    needles = [v.encode() for v in SECRETS.values()] + [b"SecretKeyId42", b"MIIEvFakeKeyMaterialSecret42"]
    logs = (done.stdout + done.stderr).encode()
    leaks = [n.decode() for n in needles if n in logs]
    files = [p for base in (tmp_path / "store", tmp_path / "dagster_home") for p in base.rglob("*") if p.is_file()]
    assert len(files) > 489  # the run really wrote its files
    for path in files:
        data = path.read_bytes()
        leaks += [f"{n.decode()} in {path}" for n in needles if n in data]
    assert leaks == []
