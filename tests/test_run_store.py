import json
import os

import pytest

from resources.files import atomic_path
from resources.run_store import LocalRunStore, RunMeta, RunStatus, RunStoreError

RUN = "1.0.0_a1b2c3d4_20260318_143022"


@pytest.fixture
def store(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    store.create_run(RunMeta(run_id=RUN, sha="a1b2c3d4" + "0" * 32, version="1.0.0", config={}))
    return store


def test_store_root_from_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_STORE", str(tmp_path / "elsewhere"))
    assert LocalRunStore().root == tmp_path / "elsewhere"


def test_meta_json_round_trips_with_step_timings(store):
    store.update_meta(RUN, lambda m: m.step_started("policy_data_db"))
    store.update_meta(RUN, lambda m: m.step_ended("policy_data_db", "succeeded"))
    raw = json.loads(store.read_bytes(f"runs/{RUN}/meta.json"))
    assert raw["status"] == "running"
    timing = raw["step_timings"]["policy_data_db"]
    assert timing["status"] == "succeeded" and timing["duration_s"] >= 0 and timing["ended_at"]


def test_status_transitions(store):
    with pytest.raises(RunStoreError, match="running cannot become promoted"):
        store.update_meta(RUN, lambda m: m.transition(RunStatus.promoted))
    store.update_meta(RUN, lambda m: m.transition(RunStatus.completed))
    assert store.update_meta(RUN, lambda m: m.transition(RunStatus.promoted)).status is RunStatus.promoted
    with pytest.raises(RunStoreError):
        store.update_meta(RUN, lambda m: m.transition(RunStatus.running))


def test_a_run_id_is_never_reused(store):
    with pytest.raises(RunStoreError, match="already exists"):
        store.create_run(RunMeta(run_id=RUN, sha="b" * 40, version="1.0.0", config={}))


def test_completed_run_files_cannot_be_overwritten_but_can_be_appended(store):
    store.write_run_file(RUN, "artifacts/x.bin", b"first")
    store.write_run_file(RUN, "artifacts/x.bin", b"rewritten while running")
    store.update_meta(RUN, lambda m: m.transition(RunStatus.completed))
    with pytest.raises(RunStoreError, match="append-only"):
        store.write_run_file(RUN, "artifacts/x.bin", b"tampered")
    assert store.read_bytes(f"runs/{RUN}/artifacts/x.bin") == b"rewritten while running"
    store.write_run_file(RUN, "trace.v2.jsonld", b"{}")  # new files may still be added


def test_interrupted_atomic_write_leaves_nothing_at_the_final_path(tmp_path):
    final = tmp_path / "out" / "file.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed midway")
    assert not final.exists()
    assert os.listdir(final.parent) == []


def test_keys_cannot_escape_the_store(store):
    with pytest.raises(RunStoreError, match="outside the store"):
        store.path("../../etc/passwd")


def test_unknown_run_is_a_clear_error(store):
    with pytest.raises(RunStoreError, match="unknown run 9.9.9"):
        store.read_meta("9.9.9_a1b2c3d4_20260318_143022")
