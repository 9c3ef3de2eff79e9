"""Compute: where the fanned-out work runs. Locally, a process pool whose workers load inputs once."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_worker_state: dict = {}


def _init_worker(loader: Callable, loader_args: tuple) -> None:
    _worker_state["inputs"] = loader(*loader_args)


def _call(task: Callable, item, out_root: Path):
    return task(item, _worker_state["inputs"], out_root)


class LocalPool:
    """A pool of local worker processes (forkserver, so a threaded parent such as Dagster is safe)."""

    def __init__(self, workers: int = 2, start_method: str = "forkserver"):
        self.workers = workers
        self.start_method = start_method

    def map_with_inputs(
        self,
        task: Callable[[Item, object, Path], Result],
        items: Iterable[Item],
        loader: Callable[..., object],
        loader_args: tuple,
        out_root: Path,
    ) -> list[Result]:
        """Run task(item, inputs, out_root) for every item; each worker loads `inputs` once."""
        items = list(items)
        if self.workers == 1:
            inputs = loader(*loader_args)
            return [task(item, inputs, out_root) for item in items]
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":  # workers fork from a server that has imported the task
            context.set_forkserver_preload([task.__module__, loader.__module__])
        chunksize = max(1, len(items) // (self.workers * 8))
        with ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context, initializer=_init_worker, initargs=(loader, loader_args)
        ) as pool:
            return list(pool.map(_call, [task] * len(items), items, [out_root] * len(items), chunksize=chunksize))
