"""The Modal app of the model check: PolicyEngine-US in an image of the model environment's lock.

    modal deploy pipeline_assets/modal_model_app.py

The image installs the lock's exact pins (no resolver) on the model environment's Python and
carries `resources.model_runner`, the script the local runners run; it records the lock's sha256,
and a call from a run whose lock differs is refused. Area files arrive as bytes; the figures, the
interpreter (from which the orchestrator computes the environment's env_id, as locally) and Modal's
image and task ids come back. This module imports only modal, the standard library and the runner (which
imports only the standard library): the model's containers have none of the project's dependencies.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import modal

from resources.model_runner import LOCK_VARIABLE, serve

APP_NAME = "usdata-pipeline-model"
FUNCTION_NAME = "model_remote"
LOCK = Path(__file__).resolve().parent / "data" / "model_environment" / "requirements.lock"
PYTHON = "3.11"  # the model environment's interpreter line (make model-env builds it on the project's)


def build_image() -> modal.Image:
    image = modal.Image.debian_slim(python_version=PYTHON)
    if not modal.is_local():  # in the container: the image is built, and the lock is not there to read
        return image
    return (
        image.pip_install_from_requirements(str(LOCK), extra_options="--no-deps")
        .env({LOCK_VARIABLE: hashlib.sha256(LOCK.read_bytes()).hexdigest(), "HF_HUB_OFFLINE": "1"})
        .add_local_python_source("resources")
    )


app = modal.App(APP_NAME)


@app.function(image=build_image(), cpu=2, memory=16384, timeout=60 * 60)
def model_remote(files: dict[str, bytes], period: int, lock_sha256: str) -> dict:
    return serve(files, period, lock_sha256)
