"""The Modal app: the weight fit on a GPU and the area builds on CPU workers, running the same step code.

Deploy it at the run's pinned SHA from a clean checkout of that SHA:

    PIPELINE_CODE_SHA=$(git rev-parse HEAD) [PIPELINE_MODAL_GPU=H100] modal deploy pipeline_assets/modal_app.py

The image installs the project's pinned dependencies (pyproject.toml), carries the source of
`pipeline_assets` and `resources`, and sets PIPELINE_CODE_SHA, so each remote call can refuse to run
code other than its run's pinned SHA. An image deployed without PIPELINE_CODE_SHA cannot tell which
code it runs and refuses every call. Inputs arrive as bytes and outputs leave as bytes: the
orchestrator (resources.modal_compute.ModalCompute) writes them into the run store, never the remote.
Every call returns the runtime environment it ran in (Modal's region, task and image variables).

`fit_from_bytes` and `areas_from_bytes` are the remote functions' bodies, plain Python testable locally.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import modal

from pipeline_assets.identity import ensure_no_skew
from pipeline_assets.steps import geography
from pipeline_assets.steps.config import FitConfig
from pipeline_assets.steps.local_areas import build_area_h5, load_area_inputs
from resources.git import CODE_SHA_VARIABLE, SOURCE_ROOT
from resources.modal_compute import APP_NAME, AREA_INPUTS
from resources.runtime import capture

GPU_VARIABLE = "PIPELINE_MODAL_GPU"
GPU = os.environ.get(GPU_VARIABLE, "A100")
REMOTE_RUN = "(remote call)"  # the remote functions know the pinned SHA, not the run_id


def fit_from_bytes(package_bytes: bytes, config_json: str, pinned_sha: str) -> dict:
    """Fit weights from a calibration package's bytes; return the weights and log as bytes."""
    from pipeline_assets.steps.weights import fit_weights  # torch is imported only where a fit runs

    config = FitConfig.model_validate_json(config_json)
    ensure_no_skew(REMOTE_RUN, pinned_sha, f"{config.scope} fit")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        package = tmp / "calibration_package.h5"
        package.write_bytes(package_bytes)
        result = fit_weights(package, tmp / "weights.npy", tmp / "calibration_log.csv", config)
        return {
            "files": {name: path.read_bytes() for name, path in result.outputs.items()},
            "result": result,
            "environment": capture().model_dump(),
        }


def areas_from_bytes(inputs: dict[str, bytes], area_codes: list[str], pinned_sha: str) -> list[dict]:
    """Build the named areas from the input files' bytes; return each area file as bytes."""
    ensure_no_skew(REMOTE_RUN, pinned_sha, "local_areas")
    missing = [name for name in AREA_INPUTS if name not in inputs]
    if missing:
        raise ValueError(f"area inputs {missing} not sent: expected {list(AREA_INPUTS)}")
    known = {area.code: area for area in (*geography.areas(), geography.NATIONAL)}
    unknown = [code for code in area_codes if code not in known]
    if unknown:
        raise ValueError(f"unknown area codes {unknown}")
    environment = capture().model_dump()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in AREA_INPUTS:
            (tmp / name).write_bytes(inputs[name])
        loaded = load_area_inputs(*(tmp / name for name in AREA_INPUTS))
        out = []
        for code in area_codes:
            result = build_area_h5(known[code], loaded, tmp / "h5s")
            out.append({
                "relpath": result.relpath,
                "data": (tmp / "h5s" / result.relpath).read_bytes(),
                "result": result,
                "environment": environment,
            })
        return out


def image_sha() -> str | None:
    """The SHA the image is built at: $PIPELINE_CODE_SHA, checked against a clean local checkout."""
    sha = os.environ.get(CODE_SHA_VARIABLE)
    if sha and modal.is_local() and (SOURCE_ROOT / ".git").exists():
        from resources.git import code_state

        state = code_state(SOURCE_ROOT)
        if state.sha != sha or state.dirty:
            raise RuntimeError(
                f"{CODE_SHA_VARIABLE}={sha} but the checkout at {SOURCE_ROOT} is at {state.sha}"
                f"{' with uncommitted changes' if state.dirty else ''}: deploy from a clean checkout of {sha}"
            )
    return sha


def build_image(sha: str | None) -> modal.Image:
    image = modal.Image.debian_slim(python_version="3.11").pip_install_from_pyproject(
        str(SOURCE_ROOT / "pyproject.toml")
    )
    if sha:
        image = image.env({CODE_SHA_VARIABLE: sha})
    # Package data (the raw inputs the geography reads) travels too: not only .py files.
    return image.add_local_python_source("pipeline_assets", "resources", ignore=["**/__pycache__", "**/*.pyc"])


app = modal.App(APP_NAME)
image = build_image(image_sha())


@app.function(image=image, gpu=GPU, timeout=60 * 60, env={"PIPELINE_COMPUTE_POOL": "modal-gpu"})
def fit_remote(package_bytes: bytes, config_json: str, pinned_sha: str) -> dict:
    return fit_from_bytes(package_bytes, config_json, pinned_sha)


@app.function(image=image, cpu=2, memory=8192, timeout=30 * 60, env={"PIPELINE_COMPUTE_POOL": "modal-cpu"})
def build_areas_remote(inputs: dict[str, bytes], area_codes: list[str], pinned_sha: str) -> list[dict]:
    return areas_from_bytes(inputs, area_codes, pinned_sha)
