"""Compute: where the fanned-out work runs. Locally, a process pool that loads the inputs once."""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from resources.processes import process_alive

Item = TypeVar("Item")
Result = TypeVar("Result")

_worker_state: dict = {}


PR_SET_PDEATHSIG = 1  # linux/prctl.h
STEP_NAME_CHARS = 15  # what the kernel keeps of a process name


def _init_worker(loader: Callable | None, loader_args: tuple) -> None:
    """A pool worker: dies with the step process that owns the pool, then loads the inputs unless
    it inherited them (fork)."""
    exit_with_parent()
    if loader is not None:
        _worker_state["inputs"] = loader(*loader_args)


def mark_step_process(step: str) -> None:
    """In a step process (a multiprocessing child; Dagster's executor starts one per step): name it
    after the step, as ps and top show it, and have it exit as soon as the orchestrator dies.
    Outside a child process this does nothing."""
    if multiprocessing.parent_process() is None:
        return
    try:
        Path("/proc/self/comm").write_text(step[:STEP_NAME_CHARS])
    except OSError:  # no /proc: the name is for operators only
        pass
    exit_with_parent()


_parent_watch: list[threading.Thread] = []


def exit_with_parent() -> None:
    """In a multiprocessing child: exit when the process that started it dies, so that no child of
    a killed run lives on.

    A child forked by its parent (pool workers) asks the kernel for SIGKILL on the parent's death
    (Linux), and exits at once if the parent died before it asked. A child forked by a forkserver
    (Dagster's step processes) has the server as its OS parent, which lives while any child does;
    it watches the pipe multiprocessing gives every child as its parent's sentinel, which closes
    when the parent dies.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if os.getppid() == parent.pid and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent.pid:
            os._exit(1)
        return
    if not process_alive(parent.pid):
        os._exit(1)
    if not _parent_watch:
        watch = threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), name="parent-watch", daemon=True)
        watch.start()
        _parent_watch.append(watch)


def _exit_when_gone(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _call_chunk(task: Callable, chunk: list, out_root: Path) -> list:
    return [task(item, _worker_state["inputs"], out_root) for item in chunk]


def stripes(items: list, n: int) -> list[list]:
    """`items` dealt round-robin into min(n, len(items)) non-empty chunks (big states spread out)."""
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "forkserver"


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
            if entry.name.isdigit() and process_alive(int(entry.name)):
                running += 1
            else:
                entry.unlink(missing_ok=True)
        return max(1, self.cores // max(1, running))


class _WorkerRecordingContext:
    """A pool's multiprocessing context that keeps the worker processes it makes, so that the pool
    can tell which one died and stop the rest."""

    def __init__(self, context):
        self._context = context
        self.workers: list = []

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    def Process(self, *args, **kwargs):  # noqa: N802 (the context's own name)
        worker = self._context.Process(*args, **kwargs)
        self.workers.append(worker)
        return worker


class WorkerDied(RuntimeError):
    """A pool worker exited without a result (killed, or exited on its own)."""


def _died(workers: list) -> str:
    """Which worker died, and how (the pool terminates the others, SIGTERM, once one has died)."""
    dead = sorted((w for w in workers if w.exitcode is not None), key=lambda w: (w.exitcode == -signal.SIGTERM, w.pid))
    if not dead:
        return "a pool worker died"
    pid, code = dead[0].pid, dead[0].exitcode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"pool worker (pid {pid}) died: {how}"


def _kill(workers: list) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join()


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

    def fit(self, fit_weights: Callable, package_path: Path, weights_path: Path, log_path: Path, config):
        """Run the fit step function `fit_weights` in this process: a fit is one process, on the config's
        torch threads, else on its share of the cores among the fits running here, re-divided while it runs."""
        if config.threads:
            return fit_weights(package_path, weights_path, log_path, config)
        with self.cores.joined() as share:
            return fit_weights(package_path, weights_path, log_path, config, cores=share)

    def run_model(self, paths: list[Path], period: int):
        """PolicyEngine-US on the area files: one runner of the model's own environment per worker."""
        from resources.model_environment import ModelEnvironment  # the model validation's only

        return ModelEnvironment().run(paths, period, workers=self.workers)

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
        context = _WorkerRecordingContext(multiprocessing.get_context(self.start_method))
        initargs = (loader, loader_args)
        if self.start_method == "fork":
            _worker_state["inputs"] = loader(*loader_args)
            initargs = (None, ())
        elif self.start_method == "forkserver":  # workers fork from a server that has imported the task
            context.set_forkserver_preload([task.__module__, loader.__module__])
        chunksize = max(1, len(items) // (self.workers * 8))
        try:
            with ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=_init_worker, initargs=initargs
            ) as pool:
                chunks = [pool.submit(_call_chunk, task, items[i:i + chunksize], out_root)
                          for i in range(0, len(items), chunksize)]
                workers = context.workers
                try:
                    for chunk in chunks:
                        yield from chunk.result()
                except BrokenProcessPool:
                    pool.shutdown(wait=True)  # the pool reaps its workers: their exit codes are known after
                    raise WorkerDied(_died(workers)) from None
                except BaseException:  # a worker's error, or the consumer gone: stop the rest now
                    _kill(workers)  # the pool then fails the pending chunks (none is cancelled under it)
                    raise
        finally:
            _worker_state.clear()
