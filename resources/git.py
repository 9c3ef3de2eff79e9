"""Git facts a run pins: the full SHA of a branch, whether the tree is dirty, and a hash of the diff."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path


class GitError(RuntimeError):
    """The repository or the ref cannot be read."""


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        )
    except FileNotFoundError as exc:
        raise GitError("git is not installed") from exc
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or exc.stdout).strip().splitlines()
        raise GitError(f"git {' '.join(args)} failed in {repo}: {reason[-1] if reason else exc}") from None
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
