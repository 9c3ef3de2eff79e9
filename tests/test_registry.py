"""The version registry on both backends: append-only, newest first, no lost writers."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timezone
from pathlib import Path

import pytest
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage

from resources.registry import (
    DuplicateVersion,
    GcsInfo,
    GcsRegistry,
    HfInfo,
    InvalidVersion,
    LocalRegistry,
    RegistryError,
    VersionManifest,
    precedence,
    validate_version,
)
from tests.gcs_emulator import make_client

WRITERS = 20
MANIFEST_FIELDS = {
    "version", "created_at", "hf", "gcs", "special_operation", "roll_back_version", "run_id",
    "diagnostics_path", "git_sha", "env_id", "config_hash", "tro_path", "tro_sha256",
}


def entry(version: str, **changes) -> VersionManifest:
    fields = dict(
        version=version,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        hf=HfInfo(repo="org/us-data", commit="c" * 40),
        gcs=GcsInfo(bucket="releases", generations={f"production/{version}/national/US.h5": 7}),
        run_id=f"run-{version}",
        diagnostics_path=f"production/{version}/diagnostics",
        git_sha="a" * 40,
        env_id="env-1",
        config_hash="h" * 64,
        tro_path=f"production/{version}/trace.tro.jsonld",
        tro_sha256="0" * 64,
    )
    return VersionManifest(**{**fields, **changes})


@pytest.fixture(params=["local", "gcs"])
def backend(request, tmp_path):
    """(registry, raw) for each backend; raw() is the stored JSON bytes, or None if absent."""
    if request.param == "local":
        path = tmp_path / "version_manifest.json"
        return LocalRegistry(path), lambda: path.read_bytes() if path.exists() else None
    bucket = request.getfixturevalue("gcs_bucket")
    registry = GcsRegistry(request.getfixturevalue("gcs_client"), bucket.name)

    def raw():
        blob = bucket.get_blob("version_manifest.json")
        return blob.download_as_bytes() if blob else None

    return registry, raw


def test_missing_registry_reads_empty(backend):
    registry, raw = backend
    assert registry.read().current is None and registry.read().versions == []
    assert raw() is None


def test_add_round_trips_newest_first_and_moves_current(backend):
    registry, _ = backend
    added = [entry("1.0.0"), entry("1.1.0"), entry("1.0.1", special_operation="roll-back",
                                                   roll_back_version="1.0.0", hf=None, gcs=None)]
    for manifest in added:
        returned = registry.add(manifest)
    stored = registry.read()
    assert stored == returned
    assert stored.current == "1.0.1"
    assert stored.versions == added[::-1]


def test_duplicate_version_is_refused_and_nothing_changes(backend):
    registry, raw = backend
    registry.add(entry("1.0.0"))
    registry.add(entry("2.0.0"))
    before = raw()
    with pytest.raises(DuplicateVersion, match="1.0.0"):
        registry.add(entry("1.0.0", run_id="another-run"))
    assert raw() == before


@pytest.mark.parametrize("bad", ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0-01", "1.0.0+",
                                 "1.0.0 ", "1.0.0\n", "1.0.0-rc..1", "", "1.0.0.0", "١.0.0"])
def test_malformed_version_is_refused_in_one_line(backend, bad):
    registry, raw = backend
    with pytest.raises(InvalidVersion) as refused:
        registry.add(entry(bad))
    message = str(refused.value)
    assert "\n" not in message and repr(bad) in message and "MAJOR.MINOR.PATCH" in message
    assert raw() is None


@pytest.mark.parametrize("good", ["0.0.0", "1.2.3", "10.20.30", "1.2.3-rc.1", "1.2.3+build.5",
                                  "1.0.0-alpha.beta+exp.sha.5114f85", "1.0.0-0A.is.legal"])
def test_semantic_versions_are_accepted(good):
    assert validate_version(good) == good


def test_json_has_exactly_the_documented_field_names(backend):
    registry, raw = backend
    registry.add(entry("1.0.0"))
    document = json.loads(raw())
    assert set(document) == {"current", "versions"}
    (manifest,) = document["versions"]
    assert set(manifest) == MANIFEST_FIELDS
    assert set(manifest["hf"]) == {"repo", "commit"}
    assert set(manifest["gcs"]) == {"bucket", "generations"}
    assert manifest["created_at"] == "2026-01-02T03:04:05Z"


def test_emulator_honours_generation_preconditions(gcs_bucket):
    blob = gcs_bucket.blob("object")
    blob.upload_from_string(b"first", if_generation_match=0)
    stale = blob.generation
    gcs_bucket.blob("object").upload_from_string(b"second", if_generation_match=stale)
    with pytest.raises(PreconditionFailed):
        gcs_bucket.blob("object").upload_from_string(b"third", if_generation_match=stale)
    with pytest.raises(PreconditionFailed):
        gcs_bucket.blob("object").upload_from_string(b"third", if_generation_match=0)
    assert gcs_bucket.blob("object").download_as_bytes() == b"second"


def test_gcs_registry_gives_up_naming_the_object(gcs_client, gcs_bucket, monkeypatch):
    def always_stale(*args, **kwargs):
        raise PreconditionFailed("stale")

    monkeypatch.setattr(storage.Blob, "upload_from_string", always_stale)
    registry = GcsRegistry(gcs_client, gcs_bucket.name, max_attempts=3)
    with pytest.raises(RegistryError, match=f"gs://{gcs_bucket.name}/version_manifest.json"):
        registry.add(entry("1.0.0"))


def _add_local(path: str, version: str, start) -> None:
    start.wait(timeout=60)
    LocalRegistry(Path(path)).add(entry(version))


def _add_gcs(endpoint: str, bucket: str, version: str, start) -> None:
    registry = GcsRegistry(make_client(endpoint), bucket)
    start.wait(timeout=60)
    registry.add(entry(version))


def _run_writers(target, *args) -> None:
    """One process per version, released together so their read-modify-writes overlap.

    forkserver, not fork: no inherited client sockets or locks; preloading this module makes
    each writer start in milliseconds instead of re-importing everything as spawn would.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    start = context.Barrier(WRITERS)
    writers = [context.Process(target=target, args=(*args, f"1.0.{n}", start))
               for n in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0] * WRITERS


def _assert_all_registered(registry) -> None:
    stored = registry.read()
    assert sorted(m.version for m in stored.versions) == sorted(f"1.0.{n}" for n in range(WRITERS))
    assert stored.current == max((m.version for m in stored.versions), key=precedence)  # current never moves down


def test_concurrent_local_writers_lose_no_entry(tmp_path):
    path = tmp_path / "version_manifest.json"
    _run_writers(_add_local, str(path))
    _assert_all_registered(LocalRegistry(path))


def test_concurrent_gcs_writers_lose_no_entry(gcs_endpoint, gcs_client, gcs_bucket):
    _run_writers(_add_gcs, gcs_endpoint, gcs_bucket.name)
    _assert_all_registered(GcsRegistry(gcs_client, gcs_bucket.name))
