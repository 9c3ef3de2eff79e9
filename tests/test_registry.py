"""The version registry on both backends: append-only, newest first, no lost writers; and readable by
PolicyEngine's own reader on both, a local-only promotion's included."""

from __future__ import annotations

import json
import multiprocessing
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage

from pipeline_assets.promotion import promote, rollback
from resources.publishers import GcsPublisher, LocalPublisher
from resources.registry import (
    NOT_UPLOADED_TO_GCS,
    DuplicateVersion,
    GcsInfo,
    GcsRegistry,
    HfInfo,
    InvalidVersion,
    LocalRegistry,
    PolicyEngineUsBuild,
    Registry,
    RegistryError,
    VersionManifest,
    precedence,
    validate_version,
)
from resources.run_store import UnreadableRecord, read_model
from tests.gcs_emulator import make_client

WRITERS = 20
MANIFEST_FIELDS = {
    "version", "created_at", "hf", "gcs", "special_operation", "roll_back_version", "run_id", "pipeline_run_id",
    "diagnostics_path", "git_sha", "env_id", "config_hash", "tro_path", "tro_sha256",
}  # and policyengine_us, where the model's version is known


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
    assert manifest["pipeline_run_id"] == manifest["run_id"] == "run-1.0.0"


def test_a_version_not_uploaded_to_gcs_says_so_and_reads_back_as_none(backend):
    """No bucket, no generation: the two keys PolicyEngine's reader needs, claiming no upload."""
    registry, raw = backend
    registry.add(entry("1.0.0", gcs=None, hf=None))
    (manifest,) = json.loads(raw())["versions"]
    assert manifest["gcs"] == NOT_UPLOADED_TO_GCS == {"bucket": None, "generations": {}} and manifest["hf"] is None
    assert registry.read().versions[0].gcs is None


def test_the_policyengine_us_block_is_written_only_when_known(backend):
    registry, raw = backend
    registry.add(entry("1.0.0"))
    registry.add(entry("1.1.0", policyengine_us=PolicyEngineUsBuild(version="1.500.0")))
    registry.add(entry("1.2.0", policyengine_us=PolicyEngineUsBuild(version="1.501.0", locked_version="1.501.0",
                                                                    git_commit="f" * 40)))
    written = {v["version"]: v for v in json.loads(raw())["versions"]}
    assert "policyengine_us" not in written["1.0.0"]
    assert written["1.1.0"]["policyengine_us"] == {"version": "1.500.0"}
    assert written["1.2.0"]["policyengine_us"] == {"version": "1.501.0", "locked_version": "1.501.0", "git_commit": "f" * 40}
    assert registry.read().versions[0].policyengine_us.git_commit == "f" * 40


def test_a_registry_written_before_reads_as_it_is(tmp_path):
    """`"gcs": null`, no pipeline_run_id, no policyengine_us: what the registry held before; no migration."""
    old = entry("1.0.0", gcs=None).model_dump(mode="json", exclude={"pipeline_run_id", "policyengine_us"})
    old["gcs"] = None
    path = tmp_path / "version_manifest.json"
    path.write_text(json.dumps({"current": "1.0.0", "versions": [old]}))
    registry = LocalRegistry(path)
    assert registry.read().versions == [entry("1.0.0", gcs=None)]
    registry.add(entry("1.1.0"))
    assert [v.version for v in registry.read().versions] == ["1.1.0", "1.0.0"]


@pytest.mark.parametrize("change, fragment", [
    ({"pipeline_run_id": "another-run"}, "pipeline_run_id 'another-run' is not the entry's run_id 'run-1.0.0'"),
    ({"gcs": {"bucket": None, "generations": {"production/1.0.0/national/US.h5": 7}}}, "gcs.bucket"),
    ({"gcs": {"bucket": "releases"}}, "gcs.generations"),
    ({"policyengine_us": {"locked_version": "1.500.0"}}, "policyengine_us.version"),
])
def test_our_reader_stays_strict(tmp_path, change, fragment):
    """An upload to no bucket, a bucket without generations, a second run id: refused in one line."""
    document = {"current": "1.0.0", "versions": [{**entry("1.0.0").model_dump(mode="json"), **change}]}
    path = tmp_path / "version_manifest.json"
    path.write_text(json.dumps(document))
    with pytest.raises(UnreadableRecord, match=re.escape(fragment)):
        read_model(path, Registry)


# --- PolicyEngine's reader (policyengine_us_data.utils.version_manifest, from its 1.115.4 wheel) -------
def _read_back(read: dict) -> list[tuple]:
    return [(v["version"], v["run_id"], v["gcs"]["bucket"], v["gcs"]["generations"], v["special_operation"],
             v["roll_back_version"]) for v in read["versions"]]


def test_policyengines_reader_reads_what_either_backend_writes(backend, policyengine_read_registry):
    registry, raw = backend
    registry.add(entry("1.0.0"))
    registry.add(entry("1.1.0", gcs=None, hf=None, policyengine_us=PolicyEngineUsBuild(version="1.500.0")))
    registry.add(entry("1.1.1", special_operation="roll-back", roll_back_version="1.1.0", gcs=None, hf=None))
    read = policyengine_read_registry(raw())
    assert read["current"] == "1.1.1"
    assert _read_back(read) == [("1.1.1", "run-1.1.1", None, {}, "roll-back", "1.1.0"),
                                ("1.1.0", "run-1.1.0", None, {}, None, None),
                                ("1.0.0", "run-1.0.0", "releases", {"production/1.0.0/national/US.h5": 7}, None, None)]
    assert [v["policyengine_us"] and v["policyengine_us"]["version"] for v in read["versions"]] == [None, "1.500.0", None]
    assert read["versions"][2]["hf"] == {"repo": "org/us-data", "commit": "c" * 40}


def test_policyengines_reader_reads_a_local_only_promotion(store, policyengine_read_registry):
    """The local-only configuration uploads nowhere: PolicyEngine's reader gets no bucket and no object."""
    store, run_id = store
    publishers, registry = {"local": LocalPublisher(store.root)}, LocalRegistry.in_store(store.root)
    promote(store, run_id, "1.57.0", publishers, registry)
    rollback(store, "1.57.0", "1.57.1", publishers, registry, store.root / "production")
    read = policyengine_read_registry(registry.path.read_bytes())
    assert read["current"] == "1.57.1"
    assert _read_back(read) == [("1.57.1", run_id, None, {}, "roll-back", "1.57.0"), ("1.57.0", run_id, None, {}, None, None)]
    assert [(v["hf"], v["policyengine_us"], v["diagnostics_path"]) for v in read["versions"]] == [
        (None, None, "production/1.57.1/diagnostics"), (None, None, "production/1.57.0/diagnostics")]


def test_policyengines_reader_reads_a_gcs_promotion(store, gcs_client, gcs_bucket, policyengine_read_registry):
    store, run_id = store
    publishers = {"local": LocalPublisher(store.root), "gcs": GcsPublisher(gcs_client, gcs_bucket.name)}
    registry = GcsRegistry(gcs_client, gcs_bucket.name)
    entry = promote(store, run_id, "5.0.0", publishers, registry)
    read = policyengine_read_registry(gcs_bucket.blob("version_manifest.json").download_as_bytes())
    assert _read_back(read) == [("5.0.0", run_id, gcs_bucket.name, entry.gcs.generations, None, None)]
    assert len(entry.gcs.generations) > 488 and read["current"] == "5.0.0"


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
