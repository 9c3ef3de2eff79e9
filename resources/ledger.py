"""The git provenance ledger: run records and releases committed to a git repository, one commit per event.

`git log` in the ledger is the audit history, and git's content hashes make it tamper-evident. The
ledger is a local work tree (a path, created if missing) or a remote (a URL, or the path of a bare
repository), for which a private clone under the run store is kept and pushed after every commit.
The remote URL is passed to git on each fetch and push and never stored, so a token in it reaches
no file; every message that could show it is redacted.

Failure policy: the ledger is opened before a run or a promotion starts, so a bad configuration
refuses it (one line) before anything is written. A commit or push that fails after the event is
logged as an error and does not undo or fail the event: the run's and the registry's own files are
already safe, and a commit that could not be pushed goes out with the next event.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

from resources.files import write_bytes_atomic
from resources.git import run_git
from resources.run_store import directory_problem

LEDGER_VARIABLE = "PIPELINE_LEDGER"
CLONE_DIR = ".ledger-clone"  # under the run store: the clone of a remote ledger
BRANCH = "main"
FETCH_REFSPEC = "+refs/heads/*:refs/remotes/ledger/*"
TRACKING = f"refs/remotes/ledger/{BRANCH}"
PUSH_ATTEMPTS = 3  # a push rejected because another writer pushed first is rebased and tried again
# Commits are made by the pipeline, whatever identity (or none) the machine's git has.
GIT_OPTIONS = ("-c", "user.name=usdata-pipeline", "-c", "user.email=usdata-pipeline@users.noreply.invalid",
               "-c", "commit.gpgsign=false")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_URL_QUERY = re.compile(r"(\w+://[^\s?#'\"]*\?)[^\s#'\"]*")
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")
REMOTE_SCHEMES = ("https", "http", "ssh", "git", "file")

log = logging.getLogger(__name__)


class LedgerError(ValueError):
    """The ledger cannot be opened or written; one line, with no credential in it."""


def redact(text: str) -> str:
    """Drop the user:password or token part and the query string (where tokens also travel) of
    every URL in `text`."""
    return _URL_QUERY.sub(r"\1***", _URL_USERINFO.sub("***@", text))


def _run_git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_git(cwd, *args, options=GIT_OPTIONS)


def _is_bare_repository(path: Path) -> bool:
    done = _run_git(path, "rev-parse", "--is-bare-repository")
    return done.returncode == 0 and done.stdout.strip() == "true"


def _is_remote(location: str) -> bool:
    if "://" in location or _SCP_LIKE.match(location):
        return True
    path = Path(location).expanduser()
    return path.is_dir() and _is_bare_repository(path)


def location_problem(location: str) -> str | None:
    """What is wrong with a ledger location, in one line with no credential; None when it can be
    opened. Reads only: the preflight of every command asks it before anything is written."""
    if _is_remote(location):
        scheme = location.split("://", 1)[0] if "://" in location else "ssh"
        if scheme not in REMOTE_SCHEMES:
            return redact(f"ledger {location} has an unknown scheme {scheme!r}: expected a git URL ({', '.join(REMOTE_SCHEMES)}), "
                          "user@host:path, or a directory")
        return None
    path = Path(location).expanduser().resolve()
    if path.exists() and not (path / ".git").exists() and (not path.is_dir() or any(path.iterdir())):
        return f"ledger {path} exists and is not a git repository: give a git repository, a new or empty directory, or a remote URL"
    problem = directory_problem(path)
    return f"ledger {problem}" if problem else None


class GitLedger:
    """A git work tree that events are committed to, pushed to `remote` when there is one."""

    def __init__(self, work_tree: Path, remote: str | None = None):
        self.work_tree = work_tree
        self.remote = remote

    @classmethod
    def open(cls, location: str, store_root: Path) -> GitLedger:
        """The ledger at `location`: a remote (cloned under the store) or a local path (created if missing)."""
        problem = location_problem(location)
        if problem:
            raise LedgerError(problem)
        if _is_remote(location):
            ledger = cls(Path(store_root) / CLONE_DIR, location)
        else:
            ledger = cls(Path(location).expanduser().resolve())
        if not (ledger.work_tree / ".git").exists():
            ledger.work_tree.mkdir(parents=True, exist_ok=True)
            ledger._git("init", "-q", "-b", BRANCH)
        return ledger

    def describe(self) -> str:
        return redact(self.remote) if self.remote else str(self.work_tree)

    def _git(self, *args: str) -> str:
        done = _run_git(self.work_tree, *args)
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()
            raise LedgerError(redact(f"git {args[0]} failed for ledger {self.describe()}: {reason[-1] if reason else done.returncode}"))
        return done.stdout

    def _has(self, ref: str) -> bool:
        return _run_git(self.work_tree, "rev-parse", "-q", "--verify", ref).returncode == 0

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time (a launch and the run-status sensor may settle at once)."""
        with open(self.work_tree / ".git" / "usdata-ledger.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _sync(self) -> None:
        """Bring the clone up to the remote, keeping local commits not pushed yet (rebased on top)."""
        if self._has("HEAD"):
            self._git("reset", "-q", "--hard")  # the clone is ours: drop whatever a failed commit left
        self._git("fetch", "-q", self.remote, FETCH_REFSPEC)
        if not self._has(TRACKING):
            return  # an empty remote: the first push starts it
        if not self._has("HEAD"):
            self._git("reset", "-q", "--hard", TRACKING)
            return
        try:
            self._git("rebase", "-q", TRACKING)
        except LedgerError:
            _run_git(self.work_tree, "rebase", "--abort")
            raise LedgerError(f"ledger clone {self.work_tree} cannot be rebased on {self.describe()}: remove the clone to start again") from None

    def _unpushed(self) -> bool:
        if not self._has("HEAD"):
            return False
        return not self._has(TRACKING) or bool(self._git("rev-list", f"{TRACKING}..HEAD").strip())

    def _push(self) -> None:
        for attempt in range(PUSH_ATTEMPTS):
            try:
                self._git("push", "-q", self.remote, f"HEAD:refs/heads/{BRANCH}")
                return
            except LedgerError:
                if attempt == PUSH_ATTEMPTS - 1:
                    raise
                self._sync()

    def commit(self, files: dict[str, bytes], message: str) -> str | None:
        """Write `files` (ledger path -> bytes) and commit them; the new commit's SHA, or None when
        they were already there as they are (no empty commit). Raises LedgerError."""
        with self._lock():
            if self.remote:
                self._sync()
            for rel, data in files.items():
                write_bytes_atomic(self.work_tree / rel, data)
            paths = sorted(files)
            self._git("add", "--", *paths)
            changed = _run_git(self.work_tree, "diff", "--cached", "--quiet", "--", *paths).returncode != 0
            if changed:
                self._git("commit", "-q", "-m", message, "--", *paths)
            if self.remote and self._unpushed():
                self._push()  # with it goes whatever an earlier event could not push
            return self._git("rev-parse", "HEAD").strip() if changed else None

    def record(self, files: dict[str, bytes], message: str) -> str | None:
        """`commit`, for an event that has already happened: a failure is logged, never raised."""
        try:
            return self.commit(files, message)
        except (LedgerError, OSError) as exc:
            log.error(redact(f"'{message}' was not recorded in the ledger: {exc}"))
            return None


def configured_ledger(store_root: Path) -> GitLedger | None:
    """The ledger $PIPELINE_LEDGER names (a path or a remote URL), or None when it is not set."""
    location = os.environ.get(LEDGER_VARIABLE)
    return GitLedger.open(location, store_root) if location else None
