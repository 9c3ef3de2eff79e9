"""File helpers every step shares: atomic output paths and streamed hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

PUBLISHED_MODE = 0o644


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, read in chunks so memory stays bounded whatever its size."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    A reader never sees a half-written file, and an interrupted write leaves nothing at `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, PUBLISHED_MODE)  # mkstemp makes 0600; published files are world-readable
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> Path:
    """Small records (meta.json, the registry): flushed to disk before the rename makes them visible."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(final)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Share an immutable file by hard link (no bytes copied); copy where links cannot cross filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
