"""Git facts a run pins: the full SHA of a branch, whether the tree is dirty, and a hash of the diff."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

CODE_SHA_VARIABLE = "PIPELINE_CODE_SHA"  # set where the code has no .git (a container image)
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout this code runs from
FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


class GitError(RuntimeError):
    """The repository or the ref cannot be read."""


def run_git(repo: Path, *args: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`git [options] -C repo args`, its output captured; never waits at a prompt (a remote that asks
    for a password fails instead). The one place the project runs git."""
    try:
        return subprocess.run(["git", *options, "-C", str(repo), *args], capture_output=True, text=True,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError as exc:
        raise GitError("git is not installed") from exc


def _git(repo: Path, *args: str) -> str:
    done = run_git(repo, *args)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise GitError(f"git {' '.join(args)} failed in {repo}: {reason[-1] if reason else done.returncode}")
    return done.stdout


@dataclass(frozen=True)
class CodeState:
    """Where the code of a run comes from."""

    sha: str
    branch: str | None
    dirty: bool
    diff_sha256: str | None


def resolve_sha(repo: Path, ref: str = "HEAD") -> str:
    """The full 40-hex SHA that `ref` (a branch, tag or SHA) names in `repo`."""
    return _git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}").strip()


def current_branch(repo: Path) -> str | None:
    name = _git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    return None if name == "HEAD" else name


def work_tree_diff_sha256(repo: Path) -> str | None:
    """sha256 of the uncommitted changes (tracked diff plus untracked file names), None when clean."""
    diff = _git(repo, "diff", "HEAD", "--binary")
    untracked = _git(repo, "ls-files", "--others", "--exclude-standard")
    if not diff and not untracked:
        return None
    return hashlib.sha256((diff + "\0" + untracked).encode()).hexdigest()


def code_state(repo: Path, ref: str | None = None) -> CodeState:
    """Pin the code of a run: `ref` resolved to a SHA, or the checkout's HEAD with its dirty state.

    A named ref other than the checkout's HEAD is taken as committed code (clean by definition);
    the checkout's own state is what the steps of this process will actually run.
    """
    head = resolve_sha(repo, "HEAD")
    sha = resolve_sha(repo, ref) if ref else head
    branch = ref if ref and _is_named_ref(repo, ref) else current_branch(repo)
    diff = work_tree_diff_sha256(repo) if sha == head else None
    return CodeState(sha=sha, branch=branch, dirty=diff is not None, diff_sha256=diff)


def _is_named_ref(repo: Path, ref: str) -> bool:
    """Whether `ref` is a branch or tag (git names it), not a SHA: a SHA is never recorded as a branch."""
    return bool(_git(repo, "rev-parse", "--symbolic-full-name", ref).strip())


def running_code_sha() -> str:
    """The SHA of the code this process runs: from the image's variable, else the source checkout."""
    explicit = os.environ.get(CODE_SHA_VARIABLE)
    if explicit:
        if not FULL_SHA.match(explicit):
            raise ValueError(f"{CODE_SHA_VARIABLE}={explicit!r}: expected the full 40-hex-digit (lowercase) SHA of the running code")
        return explicit
    try:
        return resolve_sha(SOURCE_ROOT)
    except GitError as exc:
        raise GitError(f"cannot tell which code is running ({exc}); set {CODE_SHA_VARIABLE} to the image's SHA") from None
