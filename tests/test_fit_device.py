"""Where the weight fit runs: the CPU anywhere, CUDA where torch sees a GPU.

The CUDA tests run on a GPU machine with `pytest --noconftest tests/test_fit_device.py` (this module
needs no shared fixture); on a machine without one they are skipped, and the refusal is tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline_assets.steps.config import FitConfig
from pipeline_assets.steps.weights import fit_l0, fit_weights

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")


def problem(seed: int = 0):
    """A small calibration problem whose targets some positive weights meet exactly."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(40, 800, density=0.2, random_state=rng, format="csr", data_rvs=lambda n: rng.uniform(1, 10, n))
    targets = matrix @ rng.uniform(0.5, 2.0, 800)
    return matrix, targets, np.arange(40) % 4, np.ones(800)


def mean_rel_error(matrix, targets, weights) -> float:
    return float(np.mean(np.abs(matrix @ weights - targets) / targets))


def fit(device: str, **settings) -> np.ndarray:
    matrix, targets, groups, initial = problem()
    return fit_l0(matrix, targets, groups, initial, FitConfig(scope="local", epochs=300, device=device, **settings))


def test_cpu_fit_calibrates_and_repeats_bit_for_bit():
    matrix, targets, _, initial = problem()
    weights = fit("cpu")
    assert mean_rel_error(matrix, targets, weights) < mean_rel_error(matrix, targets, initial) / 2
    assert np.array_equal(weights, fit("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path):
    weights, log = tmp_path / "weights.npy", tmp_path / "log.csv"
    with pytest.raises(ValueError, match=r"local fit device 'cuda'.*sees no CUDA GPU.*expected device 'cpu'"):
        fit_weights(tmp_path / "no_package_read.h5", weights, log, FitConfig(scope="local", device="cuda"))
    assert not weights.exists() and not log.exists()


def test_device_must_be_cpu_or_cuda():
    with pytest.raises(ValueError, match="device"):
        FitConfig(scope="local", device="gpu")


@needs_gpu
def test_cuda_fit_calibrates_as_well_as_the_cpu_fit():
    matrix, targets, _, initial = problem()
    on_gpu, on_cpu = fit("cuda"), fit("cpu")
    before = mean_rel_error(matrix, targets, initial)
    assert mean_rel_error(matrix, targets, on_gpu) < before / 2
    assert mean_rel_error(matrix, targets, on_gpu) < 2 * mean_rel_error(matrix, targets, on_cpu) + 1e-3


@needs_gpu
def test_cuda_fit_repeats_bit_for_bit():
    assert np.array_equal(fit("cuda"), fit("cuda"))
