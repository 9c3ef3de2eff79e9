"""The run store: one layout (runs/, staging/, production/, version_manifest.json) on any backend.

Keys are relative to the store root so that a GCS bucket or a Modal volume can implement the same
interface. This module holds the run record (meta.json) and the local-directory backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resources.files import write_bytes_atomic
from resources.processes import process_alive, process_start_ticks

STORE_VARIABLE = "PIPELINE_STORE"
DEFAULT_STORE = ".pipeline-data"

log = logging.getLogger(__name__)
Record = TypeVar("Record", bound=BaseModel)


class RunStatus(str, Enum):
    running = "running"
    completed = "completed"
    failed = "failed"
    promoted = "promoted"


# failed -> running is a resume; nothing leaves promoted.
ALLOWED_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.running: frozenset({RunStatus.completed, RunStatus.failed}),
    RunStatus.failed: frozenset({RunStatus.running}),
    RunStatus.completed: frozenset({RunStatus.promoted}),
    RunStatus.promoted: frozenset(),
}
SEALED = frozenset({RunStatus.completed, RunStatus.promoted})


class RunStoreError(RuntimeError):
    """A store operation that would lose or corrupt data."""


class RunExists(RunStoreError):
    """create_run of a run_id that is taken: the caller picks another (the next second)."""


class UnreadableRecord(RunStoreError):
    """A record file that exists but cannot be read as its model; the message names the file."""


def read_model(path: Path, model: type[Record]) -> Record:
    """`path` parsed as `model`; anything wrong with it (unreadable, not JSON, a field the model does
    not know or refuses) is one UnreadableRecord line naming the file and the first problem."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # no record at all: the caller says what that means
        raise
    except OSError as exc:
        raise UnreadableRecord(f"unreadable record {path}: {exc.strerror or exc}") from None
    return parse_model(data, path, model)


def parse_model(data: bytes, path: Path, model: type[Record]) -> Record:
    """read_model of bytes already read from `path` (a caller that also hashes them)."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        problem = f"{where}: {first['msg']}" if where else first["msg"]
        raise UnreadableRecord(f"unreadable record {path}: {problem}".splitlines()[0]) from None


def directory_problem(path: Path, writable: bool = True) -> str | None:
    """What stops `path` from being used as a directory (written to, when `writable`), in words that
    start with the path; None when nothing does. Writes nothing: a directory that does not exist is
    judged by the nearest one above it, where it would be created; writability is tried with an
    unnamed temporary file (permission bits do not bind root)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"{path} is a broken symbolic link ({existing}): expected a directory"
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is)"
        return f"{path} is a file{where}: expected a directory"
    if not writable:
        return None
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        where = "" if existing == path else f" ({existing}, where it would be created, is not)"
        return f"{path} is not writable{where}: {exc.strerror or exc}"
    return None


class _HeldLock:
    """A store's release lock as this process holds it: a thread lock that makes it re-entrant,
    how deep it is held, and the descriptor of the root directory carrying the flock while it is."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.handle: int | None = None


_release_locks: dict[Path, _HeldLock] = {}
_release_locks_guard = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StepTiming(BaseModel):
    started_at: datetime
    ended_at: datetime | None = None
    duration_s: float | None = None
    status: str = "running"  # running | succeeded | failed
    env_id: str | None = None
    reuse: str | None = None  # computed | reused
    reused_from: str | None = None
    reused_parts: dict[str, str] = Field(default_factory=dict)  # part -> run, for a step reused in part


class RunError(BaseModel):
    step: str
    message: str


class Orchestrator(BaseModel):
    """The process that drives a run (runs its steps and settles its record): the next command can
    tell a run whose orchestrator died from one still running."""

    host: str
    pid: int
    start_ticks: int | None = None  # process_start_ticks(pid) when the run started or resumed

    @classmethod
    def of(cls, pid: int) -> "Orchestrator":
        return cls(host=socket.gethostname(), pid=pid, start_ticks=process_start_ticks(pid))

    @classmethod
    def current(cls) -> "Orchestrator":
        return cls.of(os.getpid())

    @classmethod
    def of_this_step(cls) -> "Orchestrator":
        """The process that started this step process and drives its run (a Dagster run worker:
        multiprocessing's parent, under forkserver too), else this process itself (in-process runs)."""
        parent = multiprocessing.parent_process()
        return cls.of(parent.pid if parent is not None else os.getpid())

    def is_gone(self) -> bool:
        """True only when it certainly died: on this host, and its pid is free or now another process's."""
        if self.host != socket.gethostname():
            return False
        if not process_alive(self.pid):
            return True
        return self.start_ticks is not None and process_start_ticks(self.pid) not in (None, self.start_ticks)


class PromotionState(BaseModel):
    """Where a promotion got to: what each backend holds, and what failed (the registry is written
    only when every backend succeeded, so a failed promotion is simply run again)."""

    version: str
    published: dict[str, str] = Field(default_factory=dict)  # backend -> location
    failed: dict[str, str] = Field(default_factory=dict)  # backend -> error


class RunMeta(BaseModel):
    """runs/{run_id}/meta.json: what a run is, where its code came from, and how far it got."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    status: RunStatus = RunStatus.running
    sha: str
    branch: str | None = None
    dirty: bool = False
    diff_sha256: str | None = None
    version: str
    config: dict[str, Any]
    env_id: str | None = None
    config_hash: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    step_timings: dict[str, StepTiming] = Field(default_factory=dict)
    error: RunError | None = None
    promotion: PromotionState | None = None
    orchestrator: Orchestrator | None = None  # None: a run driven by Dagster's own run worker

    def transition(self, status: RunStatus) -> None:
        if status not in ALLOWED_TRANSITIONS[self.status]:
            raise RunStoreError(
                f"run {self.run_id}: status {self.status.value} cannot become {status.value}"
            )
        self.status = status

    def step_started(self, step: str) -> None:
        self.step_timings[step] = StepTiming(started_at=utcnow())

    def step_ended(self, step: str, status: str, **facts) -> None:
        """Close a step's timing; `facts` are its env_id, reuse, reused_from and reused_parts."""
        timing = self.step_timings.get(step) or StepTiming(started_at=utcnow())
        timing.ended_at = utcnow()
        timing.duration_s = round((timing.ended_at - timing.started_at).total_seconds(), 3)
        timing.status = status
        for name, value in facts.items():
            setattr(timing, name, value)
        self.step_timings[step] = timing

    def running_steps(self) -> list[str]:
        return [step for step, timing in self.step_timings.items() if timing.status == "running"]

    def record_failure(self, error: RunError) -> None:
        """The run fails; the first error stays (a parallel step may have failed first)."""
        self.error = self.error or error
        if self.status is RunStatus.running:
            self.transition(RunStatus.failed)

    def settle_failed(self, error: RunError) -> None:
        """Settle a run that nothing drives any more as failed: every step still recorded as running
        is closed as failed too, as it will never end."""
        for step in self.running_steps():
            self.step_ended(step, "failed")
        self.record_failure(error)

    def orphaned(self) -> bool:
        """Running, with an orchestrator that died: nothing will ever settle it but the next command."""
        return self.status is RunStatus.running and self.orchestrator is not None and self.orchestrator.is_gone()

    def orphan_error(self) -> RunError:
        """The failure of an orphaned run, under the step that was running (else the last started)."""
        running, pid = self.running_steps(), self.orchestrator.pid
        if running:
            return RunError(step=running[0], message=f"the orchestrator (pid {pid}) died while {', '.join(running)} "
                            f"{'was' if len(running) == 1 else 'were'} running")
        if not self.step_timings:
            return RunError(step="run", message=f"the orchestrator (pid {pid}) died before any step started")
        last = max(self.step_timings, key=lambda step: self.step_timings[step].started_at)
        return RunError(step=last, message=f"the orchestrator (pid {pid}) died after {last} "
                        f"{self.step_timings[last].status}, before the next step started")


class LocalRunStore:
    """The store on a local directory; atomic writes by temporary name and rename."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get(STORE_VARIABLE) or DEFAULT_STORE).resolve()

    # --- keys -------------------------------------------------------------------------------
    @staticmethod
    def run_key(run_id: str, rel: str = "") -> str:
        return f"runs/{run_id}/{rel}".rstrip("/")

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise RunStoreError(f"key {key!r} points outside the store {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    # --- run records ------------------------------------------------------------------------
    def meta_key(self, run_id: str) -> str:
        return self.run_key(run_id, "meta.json")

    def create_run(self, meta: RunMeta) -> RunMeta:
        """Register a new run; a run_id is never reused (RunExists: the caller takes another)."""
        with self._meta_lock(meta.run_id):
            if self.exists(self.meta_key(meta.run_id)):
                raise RunExists(f"run {meta.run_id} already exists in {self.root}")
            self._write_meta(meta)
        return meta

    def read_meta(self, run_id: str) -> RunMeta:
        """The run's record; an unknown run or an unreadable meta.json is one line naming the file."""
        key = self.meta_key(run_id)
        try:
            return read_model(self.path(key), RunMeta)
        except FileNotFoundError:
            raise RunStoreError(f"unknown run {run_id}: no {key} in {self.root}") from None

    def update_meta(self, run_id: str, change: Callable[[RunMeta], None]) -> RunMeta:
        """Read, change and atomically rewrite meta.json under a lock (parallel steps share it)."""
        with self._meta_lock(run_id):
            meta = self.read_meta(run_id)
            change(meta)
            meta.updated_at = utcnow()
            self._write_meta(meta)
        return meta

    def list_runs(self) -> list[RunMeta]:
        """The readable runs, oldest first. An unreadable meta.json affects only its own run: it is
        left out, with one warning naming the file and what is wrong (see `unreadable_runs`)."""
        metas, unreadable = self._scan_runs()
        for problem in unreadable:
            log.warning(problem)
        return metas

    def unreadable_runs(self) -> list[str]:
        """One line per run whose meta.json cannot be read: its path and what is wrong."""
        return self._scan_runs()[1]

    def _scan_runs(self) -> tuple[list[RunMeta], list[str]]:
        runs_dir = self.path("runs")
        if not runs_dir.is_dir():
            return [], []
        metas, unreadable = [], []
        for path in sorted(runs_dir.glob("*/meta.json")):
            try:
                metas.append(self.read_meta(path.parent.name))
            except RunStoreError as exc:  # unreadable, or removed since the glob
                unreadable.append(str(exc))
        return sorted(metas, key=lambda m: m.created_at), unreadable

    @contextlib.contextmanager
    def release_lock(self) -> Iterator[None]:
        """The store-wide lock over registry-changing transitions (promote, rollback, clean): whoever
        holds it checks and writes with no other such transition in between. An flock on the store's
        root directory itself, so taking it writes nothing (a refused transition leaves the store as
        it was); re-entrant within a thread, so a promotion that the CLI runs under it can take it
        again inside the job."""
        with _release_locks_guard:
            held = _release_locks.setdefault(self.root, _HeldLock())
        with held.thread_lock:
            if held.depth == 0:
                try:
                    held.handle = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    raise RunStoreError(f"there is no run store at {self.root}") from None
                fcntl.flock(held.handle, fcntl.LOCK_EX)
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
                if held.depth == 0:
                    os.close(held.handle)  # closing the descriptor releases the flock
                    held.handle = None

    def remove_run(self, run_id: str, removable: Callable[[RunMeta], bool]) -> bool:
        """Remove the run's directory if its meta.json, read again under the run's lock, is still
        `removable` (a resume reopening it meanwhile keeps it); whether it was removed."""
        with self._meta_lock(run_id):
            try:
                if not removable(self.read_meta(run_id)):
                    return False
            except RunStoreError:  # gone, or unreadable since it was listed: not ours to judge
                return False
            shutil.rmtree(self.path(self.run_key(run_id)))
        return True

    def _write_meta(self, meta: RunMeta) -> None:
        write_bytes_atomic(self.path(self.meta_key(meta.run_id)), meta.model_dump_json(indent=2).encode())

    @contextlib.contextmanager
    def _meta_lock(self, run_id: str) -> Iterator[None]:
        lock = self.path(self.run_key(run_id, ".meta.lock"))
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- run artifacts (append-only once the run is sealed) ----------------------------------
    def output_path(self, run_id: str, rel: str) -> Path:
        """Local path a step writes `rel` of `run_id` to; refused if that would rewrite a sealed file."""
        key = self.run_key(run_id, rel)
        if self.exists(key) and self.read_meta(run_id).status in SEALED:
            raise RunStoreError(
                f"refusing to overwrite {key}: run {run_id} is {self.read_meta(run_id).status.value} "
                "and its files are append-only"
            )
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_run_file(self, run_id: str, rel: str, data: bytes) -> Path:
        return write_bytes_atomic(self.output_path(run_id, rel), data)

    def write_run_json(self, run_id: str, rel: str, record: Any) -> Path:
        payload = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
        return self.write_run_file(run_id, rel, json.dumps(payload, indent=2, sort_keys=True).encode())


def settle_if_orphaned(store: LocalRunStore, run_id: str) -> RunMeta:
    """The run's record, settled as failed first if its orchestrator died while it was running
    (checked again under the record's lock, so two commands settle it once)."""
    meta = store.read_meta(run_id)
    if not meta.orphaned():
        return meta

    def settle(m: RunMeta) -> None:
        if m.orphaned():
            m.settle_failed(m.orphan_error())

    return store.update_meta(run_id, settle)


def settle_orphans(store: LocalRunStore) -> list[str]:
    """Settle as failed every run of the store whose orchestrator died; returns their run_ids."""
    orphans = [meta.run_id for meta in store.list_runs() if meta.orphaned()]
    return [run_id for run_id in orphans if settle_if_orphaned(store, run_id).status is RunStatus.failed]
