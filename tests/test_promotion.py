"""Staging, promotion, rollback and clean against the local backend and a GCS emulator."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from pipeline_assets.cli import main
from pipeline_assets.driver import start_run
from pipeline_assets.promotion import (
    PromotionFailed,
    PromotionRefused,
    clean,
    promote,
    rollback,
    stage_release,
)
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import TRO_NAME, write_tro
from resources.files import sha256_file
from resources.git import CodeState
from resources.publishers import GcsPublisher, LocalPublisher
from resources.registry import GcsRegistry, InvalidVersion, LocalRegistry, VersionManifest
from resources.run_store import LocalRunStore, RunStatus, RunStoreError
from tests.conftest import PINNED_SHA


def local_backends(store):
    return {"local": LocalPublisher(store.root)}, LocalRegistry(store.root / "version_manifest.json")


def snapshot(store):
    """Everything promotion may write: registry, production files, the run's meta.json."""
    files = {}
    for key in ["version_manifest.json"] + store.list("production") + store.list("releases"):
        if store.exists(key):
            files[key] = store.read_bytes(key)
    return files


class FailingPublisher:
    def publish(self, version, files):
        raise ConnectionError("bucket unreachable")


def test_stage_release_gathers_what_a_release_publishes(store):
    store, run_id = store
    manifest = json.loads(store.read_bytes(f"staging/{run_id}/manifest.json"))
    files = manifest["files"]
    assert sum(rel.startswith(("states/", "districts/", "cities/")) for rel in files) == 488
    for rel in ["national/US.h5", "artifacts/policy_data.db", "artifacts/source_datasets.h5", "artifacts/state_weights.npy",
                "artifacts/national_weights.npy", "diagnostics/validation.csv", "diagnostics/calibration_log.csv", TRO_NAME]:
        assert rel in files, rel
    assert sha256_file(store.path(f"staging/{run_id}/states/AL.h5")) == files["states/AL.h5"]


def test_stage_release_refuses_a_run_missing_an_area_file(tiny_release, tmp_path):
    """staged_release has one edge to the area step, not 489: staging itself checks they are all there."""
    source, meta, _ = tiny_release
    store = LocalRunStore(tmp_path / "store")
    shutil.copytree(source.root, store.root)
    shutil.rmtree(store.path(f"staging/{meta.run_id}"), ignore_errors=True)
    store.path(f"runs/{meta.run_id}/h5s/districts/AL-01.h5").unlink()
    with pytest.raises(RunStoreError, match=r"1 of its area files missing \(e.g. h5s/districts/AL-01.h5\)"):
        stage_release(store, meta.run_id)
    assert not store.path(f"staging/{meta.run_id}").exists()


def test_promote_on_the_local_backend(store):
    store, run_id = store
    publishers, registry = local_backends(store)
    entry = promote(store, run_id, "1.57.0", publishers, registry)
    written = json.loads(store.read_bytes("version_manifest.json"))
    assert written["current"] == "1.57.0" and [v["version"] for v in written["versions"]] == ["1.57.0"]
    assert set(written["versions"][0]) >= {"version", "created_at", "hf", "gcs", "special_operation", "roll_back_version",
                                           "run_id", "diagnostics_path", "git_sha", "env_id", "config_hash", "tro_path", "tro_sha256"}
    assert entry.run_id == run_id and entry.git_sha == PINNED_SHA
    assert entry.tro_sha256 == sha256_file(store.path(entry.tro_path))
    assert sha256_file(store.path("production/1.57.0/districts/AL-01.h5")) == sha256_file(store.path(f"staging/{run_id}/districts/AL-01.h5"))
    release_tro = json.loads(store.read_bytes("production/1.57.0/release.tro.jsonld"))
    assert release_tro["@graph"][0]["pe:runTro"] == TRO_NAME and release_tro["@graph"][0]["pe:version"] == "1.57.0"
    meta = store.read_meta(run_id)
    assert meta.status is RunStatus.promoted and meta.promotion.published == {"local": str(store.root / "production/1.57.0")}


def test_rollback_is_a_new_release_with_the_old_files(store):
    store, run_id = store
    publishers, registry = local_backends(store)
    promote(store, run_id, "1.56.0", publishers, registry)
    before = registry.read().versions[0]
    entry = rollback(store, "1.56.0", "1.56.1", publishers, registry, store.root / "production")
    after = registry.read()
    assert after.current == "1.56.1" and [v.version for v in after.versions] == ["1.56.1", "1.56.0"]
    assert after.versions[1] == before  # the old entry is never rewritten
    assert entry.special_operation == "roll-back" and entry.roll_back_version == "1.56.0" and entry.run_id == run_id
    old, new = store.root / "production/1.56.0", store.root / "production/1.56.1"
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == sorted(p.relative_to(new) for p in new.rglob("*"))
    assert sha256_file(new / "states/AL.h5") == sha256_file(old / "states/AL.h5")
    with pytest.raises(PromotionRefused, match="already in the registry"):
        rollback(store, "1.56.0", "1.56.1", publishers, registry, store.root / "production")


@pytest.mark.parametrize("case", ["failed", "running", "unknown", "dirty", "duplicate", "malformed", "tampered"])
def test_refusals_write_nothing(store, case):
    store, run_id = store
    publishers, registry = local_backends(store)
    version = "2.0.0"
    if case == "failed":
        store.update_meta(run_id, lambda m: setattr(m, "status", RunStatus.failed))
    elif case == "running":
        run_id = start_run(store, config_for_scale("tiny"), CodeState(PINNED_SHA, "main", False, None)).run_id
    elif case == "unknown":
        run_id = "9.9.9_a1b2c3d4_20260101_000000"
    elif case == "dirty":
        store.update_meta(run_id, lambda m: (setattr(m, "dirty", True), setattr(m, "diff_sha256", "d" * 64)))
    elif case == "duplicate":
        registry.add(VersionManifest(
            version=version, created_at="2026-01-01T00:00:00Z", hf=None, gcs=None, run_id="x", diagnostics_path="d",
            git_sha="s", env_id=None, config_hash=None, tro_path="t", tro_sha256="h"))
    elif case == "malformed":
        version = "2.0"
    elif case == "tampered":
        path = store.path(f"runs/{run_id}/h5s/districts/AL-02.h5")
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
    before, meta_before = snapshot(store), store.read_bytes(f"runs/{run_id}/meta.json") if store.exists(f"runs/{run_id}/meta.json") else None
    with pytest.raises((PromotionRefused, InvalidVersion)) as err:
        promote(store, run_id, version, publishers, registry)
    assert "\n" not in str(err.value)
    assert snapshot(store) == before
    if meta_before is not None:
        assert store.read_bytes(f"runs/{run_id}/meta.json") == meta_before


def test_dirty_run_promotes_with_allow_dirty(store):
    store, run_id = store
    store.update_meta(run_id, lambda m: (setattr(m, "dirty", True), setattr(m, "diff_sha256", "d" * 64)))
    publishers, registry = local_backends(store)
    assert promote(store, run_id, "3.0.0", publishers, registry, allow_dirty=True).version == "3.0.0"


def test_backend_failure_leaves_the_registry_and_a_second_promotion_completes(store):
    store, run_id = store
    _, registry = local_backends(store)
    failing = {"local": LocalPublisher(store.root), "gcs": FailingPublisher()}
    with pytest.raises(PromotionFailed, match="registry unchanged") as err:
        promote(store, run_id, "4.0.0", failing, registry)
    assert "gcs" in str(err.value) and "bucket unreachable" in str(err.value)
    assert registry.read().versions == []
    meta = store.read_meta(run_id)
    assert meta.status is RunStatus.completed
    assert set(meta.promotion.published) == {"local"} and "bucket unreachable" in meta.promotion.failed["gcs"]
    entry = promote(store, run_id, "4.0.0", {"local": LocalPublisher(store.root)}, registry)
    assert registry.read().current == "4.0.0" and entry.version == "4.0.0"
    assert store.read_meta(run_id).status is RunStatus.promoted


def test_promote_to_gcs_records_generations(store, gcs_client, gcs_bucket):
    store, run_id = store
    publishers = {"local": LocalPublisher(store.root), "gcs": GcsPublisher(gcs_client, gcs_bucket.name)}
    registry = GcsRegistry(gcs_client, gcs_bucket.name)
    entry = promote(store, run_id, "5.0.0", publishers, registry)
    staged = json.loads(store.read_bytes(f"staging/{run_id}/manifest.json"))["files"]
    assert entry.gcs.bucket == gcs_bucket.name and len(entry.gcs.generations) == len(staged) + 1
    blob = "production/5.0.0/districts/AL-01.h5"
    data = gcs_bucket.blob(blob, generation=entry.gcs.generations[blob]).download_as_bytes()
    assert data == store.path(f"staging/{run_id}/districts/AL-01.h5").read_bytes()
    assert json.loads(gcs_bucket.blob("version_manifest.json").download_as_bytes())["current"] == "5.0.0"

    back = rollback(store, "5.0.0", "5.0.1", publishers, registry, store.root / "production")
    registered = json.loads(gcs_bucket.blob("version_manifest.json").download_as_bytes())
    assert registered["current"] == "5.0.1" and [v["version"] for v in registered["versions"]] == ["5.0.1", "5.0.0"]
    assert registered["versions"][0]["special_operation"] == "roll-back" and registered["versions"][0]["roll_back_version"] == "5.0.0"
    rolled = "production/5.0.1/districts/AL-01.h5"
    assert gcs_bucket.blob(rolled, generation=back.gcs.generations[rolled]).download_as_bytes() == data


def test_clean_keeps_referenced_runs(store):
    store, run_id = store
    publishers, registry = local_backends(store)
    promote(store, run_id, "6.0.0", publishers, registry)
    code = CodeState(PINNED_SHA, "main", False, None)
    later = [start_run(store, config_for_scale("tiny"), code, datetime.now(timezone.utc) + timedelta(seconds=i + 1)).run_id for i in range(3)]
    for run in later:  # a running run is never removed (tests/test_reliability_concurrency.py)
        store.update_meta(run, lambda m: m.transition(RunStatus.failed))
    removed = clean(store, registry, keep=1)
    assert removed == later[:2]
    assert store.exists(f"runs/{run_id}/meta.json") and store.exists(f"runs/{later[2]}/meta.json")
    assert not store.exists(f"runs/{later[0]}/meta.json")
    assert clean(store, registry, keep=0) == [later[2]]  # the promoted run is never removed


def test_cli_promote_versions_and_refusal(store, monkeypatch, capsys, tmp_path):
    store, run_id = store
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert main(["promote", run_id, "--version", "1.2"]) == 2
    assert "1.2" in capsys.readouterr().err
    assert main(["promote", run_id, "--version", "7.0.0"]) == 0
    assert "promoted" in capsys.readouterr().out
    assert main(["versions"]) == 0
    assert "* 7.0.0" in capsys.readouterr().out
    assert main(["promote", run_id, "--version", "7.0.1"]) == 2  # promoted already: not completed
    assert "promoted" in capsys.readouterr().err
    assert main(["rollback", "--to", "7.0.0", "--as", "7.0.1"]) == 0
    assert main(["clean", "--keep", "-1"]) == 2


def _promote_in_dagster(instance, store, version: str, run_id: str):
    from pipeline_assets.definitions import defs
    from pipeline_assets.partitions import RELEASE_VERSIONS

    if not instance.has_dynamic_partition(RELEASE_VERSIONS, version):
        instance.add_dynamic_partitions(RELEASE_VERSIONS, [version])
    return defs.resolve_job_def("promote").execute_in_process(
        partition_key=version, instance=instance, raise_on_error=False,
        run_config={"ops": {"promotion": {"config": {"run_id": run_id}}},
                    "resources": {"run_store": {"config": {"root": str(store.root)}}}},
    )


def test_promotion_partitions_are_the_registry_versions_and_a_refusal_fails_nothing(store, monkeypatch):
    """A promoted version is a materialized partition of promotion; a refused request materializes
    nothing, fails no step, names its reason on the run, and leaves no partition the registry lacks."""
    from dagster import AssetKey, DagsterEventType, instance_for_test

    from pipeline_assets.partitions import RELEASE_VERSIONS
    from pipeline_assets.release import REFUSED_TAG

    store, run_id = store
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    with instance_for_test() as instance:
        first = _promote_in_dagster(instance, store, "7.0.0", run_id)
        assert first.success and instance.get_run_by_id(first.run_id).tags.get(REFUSED_TAG) is None
        materialized = first.asset_materializations_for_node("promotion")
        assert [m.partition for m in materialized] == ["7.0.0"]
        assert materialized[0].metadata["run_id"].value == run_id and materialized[0].metadata["current"].value == "7.0.0"

        for version in ("7.0.0", "7.1.0"):  # a duplicate version; a new version for a run promoted already
            refused = _promote_in_dagster(instance, store, version, run_id)
            assert refused.success and not refused.asset_materializations_for_node("promotion")
            assert not [e for e in refused.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
            reason = instance.get_run_by_id(refused.run_id).tags[REFUSED_TAG]
            assert "\n" not in reason and ("already in the registry" in reason or "already promoted" in reason)
        assert instance.get_dynamic_partitions(RELEASE_VERSIONS) == ["7.0.0"]
        assert instance.get_materialized_partitions(AssetKey("promotion")) == {"7.0.0"}
        assert [e.version for e in LocalRegistry.in_store(store.root).read().versions] == ["7.0.0"]


def test_a_rollback_is_browsed_as_its_version_partition(store, monkeypatch, tmp_path, capsys):
    from dagster import AssetKey, DagsterInstance

    store, run_id = store
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert main(["promote", run_id, "--version", "7.0.0"]) == 0
    assert main(["rollback", "--to", "7.0.0", "--as", "7.0.1"]) == 0
    with DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(AssetKey("promotion")) == {"7.0.0", "7.0.1"}
        latest = instance.get_latest_materialization_event(AssetKey("promotion")).asset_materialization
        assert latest.partition == "7.0.1" and latest.metadata["roll_back_version"].value == "7.0.0"


def test_staging_again_after_a_new_tro_revision_stages_the_newer_tro(store):
    """A rebuild adds a TRO revision; staging again swaps the staged TRO for it, so the staged files
    match the new manifest and the run promotes."""
    store, run_id = store
    first = sha256_file(store.path(f"staging/{run_id}/{TRO_NAME}"))
    newer = write_tro(store, run_id)
    manifest = stage_release(store, run_id)
    assert manifest.files[TRO_NAME] == sha256_file(newer) != first
    assert sha256_file(store.path(f"staging/{run_id}/{TRO_NAME}")) == manifest.files[TRO_NAME]
    publishers, registry = local_backends(store)
    assert promote(store, run_id, "1.58.0", publishers, registry).run_id == run_id
