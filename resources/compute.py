"""Compute: where the fanned-out work runs. Locally, a process pool that loads the inputs once."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_worker_state: dict = {}


def _init_worker(loader: Callable, loader_args: tuple) -> None:
    _worker_state["inputs"] = loader(*loader_args)


def _call(task: Callable, item, out_root: Path):
    return task(item, _worker_state["inputs"], out_root)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "forkserver"


class LocalPool:
    """A pool of local worker processes.

    fork (the default where the platform has it): the inputs are loaded once, here, and the workers
    inherit them and the imported code, so a worker is ready in milliseconds instead of importing
    pandas and h5py and loading the inputs again. forkserver: each worker starts from a clean server
    process and loads the inputs itself, for a parent that must not be forked.
    """

    def __init__(self, workers: int = 2, start_method: str | None = None, fits_at_once: int = 1):
        self.workers = workers
        self.start_method = start_method or default_start_method()
        self.fits_at_once = fits_at_once

    def fit_threads(self, config) -> int:
        """The fit's torch threads: the config's, else an equal share of this machine's cores among
        the fits that run here at once (a resource size: any count gives the same weights)."""
        return config.threads or max(1, usable_cores() // self.fits_at_once)

    def fit(self, package_path: Path, weights_path: Path, log_path: Path, config):
        """Fit weights in this process: a fit is one process, on `fit_threads` torch threads."""
        from pipeline_assets.steps.weights import fit_weights  # torch is imported only where a fit runs

        config = config.model_copy(update={"threads": self.fit_threads(config)})
        return fit_weights(package_path, weights_path, log_path, config)

    def iter_with_inputs(
        self,
        task: Callable[[Item, object, Path], Result],
        items: Iterable[Item],
        loader: Callable[..., object],
        loader_args: tuple,
        out_root: Path,
    ) -> Iterator[Result]:
        """task(item, inputs, out_root) for every item, with inputs = loader(*loader_args) loaded once;
        each result is yielded (in order) as soon as it is done, so the caller can record the first
        files while the workers build the rest."""
        items = list(items)
        if self.workers == 1:
            inputs = loader(*loader_args)
            yield from (task(item, inputs, out_root) for item in items)
            return
        context = multiprocessing.get_context(self.start_method)
        initializer, initargs = _init_worker, (loader, loader_args)
        if self.start_method == "fork":
            _worker_state["inputs"] = loader(*loader_args)
            initializer, initargs = None, ()
        elif self.start_method == "forkserver":  # workers fork from a server that has imported the task
            context.set_forkserver_preload([task.__module__, loader.__module__])
        chunksize = max(1, len(items) // (self.workers * 8))
        try:
            with ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=initializer, initargs=initargs
            ) as pool:
                yield from pool.map(_call, [task] * len(items), items, [out_root] * len(items), chunksize=chunksize)
        finally:
            _worker_state.clear()

    def map_with_inputs(self, *args) -> list:
        """iter_with_inputs, all at once."""
        return list(self.iter_with_inputs(*args))
