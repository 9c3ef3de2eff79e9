"""Where the weight fit runs: the CPU anywhere, CUDA where torch sees a GPU.

The CUDA tests run on a GPU machine with `pytest --noconftest tests/test_fit_device.py` (this module
needs no shared fixture); on a machine without one they are skipped, and the refusal is tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from l0.calibration import SparseCalibrationWeights

from pipeline_assets.steps.config import FitConfig
from pipeline_assets.steps.weights import ReproducibleCalibrationWeights, _RowSums, csr_product, fit_l0, fit_weights

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")


def problem(rows: int = 40, columns: int = 800, density: float = 0.2, seed: int = 0):
    """A calibration problem whose targets some positive weights meet exactly."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(rows, columns, density=density, random_state=rng, format="csr", data_rvs=lambda n: rng.uniform(1, 10, n))
    targets = matrix @ rng.uniform(0.5, 2.0, columns)
    return matrix, targets, np.arange(rows) % 4, np.ones(columns)


def mean_rel_error(matrix, targets, weights) -> float:
    return float(np.mean(np.abs(matrix @ weights - targets) / targets))


def fit(device: str, epochs: int = 300, model_class=ReproducibleCalibrationWeights, **shape) -> np.ndarray:
    matrix, targets, groups, initial = problem(**shape)
    config = FitConfig(scope="local", epochs=epochs, device=device)
    return fit_l0(matrix, targets, groups, initial, config, model_class=model_class)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_row_sums_give_the_product_and_its_gradient(device):
    matrix = sp.random(30, 50, density=0.1, random_state=1, format="lil")
    matrix[:, 7] = 0  # a column no row reaches: its gradient is zero, not missing
    matrix[4, :] = 0  # a row with no entries: its sum is zero
    matrix = matrix.tocsr()
    on = torch.device(device)
    weights = torch.rand(50, device=on, requires_grad=True)
    product = _RowSums.apply(weights, csr_product(matrix, on), csr_product(matrix.T, on))
    expected = matrix @ weights.detach().cpu().numpy().astype(np.float64)
    np.testing.assert_allclose(product.detach().cpu().numpy(), expected, rtol=1e-5, atol=1e-7)
    upstream = torch.rand(30, device=on)
    product.backward(upstream)
    gradient = weights.grad.cpu().numpy()
    np.testing.assert_allclose(gradient, matrix.T @ upstream.cpu().numpy().astype(np.float64), rtol=1e-5, atol=1e-7)
    assert gradient[7] == 0 and product[4] == 0


def test_reproducible_model_fits_like_l0_pythons_own():
    matrix, targets, _, _ = problem()
    ours, theirs = fit("cpu"), fit("cpu", model_class=SparseCalibrationWeights)
    assert abs(mean_rel_error(matrix, targets, ours) - mean_rel_error(matrix, targets, theirs)) < 1e-4
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("lambda_l2", [0.0, 1e-6])
def test_our_training_loop_takes_the_same_steps_as_l0_pythons_with_torch_optim(lambda_l2):
    """The same model trained by its own fit (_Adam) and by l0-python's (torch.optim.Adam): the same bits."""
    matrix, targets, groups, initial = problem()

    def trained(fit_loop) -> np.ndarray:
        torch.manual_seed(3)  # the gates are drawn from torch's global generator
        model = ReproducibleCalibrationWeights(n_features=matrix.shape[1], init_weights=initial, seed=3)
        fit_loop(model, M=matrix, y=targets, lambda_l0=1e-4, lambda_l2=lambda_l2, lr=0.1, epochs=120,
                 loss_type="relative", target_groups=groups)
        return model.get_weights(deterministic=True).detach().numpy()

    ours = trained(ReproducibleCalibrationWeights.fit)
    assert np.array_equal(ours, trained(SparseCalibrationWeights.fit))
    assert not np.array_equal(ours, initial)


def test_a_fit_does_not_import_torch_dynamo():
    """torch.optim would import it (1-1.5 s in each new fit process); the fit must not need it."""
    script = (
        "import sys, numpy as np, scipy.sparse as sp\n"
        "from pipeline_assets.steps.config import FitConfig\n"
        "from pipeline_assets.steps.weights import fit_l0\n"
        "matrix = sp.random(20, 100, density=0.3, random_state=0, format='csr')\n"
        "fit_l0(matrix, np.ones(20), np.zeros(20, int), np.ones(100), FitConfig(scope='local', epochs=3))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])


def test_only_the_relative_loss_is_fitted():
    matrix, targets, groups, initial = problem()
    model = ReproducibleCalibrationWeights(n_features=matrix.shape[1], init_weights=initial)
    with pytest.raises(ValueError, match="loss_type 'mse'.*expected 'relative'"):
        model.fit(M=matrix, y=targets, lambda_l0=0, lambda_l2=0, lr=0.1, epochs=1, loss_type="mse", target_groups=groups)


def test_cpu_fit_calibrates_and_repeats_bit_for_bit():
    matrix, targets, _, initial = problem()
    weights = fit("cpu")
    assert mean_rel_error(matrix, targets, weights) < mean_rel_error(matrix, targets, initial) / 2
    assert np.array_equal(weights, fit("cpu"))


def test_cpu_fit_gives_the_same_bits_on_any_thread_count():
    shape = {"rows": 300, "columns": 20_000, "density": 0.01}
    matrix, targets, groups, initial = problem(**shape)
    one, two = (
        fit_l0(matrix, targets, groups, initial, FitConfig(scope="local", epochs=20, threads=threads))
        for threads in (1, 2)
    )
    assert np.array_equal(one, two)


def test_cpu_fit_whose_share_of_the_cores_changes_as_it_runs_gives_the_same_bits():
    matrix, targets, groups, initial = problem(rows=300, columns=20_000, density=0.01)
    config = FitConfig(scope="local", epochs=40)
    shares, seen = iter([1, 2, 1, 1, 2]), []

    def share() -> int:
        seen.append(next(shares))
        return seen[-1]

    changing = fit_l0(matrix, targets, groups, initial, config, cores=share)
    assert seen == [1, 2, 1, 1, 2]  # at the start, then every REBALANCE_EPOCHS (10) epochs
    assert torch.get_num_threads() == 2
    assert np.array_equal(changing, fit_l0(matrix, targets, groups, initial, config.model_copy(update={"threads": 1})))


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
    """Big enough for many GPU threads to add into one sum (where torch's COO product loses the order)."""
    shape = {"rows": 2000, "columns": 100_000, "density": 0.005}
    assert np.array_equal(fit("cuda", epochs=30, **shape), fit("cuda", epochs=30, **shape))
