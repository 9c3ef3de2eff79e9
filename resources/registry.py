"""The version registry, version_manifest.json: every release ever promoted, newest first.

The registry is append-only: `add` puts one new version at the front and never rewrites or drops
an entry, so concurrent promotions can be refused but never lose each other's entries. Locally a
file lock serialises writers; on GCS the write is conditioned on the generation that was read.
`current` moves only to the version just added: a roll-back always, a promotion unless it is lower
(semver precedence) than the current version, which stays current.

The JSON is also what PolicyEngine's own reader (policyengine_us_data.utils.version_manifest,
VersionRegistry.from_dict) reads: it requires `gcs` to be an object holding `bucket` and
`generations`, so a version never uploaded to GCS is written `{"bucket": null, "generations": {}}`
(no bucket, no object) rather than `null`, and each entry names its run as `pipeline_run_id` too.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud import storage
from pydantic import BaseModel, Field, ValidationError, computed_field, field_serializer, field_validator, model_validator

from resources.files import write_bytes_atomic
from resources.run_store import read_model

# semver.org's own regular expression, with ASCII digits only.
_IDENT = r"(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
SEMVER = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    rf"(?:-{_IDENT}(?:\.{_IDENT})*)?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?"
)
GCS_BACKOFF_CAP_S = 0.5
REGISTRY_NAME = "version_manifest.json"  # at the run store's root, and the object name in a bucket


class InvalidVersion(ValueError):
    pass


class RegistryError(RuntimeError):
    pass


class DuplicateVersion(RegistryError):
    pass


def validate_version(text: str) -> str:
    """Return `text` if it is a semantic version; a release name is public and permanent."""
    if not isinstance(text, str) or not SEMVER.fullmatch(text):
        raise InvalidVersion(
            f"invalid version {text!r}: expected MAJOR.MINOR.PATCH with optional -prerelease "
            "and +build (semver.org), e.g. 1.2.3, 1.2.3-rc.1, 1.2.3+build.5"
        )
    return text


def precedence(version: str) -> tuple:
    """A sort key in semver.org's precedence: build metadata ignored, a pre-release below its
    release, numeric identifiers below alphanumeric ones and compared as numbers."""
    core, _, prerelease = validate_version(version).partition("+")[0].partition("-")
    major, minor, patch = (int(part) for part in core.split("."))
    if not prerelease:
        return major, minor, patch, (1,)
    identifiers = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in prerelease.split("."))
    return major, minor, patch, (0, *identifiers)


class HfInfo(BaseModel):
    repo: str
    commit: str


class GcsInfo(BaseModel):
    bucket: str
    generations: dict[str, int]


# How the JSON says a version was not uploaded to GCS: PolicyEngine's reader needs the two keys.
NOT_UPLOADED_TO_GCS = {"bucket": None, "generations": {}}


def _none(value: object) -> bool:
    return value is None


class PolicyEngineUsBuild(BaseModel):
    """The policyengine-us a release's run ran (the block PolicyEngine's readers call policyengine_us);
    unknown parts are left out, as PolicyEngine's own writer leaves them."""

    version: str = Field(min_length=1)
    locked_version: str | None = Field(None, exclude_if=_none)
    git_commit: str | None = Field(None, exclude_if=_none)


class VersionManifest(BaseModel):
    """One release; field names follow what existing readers of such registries expect. `gcs` is None
    where the version was not uploaded to GCS (NOT_UPLOADED_TO_GCS in the JSON); entries written
    before that form (`"gcs": null`, no pipeline_run_id) read as they are."""

    version: str
    created_at: datetime
    hf: HfInfo | None
    gcs: GcsInfo | None
    special_operation: Literal["roll-back"] | None = None
    roll_back_version: str | None = None
    run_id: str
    diagnostics_path: str
    git_sha: str
    env_id: str | None
    config_hash: str | None
    tro_path: str
    tro_sha256: str
    policyengine_us: PolicyEngineUsBuild | None = Field(None, exclude_if=_none)  # None: no model version known

    @computed_field
    @property
    def pipeline_run_id(self) -> str:
        """The run_id under the name PolicyEngine's pipeline writes it."""
        return self.run_id

    @model_validator(mode="before")
    @classmethod
    def _same_run(cls, data: Any) -> Any:
        """pipeline_run_id is written, not stored: it may only repeat run_id."""
        if isinstance(data, dict) and "pipeline_run_id" in data:
            data = dict(data)
            named = data.pop("pipeline_run_id")
            if named != data.get("run_id"):
                raise ValueError(f"pipeline_run_id {named!r} is not the entry's run_id {data.get('run_id')!r}")
        return data

    @field_validator("gcs", mode="before")
    @classmethod
    def _not_uploaded(cls, value: Any) -> Any:
        return None if value == NOT_UPLOADED_TO_GCS else value

    @field_serializer("gcs")
    def _gcs_or_not_uploaded(self, gcs: GcsInfo | None) -> dict:
        return gcs.model_dump() if gcs is not None else dict(NOT_UPLOADED_TO_GCS)


class Registry(BaseModel):
    current: str | None = None
    versions: list[VersionManifest] = []

    def with_entry(self, entry: VersionManifest) -> Registry:
        """The registry with `entry` in front, current when `makes_current`; existing entries untouched."""
        validate_version(entry.version)
        if any(known.version == entry.version for known in self.versions):
            raise DuplicateVersion(f"version {entry.version} is already in the registry")
        current = entry.version if self.makes_current(entry) else self.current
        return Registry(current=current, versions=[entry, *self.versions])

    def makes_current(self, entry: VersionManifest) -> bool:
        """A roll-back is an explicit choice of what is current; a promotion never moves current down."""
        return (self.current is None or entry.special_operation == "roll-back"
                or precedence(entry.version) >= precedence(self.current))

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


class RegistryBackend(Protocol):
    def read(self) -> Registry: ...

    def add(self, entry: VersionManifest) -> Registry: ...


class LocalRegistry:
    """version_manifest.json on a local (or mounted) file system."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def in_store(cls, store_root: Path) -> LocalRegistry:
        """The registry every run store keeps at its root."""
        return cls(Path(store_root) / REGISTRY_NAME)

    def read(self) -> Registry:
        """The registry (empty where there is no file); an unreadable one is one line naming the file,
        and `add` refuses to write over it."""
        try:
            return read_model(self.path, Registry)
        except FileNotFoundError:
            return Registry()

    def add(self, entry: VersionManifest) -> Registry:
        with self._locked():
            registry = self.read().with_entry(entry)
            write_bytes_atomic(self.path, registry.to_json())
        return registry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Lock a sibling file: the registry itself is replaced on every write, so its inode
        (and any lock held on it) would not outlive the first writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


class GcsRegistry:
    """version_manifest.json in a bucket; optimistic concurrency on the object's generation."""

    def __init__(self, client: storage.Client, bucket: str,
                 blob_name: str = REGISTRY_NAME, max_attempts: int = 50):
        self.bucket = client.bucket(bucket)
        self.blob_name = blob_name
        self.max_attempts = max_attempts

    def read(self) -> Registry:
        return self._read()[0]

    def add(self, entry: VersionManifest) -> Registry:
        for attempt in range(self.max_attempts):
            registry, generation = self._read()
            updated = registry.with_entry(entry)
            try:
                self.bucket.blob(self.blob_name).upload_from_string(
                    updated.to_json(), content_type="application/json",
                    if_generation_match=generation,
                )
                return updated
            except PreconditionFailed:  # another writer got in between: re-read, try again
                time.sleep(random.uniform(0, min(GCS_BACKOFF_CAP_S, 0.01 * 2**attempt)))
        raise RegistryError(
            f"gs://{self.bucket.name}/{self.blob_name}: version {entry.version} not added; "
            f"the object changed under each of {self.max_attempts} attempts"
        )

    def _read(self) -> tuple[Registry, int]:
        """The registry and the generation it was read at (0, which matches no object, if none)."""
        blob = self.bucket.blob(self.blob_name)
        try:
            data = blob.download_as_bytes()
        except NotFound:
            return Registry(), 0
        try:
            return Registry.model_validate_json(data), int(blob.generation)
        except ValidationError as exc:
            raise RegistryError(f"unreadable registry gs://{self.bucket.name}/{self.blob_name}: "
                                f"{exc.errors()[0]['msg']}".splitlines()[0]) from None
