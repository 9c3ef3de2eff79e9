"""The L0-regularised weight fit (l0-python), for the local (state + district) or national targets."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from l0.calibration import SparseCalibrationWeights

from pipeline_assets.steps.calibration import LOG_COLUMNS, CalibrationPackage, load_calibration_package, relative_errors
from pipeline_assets.steps.config import FitConfig
from pipeline_assets.steps.results import StepResult
from resources.files import atomic_path

SCOPE_LEVELS = {"local": ("state", "district"), "national": ("national",)}

Product = Callable[[torch.Tensor], torch.Tensor]


class _RowSums(torch.autograd.Function):
    """y = M @ w by `product`, and the gradient M^T @ g by `transpose_product` (the transpose's own
    CSR), so neither direction scatters with atomics: each row's sum is added in one fixed order, and
    a fit repeats bit for bit on CPU and GPU alike (torch's COO product, which l0-python uses, adds
    with atomics in whatever order the GPU runs them)."""

    @staticmethod
    def forward(ctx, weights, product: Product, transpose_product: Product):
        ctx.transpose_product = transpose_product
        return product(weights)

    @staticmethod
    def backward(ctx, grad):
        return ctx.transpose_product(grad), None, None


def csr_product(matrix, device: torch.device) -> Product:
    """vector -> matrix @ vector on `device`, each row summed in one fixed order.

    On the CPU torch's CSR product (MKL, one row per thread: the same bits for any thread count,
    ~7x faster than segment sums at reference scale); on a GPU a segment sum per row (cuSPARSE is
    not promised to add in a fixed order)."""
    matrix = matrix.tocsr()
    indptr = torch.as_tensor(matrix.indptr, device=device)
    indices = torch.as_tensor(matrix.indices, device=device)
    values = torch.as_tensor(matrix.data, dtype=torch.float32, device=device)
    if device.type == "cpu":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse (CSR tensor support is in beta|invariant checks are implicitly)")
            tensor = torch.sparse_csr_tensor(indptr, indices, values, size=matrix.shape, check_invariants=False)
        return lambda vector: torch.mv(tensor, vector)
    indptr, indices = indptr.long(), indices.long()
    return lambda vector: torch.segment_reduce(values * vector[indices], "sum", offsets=indptr, unsafe=True)


REBALANCE_EPOCHS = 10  # how often a fit with a share of the cores asks for its share again
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which l0-python's fit uses


class _Adam:
    """torch.optim.Adam's update with its defaults, op for op as its CPU (single-tensor) code does it,
    so a fit gets the same bits as through torch.optim.Adam (tested). torch.optim imports
    torch._dynamo when it builds an optimizer, 1-1.5 s in every new fit process."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float):
        self.params, self.lr, self.steps = params, lr, 0
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' gradients, which it then clears (as zero_grad would)."""
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        step_size = self.lr / (1 - beta1 ** float(self.steps))
        bias_correction2_sqrt = (1 - beta2 ** float(self.steps)) ** 0.5
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
            grad = param.grad
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            param.grad = None


class ReproducibleCalibrationWeights(SparseCalibrationWeights):
    """l0-python's model with its sparse product done by _RowSums: the same math, the same bits on
    every repeat on CPU and GPU alike; trained by l0-python's loop with _Adam (see `fit`); and,
    where it has a share of the machine's cores (`cores`), one that follows that share as other
    fits start and end."""

    _products_of = None  # the scipy matrix whose products (and its transpose's) are cached in _products
    cores: Callable[[], int] | None = None
    _epochs = 0

    def forward(self, M, deterministic: bool = False) -> torch.Tensor:
        if self.cores is not None and self._epochs % REBALANCE_EPOCHS == 0:  # between epochs: no op is running
            share = self.cores()
            if share != torch.get_num_threads():
                torch.set_num_threads(share)
        self._epochs += 1
        if self._products_of is not M:
            self._products = (csr_product(M, self.device), csr_product(M.T, self.device))
            self._products_of = M
        return _RowSums.apply(self.get_weights(deterministic=deterministic), *self._products)

    def fit(
        self, M, y, lambda_l0: float, lambda_l2: float, lr: float, epochs: int, loss_type: str, target_groups
    ) -> ReproducibleCalibrationWeights:
        """l0-python's fit with its relative loss, each target group weighing the same, and no
        log-weight jitter (the model's default): the same steps, the same bits (tested), with _Adam
        in place of torch.optim.Adam."""
        if loss_type != "relative":
            raise ValueError(f"loss_type {loss_type!r}: this fit has the relative loss only; expected 'relative'")
        y = torch.tensor(y, dtype=torch.float32, device=self.device)
        groups = np.asarray(target_groups)
        group_weights = torch.tensor(1.0 / group_sizes(groups), dtype=torch.float32, device=self.device)
        optimizer = _Adam([self.log_weight, self.log_alpha], lr)
        for _ in range(epochs):
            relative = (y - self.forward(M, deterministic=False)) / (y + 1)
            loss = (relative.pow(2) * group_weights).sum() + lambda_l0 * self.get_l0_penalty()
            if lambda_l2 > 0:
                loss = loss + lambda_l2 * self.get_l2_penalty()
            loss.backward()
            optimizer.step()
        return self


def fit_device(config: FitConfig) -> torch.device:
    """The fit's torch device; "cuda" where torch sees no GPU is refused before any work is done."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{config.scope} fit device 'cuda': torch {torch.__version__} sees no CUDA GPU on this machine; "
            "expected device 'cpu', or the fit run where a GPU is (Modal's fit_remote)"
        )
    return torch.device(config.device)


def fit_l0(
    matrix,
    target_values,
    groups,
    init_weights,
    config: FitConfig,
    model_class=ReproducibleCalibrationWeights,
    cores: Callable[[], int] | None = None,
) -> np.ndarray:
    """Run the L0 calibration model once over all epochs; return the deterministic weights.

    Threads: the config's, else `cores()` (the fit's share of the machine, asked again as it runs),
    else torch's default (the machine's physical cores). `model_class` is
    ReproducibleCalibrationWeights; l0-python's own SparseCalibrationWeights (its COO product) is the
    benches' baseline."""
    device = fit_device(config)
    torch.manual_seed(config.seed)
    if config.threads or cores:
        torch.set_num_threads(config.threads or cores())
    torch.sparse.check_sparse_tensor_invariants.disable()  # the matrix comes from scipy's CSR: valid
    model = model_class(
        n_features=matrix.shape[1],
        init_weights=init_weights,
        init_keep_prob=config.init_keep_prob,
        seed=config.seed,
        device=device,
    )
    if cores and not config.threads:
        model.cores = cores
    model.fit(
        M=matrix,
        y=target_values,
        lambda_l0=config.lambda_l0,
        lambda_l2=config.lambda_l2,
        lr=config.learning_rate,
        epochs=config.epochs,
        loss_type="relative",
        target_groups=groups,
    )
    with torch.no_grad():
        return model.get_weights(deterministic=True).cpu().numpy().astype(np.float64)


def group_sizes(groups: np.ndarray) -> np.ndarray:
    """Each target's group size: a target weighs 1 / that in the loss, so each group weighs the same."""
    return np.bincount(groups)[groups]


def group_loss(estimate: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    """The fit's data loss: squared relative error, each target group weighted equally."""
    squared = ((target - estimate) / (target + 1.0)) ** 2
    return float((squared / group_sizes(groups)).sum())


def calibration_log(names, estimate, target, epoch: int, loss: float) -> pd.DataFrame:
    error = estimate - target
    rel = relative_errors(estimate, target)
    return pd.DataFrame(
        {
            "target": names, "estimate": estimate, "target_value": target, "error": error,
            "rel_error": rel, "abs_error": np.abs(error), "rel_abs_error": np.abs(rel),
            "epoch": epoch, "loss": loss,
        },
        columns=LOG_COLUMNS,
    )


def fit_rows(package: CalibrationPackage, scope: str) -> tuple[np.ndarray, int]:
    """The scope's target rows that some record can reach, and how many cannot be reached.

    A target no record can reach (an all-zero row) cannot be fitted; it is reported, not fitted.
    """
    scope_rows = package.rows(SCOPE_LEVELS[scope])
    reachable = np.diff(package.matrix.indptr)[scope_rows] > 0
    if not reachable.any():
        raise ValueError(f"the calibration package has no reachable {scope} targets to fit")
    return scope_rows[reachable], int((~reachable).sum())


@dataclass(frozen=True)
class FitProblem:
    """What one scope's fit works on: the reachable target rows of the package's matrix, their
    values and loss groups, and the base weights it starts from."""

    matrix: sp.csr_matrix
    targets: pd.DataFrame
    values: np.ndarray
    groups: np.ndarray
    initial: np.ndarray
    unreachable: int


def fit_problem(package: CalibrationPackage, scope: str) -> FitProblem:
    rows, unreachable = fit_rows(package, scope)
    targets = package.targets.iloc[rows]
    return FitProblem(
        matrix=package.matrix[rows],
        targets=targets,
        values=targets["value"].to_numpy(float),
        groups=pd.factorize(targets["group"])[0],
        initial=package.columns["base_weight"].to_numpy(float),
        unreachable=unreachable,
    )


def fit_weights(
    package_path: Path, weights_path: Path, log_path: Path, config: FitConfig, cores: Callable[[], int] | None = None
) -> StepResult:
    """Fit weights over every clone against the scope's reachable targets; log before and after.
    (`cores`: see fit_l0.)"""
    fit_device(config)
    problem = fit_problem(load_calibration_package(package_path, column_names=["base_weight"]), config.scope)
    matrix, target_values, groups, initial = problem.matrix, problem.values, problem.groups, problem.initial

    started = time.perf_counter()
    weights = fit_l0(matrix, target_values, groups, initial, config, cores=cores)
    fit_seconds = time.perf_counter() - started

    before, after = matrix @ initial, matrix @ weights
    loss_before, loss_after = group_loss(before, target_values, groups), group_loss(after, target_values, groups)
    names = problem.targets["name"].to_numpy()
    log = pd.concat(
        [calibration_log(names, before, target_values, 0, loss_before),
         calibration_log(names, after, target_values, config.epochs, loss_after)],
        ignore_index=True,
    )
    with atomic_path(weights_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, weights)
    with atomic_path(log_path) as tmp:
        log.to_csv(tmp, index=False, float_format="%.10g")

    rel_before = np.abs(relative_errors(before, target_values))
    rel_after = np.abs(relative_errors(after, target_values))
    return StepResult(
        outputs={"weights": weights_path, "calibration_log": log_path},
        figures={
            "targets": int(len(target_values)),
            "unreachable_targets": problem.unreachable,
            "columns": int(matrix.shape[1]),
            "epochs": config.epochs,
            "initial_mean_rel_abs_error": float(rel_before.mean()),
            "final_mean_rel_abs_error": float(rel_after.mean()),
            "final_max_rel_abs_error": float(rel_after.max()),
            "initial_loss": loss_before,
            "final_loss": loss_after,
            "nonzero_weights": int((weights > 0).sum()),
            "weight_sum": float(weights.sum()),
            "fit_seconds": round(fit_seconds, 3),
            "threads": torch.get_num_threads(),  # the CPU threads it ended on (not part of its identity)
        },
    )
