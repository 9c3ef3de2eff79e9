"""Publishers: put one release's files on a backend under its version, never overwriting.

`files` maps a path relative to the release ("states/AL.h5", "trace.tro.jsonld") to a local file.
Every publish is idempotent, so a promotion that failed half-way is simply run again: a file
already there with the same bytes counts as published; one with different bytes is an error that
names it, because a published version must never change.
"""

from __future__ import annotations

import base64
import filecmp
import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import google_crc32c
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage
from huggingface_hub import CommitOperationAdd
from pydantic import BaseModel

from resources.files import PUBLISHED_MODE, sha256_file
from resources.registry import GcsInfo, HfInfo, validate_version

HF_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class PublishError(RuntimeError):
    pass


class PublishResult(BaseModel):
    backend: str
    location: str
    gcs: GcsInfo | None = None
    hf: HfInfo | None = None


class Publisher(Protocol):
    def publish(self, version: str, files: dict[str, Path]) -> PublishResult: ...


def _check_release(version: str, files: dict[str, Path]) -> None:
    """Refuse names that would land outside the release's own folder."""
    validate_version(version)
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts or "\\" in rel:
            raise PublishError(f"release path {rel!r} must be relative, inside the release")


def _digest(hasher: Any, path: Path) -> Any:
    """`hasher` (any object with update: a hashlib hash, a CRC32C checksum) fed the file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hasher)


INCOMING = ".incoming"  # under production/: where copies are made before they are linked into a release


class LocalPublisher:
    """root/production/{version}/{rel} on a local (or mounted) file system."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def publish(self, version: str, files: dict[str, Path]) -> PublishResult:
        _check_release(version, files)
        release = self.root / "production" / version
        incoming = self.root / "production" / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        for rel, source in files.items():
            _place(Path(source), release / rel, incoming)
        return PublishResult(backend="local", location=str(release))


def _place(source: Path, final: Path, incoming: Path) -> None:
    """Copy to a temporary name in `incoming` (same file system, outside every release, so a killed
    copy leaves nothing in one), then hard-link into place: unlike a rename, a link fails when
    `final` exists, so not even a concurrent publisher can overwrite a published file."""
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=incoming)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, PUBLISHED_MODE)
            os.link(tmp, final)
            return
        except FileExistsError:
            pass  # published meanwhile: compare below
        finally:
            os.unlink(tmp)
    if not filecmp.cmp(source, final, shallow=False):
        raise PublishError(f"{final} is already published with different bytes than {source}")


class GcsPublisher:
    """gs://{bucket}/{prefix}/{version}/{rel}; records each object's generation, so a release
    stays downloadable exactly as published even where object versioning keeps later writes."""

    def __init__(self, client: storage.Client, bucket: str, prefix: str = "production"):
        self.bucket = client.bucket(bucket)
        self.prefix = prefix

    def publish(self, version: str, files: dict[str, Path]) -> PublishResult:
        _check_release(version, files)
        release = f"{self.prefix}/{version}"
        generations = {
            f"{release}/{rel}": self._upload(f"{release}/{rel}", Path(source))
            for rel, source in files.items()
        }
        return PublishResult(
            backend="gcs", location=f"gs://{self.bucket.name}/{release}",
            gcs=GcsInfo(bucket=self.bucket.name, generations=generations),
        )

    def _upload(self, name: str, source: Path) -> int:
        blob = self.bucket.blob(name)
        try:
            blob.upload_from_filename(str(source), if_generation_match=0)  # only if absent
        except PreconditionFailed:
            blob.reload()
            if not _same_bytes(blob, source):
                raise PublishError(
                    f"gs://{self.bucket.name}/{name} is already published with different bytes "
                    f"than {source}"
                ) from None
        return int(blob.generation)


def _same_bytes(blob: storage.Blob, path: Path) -> bool:
    """Compare by MD5 where GCS has one; composite objects carry only CRC32C."""
    if blob.md5_hash:
        hasher: Any = hashlib.md5(usedforsecurity=False)
        expected = blob.md5_hash
    else:
        hasher, expected = google_crc32c.Checksum(), blob.crc32c
    return base64.b64encode(_digest(hasher, path).digest()).decode() == expected


class HfPublisher:
    """{version}/{rel} in a Hugging Face repo, as one commit titled "Release {version}".

    Idempotence rule: a version is released by exactly one commit with that title. If the history
    up to the head already holds it, that commit is the result, after checking that its files
    have the same bytes; otherwise a new commit is made on the head just read (`parent_commit`),
    so a concurrent commit makes the hub refuse ours instead of silently interleaving.
    The token lives in `api` (or HF_TOKEN); this code never reads it.
    """

    def __init__(self, api: Any, repo_id: str, repo_type: str = "dataset"):
        self.api = api
        self.repo_id = repo_id
        self.repo_type = repo_type

    def publish(self, version: str, files: dict[str, Path]) -> PublishResult:
        _check_release(version, files)
        message = f"Release {version}"
        head = self.api.repo_info(self.repo_id, repo_type=self.repo_type).sha
        history = self.api.list_repo_commits(self.repo_id, repo_type=self.repo_type, revision=head)
        commit = next((c.commit_id for c in history if c.title == message), None)
        if commit is not None:
            self._check_same(commit, version, files)
        else:
            commit = self._commit(message, head, version, files)
        return PublishResult(
            backend="hf",
            location=f"hf://{HF_URL_PREFIX[self.repo_type]}{self.repo_id}@{commit}/{version}",
            hf=HfInfo(repo=self.repo_id, commit=commit),
        )

    def _commit(self, message: str, head: str, version: str, files: dict[str, Path]) -> str:
        operations = [
            CommitOperationAdd(path_in_repo=f"{version}/{rel}", path_or_fileobj=str(path))
            for rel, path in files.items()
        ]
        try:
            info = self.api.create_commit(
                repo_id=self.repo_id, repo_type=self.repo_type, operations=operations,
                commit_message=message, parent_commit=head,
            )
        except Exception as error:
            raise PublishError(
                f"{self.repo_id}: commit {message!r} on parent {head} failed (if the head "
                f"moved, another writer committed meanwhile; publish again): "
                f"{type(error).__name__}: {error}"
            ) from error
        return info.oid

    def _check_same(self, commit: str, version: str, files: dict[str, Path]) -> None:
        paths = {f"{version}/{rel}": Path(local) for rel, local in files.items()}
        remote = {
            info.path: info
            for info in self.api.get_paths_info(
                self.repo_id, list(paths), revision=commit, repo_type=self.repo_type
            )
        }
        for path, local in paths.items():
            info = remote.get(path)
            if info is None or not _same_on_hub(info, local):
                state = "lacks" if info is None else "has different bytes for"
                raise PublishError(f"{self.repo_id}@{commit} (Release {version}) {state} {path}")


def _same_on_hub(info: Any, path: Path) -> bool:
    """LFS files are known by their SHA-256; the rest by their git blob id (SHA-1)."""
    if getattr(info, "lfs", None):
        return info.lfs.sha256 == sha256_file(path)
    header = f"blob {path.stat().st_size}\0".encode()
    return getattr(info, "blob_id", None) == _digest(hashlib.sha1(header), path).hexdigest()
