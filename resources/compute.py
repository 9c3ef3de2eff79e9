"""Compute: where the fanned-out work runs. Locally, a process pool that loads the inputs once."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
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


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        pass
    return True


class CoreShare:
    """This machine's cores, divided among the fits running on it at the moment.

    Each fit is a file named by its process id in one directory and asks, every few epochs, for its
    share: when the national fit ends, the state fit still running takes its cores (at production's
    column count it otherwise ran a minute on one core with the other idle). Changing a fit's
    threads changes none of its bits (its products and sums come out the same on any thread count).
    """

    def __init__(self, directory: Path | None = None, cores: int | None = None):
        # one directory per user: another user's fits could not add their files to it
        user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
        self.directory = directory or Path(tempfile.gettempdir()) / f"usdata-pipeline-fits-{user}"
        self.cores = cores or usable_cores()

    @contextmanager
    def joined(self) -> Iterator[Callable[[], int]]:
        """Count this process among the fits while the block runs; yields `share`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        mine = self.directory / str(os.getpid())
        mine.touch()
        try:
            yield self.share
        finally:
            mine.unlink(missing_ok=True)

    def share(self) -> int:
        """The cores divided among the fits running now (at least one); a fit's file whose process
        has gone (killed before it could remove it) is removed here."""
        running = 0
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:  # a /tmp cleaner removed it under a running fit
            entries = []
        for entry in entries:
            if entry.name.isdigit() and _process_running(int(entry.name)):
                running += 1
            else:
                entry.unlink(missing_ok=True)
        return max(1, self.cores // max(1, running))


class LocalPool:
    """A pool of local worker processes.

    fork (the default where the platform has it): the inputs are loaded once, here, and the workers
    inherit them and the imported code, so a worker is ready in milliseconds instead of importing
    pandas and h5py and loading the inputs again. forkserver: each worker starts from a clean server
    process and loads the inputs itself, for a parent that must not be forked.
    """

    def __init__(self, workers: int = 2, start_method: str | None = None, cores: CoreShare | None = None):
        self.workers = workers
        self.start_method = start_method or default_start_method()
        self.cores = cores or CoreShare()

    def fit(self, package_path: Path, weights_path: Path, log_path: Path, config):
        """Fit weights in this process: a fit is one process, on the config's torch threads, else on
        its share of the cores among the fits running here, re-divided while it runs."""
        from pipeline_assets.steps.weights import fit_weights  # torch is imported only where a fit runs

        if config.threads:
            return fit_weights(package_path, weights_path, log_path, config)
        with self.cores.joined() as share:
            return fit_weights(package_path, weights_path, log_path, config, cores=share)

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
