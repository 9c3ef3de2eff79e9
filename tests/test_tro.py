"""The run's TRO: tro-utils reads it, verification finds any change to a file, a signature holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import tracemalloc
from datetime import datetime, timedelta, timezone

import pytest

from pipeline_assets import tro
from pipeline_assets.cli import main
from pipeline_assets.driver import start_run
from pipeline_assets.reuse import read_record
from pipeline_assets.stages import STEP_ORDER
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.steps.geography import raw_inputs_dir
from resources.files import HASH_CHUNK_BYTES, sha256_file
from pipeline_assets.tro import (
    CONTEXT,
    TRO_NAME,
    GpgSigner,
    SigningError,
    build_tro,
    canonical_bytes,
    signer_from_environment,
    tro_revisions,
    verify_run,
    write_tro,
)
from resources.git import CodeState
from resources.run_store import LocalRunStore
from tests.conftest import PINNED_SHA

needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")
KEY_EMAIL = "t@example.org"


@pytest.fixture
def run(tiny_release, tmp_path):
    """(store, run_id) of a copy of the tiny run, free to tamper with."""
    store, meta, _ = tiny_release
    shutil.copytree(store.root, tmp_path / "store")
    return LocalRunStore(tmp_path / "store"), meta.run_id


@pytest.fixture
def gnupg_home(monkeypatch):
    """A throwaway keyring with one passphrase-less key, configured as the pipeline's signer."""
    home = tempfile.mkdtemp(prefix="gnupg-")  # short: gpg-agent's socket path has a length limit
    subprocess.run(
        ["gpg", "--homedir", home, "--batch", "--passphrase", "", "--quick-gen-key", f"test <{KEY_EMAIL}>",
         "default", "default", "never"],
        check=True, capture_output=True,
    )
    monkeypatch.setenv("GNUPGHOME", home)
    monkeypatch.setenv("PIPELINE_GPG_KEY", KEY_EMAIL)
    yield home
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def latest(store: LocalRunStore, run_id: str) -> dict:
    return json.loads(tro_revisions(store, run_id)[-1].read_bytes())


def located(doc: dict, arrangement: int) -> dict[str, str]:
    """{path: sha256} of one arrangement of a TRO."""
    root = doc["@graph"][0]
    hashes = {a["@id"]: a["trov:hash"]["trov:hashValue"] for a in root["trov:hasComposition"]["trov:hasArtifact"]}
    locations = root["trov:hasArrangement"][arrangement]["trov:hasArtifactLocation"]
    return {loc["trov:path"]: hashes[loc["trov:artifact"]["@id"]] for loc in locations}


def flip_byte(store: LocalRunStore, run_id: str, rel: str) -> None:
    path = store.path(store.run_key(run_id, rel))
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_completed_run_has_a_tro_of_every_input_output_and_step(tiny_release):
    store, meta, _ = tiny_release
    [path] = tro_revisions(store, meta.run_id)
    assert path.name == TRO_NAME
    doc = json.loads(path.read_bytes())
    assert path.read_bytes() == canonical_bytes(doc)
    root = doc["@graph"][0]
    assert doc["@context"] == CONTEXT
    assert "trov:TransparentResearchObject" in root["@type"] and root["trov:vocabularyVersion"] == "0.1"
    assert meta.run_id in root["schema:name"]
    assert (root["pe:runId"], root["pe:gitSha"], root["pe:dirty"]) == (meta.run_id, meta.sha, False)
    assert root["trov:wasAssembledBy"]["schema:name"] == f"usdata-pipeline {meta.version}"

    sums = (raw_inputs_dir() / "SHA256SUMS").read_text().split()
    assert located(doc, 0) == {f"raw_inputs/{name}": digest for digest, name in zip(sums[::2], sums[1::2])}
    outputs = located(doc, 1)
    for step in STEP_ORDER:
        assert read_record(store, meta.run_id, step).outputs.items() <= outputs.items()
    assert "steps/local_areas.json" in outputs
    assert "meta.json" not in outputs and TRO_NAME not in outputs

    performances = root["trov:hasPerformance"]
    assert [p["pe:step"] for p in performances] == list(STEP_ORDER)
    for performance in performances:
        assert performance["trov:wasConductedBy"] == {"@id": root["trov:wasAssembledBy"]["@id"]}
        assert performance["trov:startedAtTime"] <= performance["trov:endedAtTime"]
        assert {"pe:pythonVersion", "pe:libraryVersions", "pe:cloudRegion", "pe:computePool", "pe:envId",
                "pe:configHash", "pe:codeVersion", "pe:reuse"} <= performance.keys()
        assert json.loads(performance["pe:libraryVersions"])["numpy"]


def test_a_step_that_ran_with_a_gpu_names_it(tiny_release):
    store, meta, _ = tiny_release
    record = read_record(store, meta.run_id, "state_weights")
    on_gpu = record.model_copy(update={"environment": {**record.environment, "gpu_model": "NVIDIA H200"}})
    dumped = tro._performance(3, on_gpu, None).model_dump(by_alias=True, exclude_none=True)
    assert dumped["pe:gpuModel"] == "NVIDIA H200"


def test_tro_utils_reads_the_tro_and_agrees_on_fingerprint_and_files(tiny_release, tmp_path):
    from tro_utils.models import TransparentResearchObject
    from tro_utils.models.composition import CompositionFingerprint
    from tro_utils.replication_package import ReplicationPackage

    store, meta, _ = tiny_release
    [path] = tro_revisions(store, meta.run_id)
    ours = json.loads(path.read_bytes())["@graph"][0]["trov:hasComposition"]
    loaded = TransparentResearchObject.load(path)
    theirs = CompositionFingerprint.compute(loaded.composition.artifacts).hash.value
    assert theirs == loaded.composition.fingerprint.hash.value == ours["trov:hasFingerprint"]["trov:hash"]["trov:hashValue"]
    assert len(loaded.composition.artifacts) == len(ours["trov:hasArtifact"])
    assert [p.extra_attributes["pe:step"] for p in loaded.performances] == list(STEP_ORDER)

    # tro-utils' own check of a directory against an arrangement
    inputs, outputs = loaded.arrangements
    result = ReplicationPackage.verify(outputs, loaded.composition, store.path(store.run_key(meta.run_id)))
    assert result.files_missing_in_package == []
    assert set(result.files_missing_in_arrangement) == {".meta.lock", "meta.json", TRO_NAME}
    assert [m for m in result.mismatched_hashes if m[1] is not None] == []
    result = ReplicationPackage.verify(inputs, loaded.composition, raw_inputs_dir().parent)
    assert result.files_missing_in_package == [] and result.files_missing_in_arrangement == ["raw_inputs/SHA256SUMS"]
    assert [m for m in result.mismatched_hashes if m[1] is not None] == []

    loaded.save(tmp_path / "resaved.jsonld")  # tro-utils refuses to write a TRS or capability id it deems invalid


def _nodes(value, defined: list, referenced: set, keys: set) -> int:
    """Walk a JSON-LD tree: node definitions (@type), references (only @id), property keys; count blank nodes."""
    blanks = 0
    if isinstance(value, list):
        return sum(_nodes(item, defined, referenced, keys) for item in value)
    if isinstance(value, dict):
        if "@type" in value:
            defined.append(value["@id"])
        elif set(value) == {"@id"}:
            referenced.add(value["@id"])
        else:
            blanks += 1
        keys.update(value)
        blanks += sum(_nodes(item, defined, referenced, keys) for item in value.values())
    return blanks


def test_jsonld_round_trip_keeps_every_node(tiny_release):
    store, meta, _ = tiny_release
    doc = build_tro(store, meta.run_id)
    assert json.loads(canonical_bytes(doc)) == doc
    defined, referenced, keys = [], set(), set()
    _nodes(doc["@graph"], defined, referenced, keys)
    assert len(defined) == len(set(defined))  # no two nodes share an @id
    assert referenced <= set(defined)  # every @id referenced is a node of the document
    prefixes = {key.split(":", 1)[0] for key in keys if not key.startswith("@")}
    assert prefixes <= CONTEXT.keys()


def test_jsonld_expansion_keeps_every_node(tiny_release):
    jsonld = pytest.importorskip("pyld.jsonld")
    store, meta, _ = tiny_release
    doc = build_tro(store, meta.run_id)
    defined, referenced, keys = [], set(), set()
    blanks = _nodes(doc["@graph"], defined, referenced, keys)
    flat = jsonld.flatten(doc)
    graph = flat["@graph"] if isinstance(flat, dict) else flat
    assert len(graph) == len(defined) + blanks
    expanded_keys = {key for node in graph for key in node if not key.startswith("@")}
    assert expanded_keys == {CONTEXT[k.split(":")[0]] + k.split(":")[1] for k in keys if not k.startswith("@")}


def test_verify_is_ok_on_the_untouched_run(tiny_release):
    store, meta, _ = tiny_release
    report = verify_run(store, meta.run_id)
    assert report.ok, report.lines()
    assert report.fingerprint_ok and report.tro == TRO_NAME
    doc = latest(store, meta.run_id)
    assert report.artifacts_checked == len(located(doc, 0)) + len(located(doc, 1))


@pytest.mark.parametrize(
    "rel", ["artifacts/policy_data.db", "h5s/states/CA.h5", "h5s/national/US.h5", "diagnostics/validation.csv"]
)
def test_verify_finds_a_flipped_byte(run, rel):
    store, run_id = run
    expected = located(latest(store, run_id), 1)[rel]
    flip_byte(store, run_id, rel)
    report = verify_run(store, run_id)
    assert not report.ok
    [mismatch] = report.mismatches
    assert (mismatch.path, mismatch.expected) == (rel, expected)
    assert mismatch.found == sha256_file(store.path(store.run_key(run_id, rel))) != expected
    assert report.fingerprint_ok and not report.problems  # the TRO itself is intact


def test_verify_finds_a_removed_file(run):
    store, run_id = run
    store.path(store.run_key(run_id, "artifacts/state_weights.npy")).unlink()
    report = verify_run(store, run_id)
    assert not report.ok
    assert [(m.path, m.found) for m in report.mismatches] == [("artifacts/state_weights.npy", "missing")]


def test_verify_finds_a_changed_raw_input(run, tmp_path, monkeypatch):
    store, run_id = run
    raw_copy = tmp_path / "package" / raw_inputs_dir().name
    shutil.copytree(raw_inputs_dir(), raw_copy)
    (raw_copy / "snap_state.csv").write_text("state,snap\n")
    monkeypatch.setattr(tro, "raw_inputs_dir", lambda: raw_copy)
    report = verify_run(store, run_id)
    assert [m.path for m in report.mismatches] == ["raw_inputs/snap_state.csv"] and not report.ok


def test_verify_finds_an_edited_tro(run):
    store, run_id = run
    [path] = tro_revisions(store, run_id)
    doc = json.loads(path.read_bytes())
    artifacts = doc["@graph"][0]["trov:hasComposition"]["trov:hasArtifact"]
    original = artifacts[-1]["trov:hash"]["trov:hashValue"]
    artifacts[-1]["trov:hash"]["trov:hashValue"] = "0" * 64
    path.write_bytes(canonical_bytes(doc))
    report = verify_run(store, run_id)
    assert not report.ok and not report.fingerprint_ok
    assert any("fingerprint" in line and "edited" in line for line in report.problems)
    assert [(m.expected, m.found) for m in report.mismatches] == [("0" * 64, original)]


def test_a_tro_is_never_replaced_the_next_revision_is_written_beside_it(run):
    store, run_id = run
    [first] = tro_revisions(store, run_id)
    before = first.read_bytes()
    assert write_tro(store, run_id).name == "trace.tro.v2.jsonld"
    assert write_tro(store, run_id).name == "trace.tro.v3.jsonld"
    assert first.read_bytes() == before
    assert [p.name for p in tro_revisions(store, run_id)] == [TRO_NAME, "trace.tro.v2.jsonld", "trace.tro.v3.jsonld"]
    assert verify_run(store, run_id).tro == "trace.tro.v3.jsonld"


def test_settle_run_writes_a_tro_once_and_only_for_a_completed_run(tmp_path):
    from pipeline_assets.launch import settle_run

    store = LocalRunStore(tmp_path / "store")
    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    started = datetime(2026, 3, 18, 14, 30, 22, tzinfo=timezone.utc)
    done, failed = (start_run(store, config_for_scale("tiny"), code, started + timedelta(seconds=s)) for s in (0, 1))
    settle_run(store, done.run_id, True, [])
    settle_run(store, done.run_id, True, [])
    settle_run(store, failed.run_id, True, ["policy_data_db:row_counts"])
    assert [p.name for p in tro_revisions(store, done.run_id)] == [TRO_NAME]
    assert tro_revisions(store, failed.run_id) == []
    assert verify_run(store, done.run_id).ok


def test_no_signer_without_a_configured_key(monkeypatch):
    monkeypatch.delenv("PIPELINE_GPG_KEY", raising=False)
    assert signer_from_environment() is None


@needs_gpg
def test_a_signed_tro_verifies_and_an_edited_one_does_not(run, gnupg_home, tmp_path):
    store, run_id = run
    signer = signer_from_environment()
    assert (signer.key_id, signer.gnupg_home) == (KEY_EMAIL, gnupg_home)
    tro_revisions(store, run_id)[0].unlink()  # a signed run is signed in every revision: sign its first
    path = write_tro(store, run_id, signer)
    signature = path.with_name(path.name + ".sig")
    assert signature.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----")
    text = path.read_text()
    assert "PRIVATE KEY" not in text and gnupg_home not in text
    doc = json.loads(text)
    assert doc["@graph"][0]["trov:wasAssembledBy"]["trov:publicKey"].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")

    report = verify_run(store, run_id)
    assert report.ok and report.signature == "ok", report.lines()
    empty_keyring = tmp_path / "empty-keyring"
    empty_keyring.mkdir(mode=0o700)
    assert verify_run(store, run_id, gnupg_home=str(empty_keyring)).signature == "unverifiable"

    # an edit that leaves the fingerprint right is still caught by the signature
    doc["@graph"][0]["schema:name"] = "another run"
    path.write_bytes(canonical_bytes(doc))
    report = verify_run(store, run_id)
    assert not report.ok and report.signature == "bad"
    assert report.fingerprint_ok and not report.mismatches


@needs_gpg
def test_a_signer_that_fails_writes_nothing(run, gnupg_home):
    store, run_id = run
    with pytest.raises(SigningError, match="nobody@example.org"):
        write_tro(store, run_id, GpgSigner("nobody@example.org", gnupg_home))
    assert [p.name for p in tro_revisions(store, run_id)] == [TRO_NAME]


def test_cli_verify_exit_codes(run, monkeypatch, capsys):
    store, run_id = run
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    assert main(["verify", run_id]) == 0
    assert capsys.readouterr().out.startswith(f"OK {run_id}: ")

    flip_byte(store, run_id, "diagnostics/validation.csv")
    assert main(["verify", run_id]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"FAILED {run_id}: diagnostics/validation.csv: expected sha256 ")

    for argv, fragment in ((["verify", "latest"], "malformed run_id 'latest'"),
                           (["verify", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("usdata-pipeline: error: ") and fragment in err and "\n" not in err


def test_hashing_streams_in_bounded_memory(tmp_path):
    data = os.urandom(8 * HASH_CHUNK_BYTES + 17)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        found = sha256_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == expected
    assert peak < 3 * HASH_CHUNK_BYTES  # the file is 8 chunks; only about one is ever held
