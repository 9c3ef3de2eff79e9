"""The run's TRO: tro-utils reads it, PolicyEngine's schema and TRACE's LINKABLE-TRO tier accept it,
verification finds any change to a file, a signature holds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
import tracemalloc
from datetime import datetime, timedelta, timezone
from importlib.resources import files
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from pipeline_assets import tro
from pipeline_assets.cli import main
from pipeline_assets.driver import run_release, start_run
from pipeline_assets.promotion import PromotionRefused, promote, stage_release
from pipeline_assets.reuse import read_record, record_key
from pipeline_assets.step_graph import STEP_ORDER
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.steps.geography import raw_inputs_dir
from pipeline_assets.tro import (
    CONTEXT,
    DEFAULT_TRO_BASE,
    MODEL_PACKAGE,
    TRO_BASE_VARIABLE,
    TRO_NAME,
    GpgSigner,
    ModelPackage,
    Node,
    SigningError,
    TroConfigError,
    build_release_tro,
    build_tro,
    canonical_bytes,
    run_tro_base,
    signer_from_environment,
    tro_base,
    tro_revisions,
    verify_run,
    write_tro,
)
from resources.files import sha256_file
from resources.git import CodeState
from resources.publishers import LocalPublisher
from resources.registry import LocalRegistry
from resources.run_store import LocalRunStore
from tests.conftest import PINNED_SHA, copy_store

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
    assert doc["@context"] == [{**CONTEXT, "@base": f"{DEFAULT_TRO_BASE}runs/{meta.run_id}/v1/"}]
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
    dumped = tro._performance(meta.run_id, 3, on_gpu, None).model_dump(by_alias=True, exclude_none=True)
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
    # beside the raw inputs: their checksums, the vocabulary, and the model environment's lock (named by its env_id)
    assert result.files_missing_in_package == []
    assert sorted(result.files_missing_in_arrangement) == ["model_environment/requirements.lock", VOCABULARY.name, "raw_inputs/SHA256SUMS"]
    assert [m for m in result.mismatched_hashes if m[1] is not None] == []

    loaded.save(tmp_path / "resaved.jsonld")  # tro-utils refuses to write a TRS or capability id it deems invalid


def _nodes(value, defined: list, referenced: set, keys: set) -> int:
    """Walk a JSON-LD tree: node definitions (an @id and more), references (only @id), property keys;
    count blank nodes."""
    blanks = 0
    if isinstance(value, list):
        return sum(_nodes(item, defined, referenced, keys) for item in value)
    if isinstance(value, dict):
        if set(value) == {"@id"}:
            referenced.add(value["@id"])
        elif "@id" in value:
            defined.append(value["@id"])
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
    blanks = _nodes(doc["@graph"], defined, referenced, keys)
    assert len(defined) == len(set(defined))  # no two nodes share an @id
    assert referenced <= set(defined)  # every @id referenced is a node of the document
    assert blanks == 0  # every node is named (tro-checks' node-ids-present)
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


def test_a_tro_written_before_the_pe_formats_still_reads_and_verifies(run):
    """No migration: a TRO as written before (a context object, no @base, unnamed hashes, performances
    without pe:emittedIn or pe:dataBuildId) is read, verified, and followed by a revision in the new form."""
    store, run_id = run
    [path] = tro_revisions(store, run_id)
    doc = json.loads(path.read_bytes())
    doc["@context"] = CONTEXT
    root = doc["@graph"][0]
    for artifact in root["trov:hasComposition"]["trov:hasArtifact"] + [root["trov:hasComposition"]["trov:hasFingerprint"]]:
        del artifact["trov:hash"]["@id"]
    for performance in root["trov:hasPerformance"]:
        del performance["pe:emittedIn"], performance["pe:dataBuildId"]
    path.write_bytes(canonical_bytes(doc))
    assert verify_run(store, run_id).ok
    assert json.loads(write_tro(store, run_id).read_bytes())["@context"][0]["@base"].endswith("/v2/")
    report = verify_run(store, run_id)
    assert report.ok and report.revisions_checked == 2, report.lines()


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
    mib = 1 << 20
    data = os.urandom(8 * mib + 17)
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
    assert peak < mib  # the file is over 8 MiB; only a buffer of it is ever held


# --- PolicyEngine's schema, TRACE's tro-checks, the pe: vocabulary ------------------------------------
RELEASE_VERSION = "1.2.3+build.5"  # build metadata: its '+' cannot stand in an @base path segment
VOCABULARY = files("pipeline_assets") / "data" / "pe_vocabulary.jsonld"


def release_entry(store: LocalRunStore, run_id: str, version: str):
    """Stage and promote the run on the local backend; the registry entry."""
    stage_release(store, run_id)
    return promote(store, run_id, version, {"local": LocalPublisher(store.root)}, LocalRegistry.in_store(store.root))


@pytest.fixture(scope="module")
def written_tros(tiny_release, tmp_path_factory) -> dict[str, dict]:
    """Every kind of TRO the project writes, from a copy of the tiny run (path -> document): the run's
    TRO, its second revision, and the release TRO of its promotion."""
    source, meta, _ = tiny_release
    store = copy_store(source, tmp_path_factory.mktemp("tros"))
    write_tro(store, meta.run_id)
    release_entry(store, meta.run_id, RELEASE_VERSION)
    paths = tro_revisions(store, meta.run_id) + [store.path(f"production/{RELEASE_VERSION}/release.tro.jsonld")]
    return {str(path.relative_to(store.root)): json.loads(path.read_bytes()) for path in paths}


def schema_errors(validator: Draft202012Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


def test_every_tro_is_valid_against_policyengines_published_schema(written_tros, policyengine_tro_schema):
    """policyengine-us-data 1.115.4's schemas/trace_tro.schema.json (from its wheel) accepts the run TRO,
    its revisions and the release TRO; each performance names its data build (the run) and where the
    TRO was emitted. The schema does refuse what we wrote before (a context object, no pe:emittedIn)."""
    Draft202012Validator.check_schema(policyengine_tro_schema)
    validator = Draft202012Validator(policyengine_tro_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    assert len(written_tros) == 3
    here = "github-actions" if os.environ.get("GITHUB_ACTIONS") == "true" else "local"
    for path, doc in written_tros.items():
        assert schema_errors(validator, doc) == [], path
        root = doc["@graph"][0]
        for performance in root["trov:hasPerformance"]:
            assert (performance["pe:dataBuildId"], performance["pe:emittedIn"]) == (root["pe:runId"], here), path
            assert not any(key.startswith("pe:builtWithModel") for key in performance)  # the tiny run ran no model

    doc = next(iter(written_tros.values()))
    older = {**doc, "@context": CONTEXT}
    assert any(error.startswith("@context: ") for error in schema_errors(validator, older))
    performance, *_ = doc["@graph"][0]["trov:hasPerformance"]
    without = {**doc, "@graph": [{**doc["@graph"][0], "trov:hasPerformance": [
        {k: v for k, v in performance.items() if k != "pe:emittedIn"}]}]}
    assert any("'pe:emittedIn' is a required property" in error for error in schema_errors(validator, without))


@pytest.mark.parametrize("value, expected", [("true", "github-actions"), (None, "local"), ("", "local"), ("false", "local"),
                                             ("1", "local"), ("TRUE", "local")])
def test_emitted_in_says_github_actions_only_when_github_actions_does(tiny_release, monkeypatch, value, expected):
    store, meta, _ = tiny_release
    if value is None:
        monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    else:
        monkeypatch.setenv("GITHUB_ACTIONS", value)
    doc = build_tro(store, meta.run_id)
    assert {p["pe:emittedIn"] for p in doc["@graph"][0]["trov:hasPerformance"]} == {expected}


# tro-checks (github.com/transparency-certified/tro-checks, README and exports/tiers.json at commit
# 065be2c212ca16c8d95ad7b74e7aef6e65cad955) ships as a REPRO Docker module, not on PyPI. These are its
# expectations as its README states them: both of tier 5 LINKABLE-TRO, and those of tiers 1-4 that the
# @context, the @base, the @ids and the hash nodes bear on.
_KEYWORD_NODE = {"@context", "@graph", "@id", "@type"}
_PORTABLE_SEGMENT = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_URL_CHARACTERS = re.compile(r"([A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*")


def _walk(value, where: str = ""):
    """(where, object) of every JSON object outside the @context."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}/{index}")
    elif isinstance(value, dict):
        yield where, value
        for key, item in value.items():
            if key != "@context":
                yield from _walk(item, f"{where}/{key}")


def _base_problems(base) -> list[str]:
    """base-web-scheme and base-simple-url (tier 3, TRACE-JSON-LD)."""
    if not isinstance(base, str):
        return ["base-web-scheme: an @base is a string"]
    match = re.fullmatch(r"(https?)://([^/?#]*)(/.*)?", base)
    if match is None:
        return [f"base-web-scheme: {base!r} does not use the https or http scheme"]
    host, path = match[2], match[3] or ""
    problems = []
    if not host or "@" in host:
        problems.append(f"base-simple-url: {base!r} names no host, or carries user info")
    if re.search(r"[?#]", base) or not base.endswith("/") or not _URL_CHARACTERS.fullmatch(base):
        problems.append(f"base-simple-url: {base!r} has a query or fragment, no final /, or a character no URL holds")
    if not all(_PORTABLE_SEGMENT.fullmatch(segment) for segment in path.strip("/").split("/") if path.strip("/")):
        problems.append(f"base-simple-url: {base!r} has a path segment that is not portable")
    return problems


def tro_checks_problems(doc: dict) -> list[str]:
    """Every expectation below that `doc` does not meet, one line each."""
    problems = []
    if set(doc) != {"@context", "@graph"}:
        problems.append(f"root-context-and-graph-only: the root holds {sorted(doc)}")
    contexts = doc.get("@context")
    contexts = contexts if isinstance(contexts, list) else [contexts]
    if not all(isinstance(context, dict) for context in contexts):
        problems.append("context-well-formed / context-local: a @context entry is not an inline object")
    contexts = [context for context in contexts if isinstance(context, dict)]
    for context in contexts:
        for term, definition in context.items():
            if term.startswith("@") and term != "@base":
                problems.append(f"disallowed-context-keywords-absent: {term} in the @context")
            elif term != "@base" and not (isinstance(definition, str) and definition.endswith(("#", "/"))):
                problems.append(f"prefix-namespaces-terminated / context-aliases-absent: {term} -> {definition!r}")
        if "@base" in context:
            problems += _base_problems(context["@base"])
    if not any("@base" in context for context in contexts):
        problems.append("base-declared: the @context declares no @base")
    if not isinstance(doc.get("@graph"), list) or not all(isinstance(node, dict) for node in doc["@graph"]):
        problems.append("graph-well-formed: the @graph does not hold objects")
    for where, node in _walk(doc.get("@graph", []), "@graph"):
        if node.keys() & {"@value", "@list", "@set"}:
            continue
        if where != "@graph" and "@graph" in node:
            problems.append(f"graph-at-root-only: {where}")
        if extra := {key for key in node if key.startswith("@")} - _KEYWORD_NODE:
            problems.append(f"disallowed-node-keywords-absent: {where} holds {sorted(extra)}")
        if "@id" not in node:
            problems.append(f"node-ids-present: {where} carries no @id")
            continue
        node_id, types = node["@id"], node.get("@type", [])
        if not isinstance(node_id, str) or not all(isinstance(t, str) for t in (types if isinstance(types, list) else [types])):
            problems.append(f"ids-and-types-strings: {where}")
        elif not re.match(r"[^/?#]*:", node_id) and (node_id.startswith(("/", "@")) or re.search(r"[?#]", node_id)
                                                       or re.search(r"(^|/)\.\.?(/|$)", node_id)):
            problems.append(f"relative-ids-plain: {where} has @id {node_id!r}")
        if "trov:hash" in node:
            digest = node["trov:hash"]
            if digest.get("trov:hashAlgorithm") != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest.get("trov:hashValue", "")):
                problems.append(f"hashes-well-formed: {where}/trov:hash")
    return problems


def test_every_tro_meets_tro_checks_up_to_linkable_tro(written_tros):
    """LINKABLE-TRO (tier 5): an @base in the @context, an @id on every node, the hash nodes included;
    and each revision and release resolves against its own @base, so their @ids cannot collide."""
    for path, doc in written_tros.items():
        assert tro_checks_problems(doc) == [], path
    bases = [doc["@context"][0]["@base"] for doc in written_tros.values()]
    run_id = next(iter(written_tros.values()))["@graph"][0]["pe:runId"]
    assert bases == [f"{DEFAULT_TRO_BASE}runs/{run_id}/v1/", f"{DEFAULT_TRO_BASE}runs/{run_id}/v2/",
                     f"{DEFAULT_TRO_BASE}releases/1.2.3_build.5/"]

    older = json.loads(json.dumps(next(iter(written_tros.values()))))  # as written before: no @base, unnamed hashes
    del older["@context"][0]["@base"]
    del older["@graph"][0]["trov:hasComposition"]["trov:hasArtifact"][0]["trov:hash"]["@id"]
    assert tro_checks_problems(older) == [
        "base-declared: the @context declares no @base",
        "node-ids-present: @graph/0/trov:hasComposition/trov:hasArtifact/0/trov:hash carries no @id",
    ]


def test_the_tro_base_comes_from_configuration(tiny_release, monkeypatch):
    store, meta, _ = tiny_release
    monkeypatch.setenv(TRO_BASE_VARIABLE, "https://data.policyengine.org/us-data/")
    assert tro_base() == "https://data.policyengine.org/us-data/"
    assert build_tro(store, meta.run_id, revision=3)["@context"][0]["@base"] == \
        f"https://data.policyengine.org/us-data/runs/{meta.run_id}/v3/"
    release = build_release_tro(store, meta.run_id, "2.0.0-rc.1", {TRO_NAME: "0" * 64}, TRO_NAME)
    assert release["@context"][0]["@base"] == "https://data.policyengine.org/us-data/releases/2.0.0-rc.1/"
    monkeypatch.setenv(TRO_BASE_VARIABLE, "")  # empty is unset
    assert tro_base() == DEFAULT_TRO_BASE == run_tro_base(meta.run_id, 1).removesuffix(f"runs/{meta.run_id}/v1/")


BAD_TRO_BASES = ["policyengine.org/usdata/", "urn:policyengine:usdata", "ftp://policyengine.org/", "https://policyengine.org/usdata",
                 "https://ops:secret@policyengine.org/", "https://policyengine.org/a/../", "https://policyengine.org/?q=1/",
                 "https://policyengine.org/#x/", "https://policyengine.org/a b/", "https:///usdata/", "https://policyengine.org/-x/"]


@pytest.mark.parametrize("bad", BAD_TRO_BASES)
def test_a_bad_tro_base_is_refused_in_one_line_before_a_run_starts(tmp_path, monkeypatch, bad):
    monkeypatch.setenv(TRO_BASE_VARIABLE, bad)
    with pytest.raises(TroConfigError) as refused:
        tro_base()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{TRO_BASE_VARIABLE}={bad!r}: expected an absolute http(s) IRI")
    store = LocalRunStore(tmp_path / "store")
    code = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
    with pytest.raises(TroConfigError):
        run_release(store, config_for_scale("tiny"), code, running_sha=PINNED_SHA)
    assert not store.path("runs").exists()


def test_the_cli_refuses_a_bad_tro_base_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv(TRO_BASE_VARIABLE, "policyengine.org")
    for argv in (["run", "--scale", "tiny"], ["promote", "0.1.0_a1b2c3d4_20260318_143022", "--version", "1.0.0"]):
        assert main(argv) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"usdata-pipeline: error: {TRO_BASE_VARIABLE}='policyengine.org': expected an absolute http(s) IRI")
    assert not (tmp_path / "store").exists()


def _with_model(store: LocalRunStore, run_id: str, step: str, model: ModelPackage) -> None:
    """Record in a step's record that it ran `model` (the hook the model's step uses)."""
    path = store.path(store.run_key(run_id, record_key(step)))
    record = json.loads(path.read_bytes())
    record["environment"][MODEL_PACKAGE] = model.model_dump(exclude_none=True)
    path.write_text(json.dumps(record))


def _fresh_tro(store: LocalRunStore, run_id: str) -> dict:
    """The run's TRO written again from its records (the first revision, as if they had always been so)."""
    for path in tro_revisions(store, run_id):
        path.unlink()
    return json.loads(write_tro(store, run_id).read_bytes())


def test_a_step_that_ran_the_model_names_it_and_the_release_carries_it_on(tiny_copy, policyengine_tro_schema,
                                                                          policyengine_read_registry):
    store, meta = tiny_copy
    model = ModelPackage(name="policyengine-us", version="1.500.0", locked_version="1.500.0", git_sha="f" * 40)
    _with_model(store, meta.run_id, STEP_ORDER[-1], model)
    doc = _fresh_tro(store, meta.run_id)
    *others, last = doc["@graph"][0]["trov:hasPerformance"]
    assert (last["pe:builtWithModelPackageName"], last["pe:builtWithModelVersion"], last["pe:builtWithModelGitSha"]) == \
        ("policyengine-us", "1.500.0", "f" * 40)
    assert not any(key.startswith("pe:builtWithModel") for performance in others for key in performance)
    validator = Draft202012Validator(policyengine_tro_schema)
    assert schema_errors(validator, doc) == []

    entry = release_entry(store, meta.run_id, "3.0.0")
    release = json.loads(store.read_bytes("production/3.0.0/release.tro.jsonld"))
    [publication] = release["@graph"][0]["trov:hasPerformance"]
    assert (publication["pe:builtWithModelPackageName"], publication["pe:builtWithModelVersion"]) == ("policyengine-us", "1.500.0")
    assert schema_errors(validator, release) == [] and tro_checks_problems(release) == []
    assert entry.policyengine_us.model_dump() == {"version": "1.500.0", "locked_version": "1.500.0", "git_commit": "f" * 40}
    [read] = policyengine_read_registry(store.read_bytes("version_manifest.json"))["versions"]
    assert read["policyengine_us"]["version"] == "1.500.0" and read["policyengine_us"]["git_commit"] == "f" * 40


def test_a_run_that_ran_two_models_is_not_promoted(tiny_copy):
    store, meta = tiny_copy
    _with_model(store, meta.run_id, STEP_ORDER[-1], ModelPackage(name="policyengine-us", version="1.500.0"))
    _with_model(store, meta.run_id, STEP_ORDER[-2], ModelPackage(name="policyengine-us", version="1.499.0"))
    _fresh_tro(store, meta.run_id)
    stage_release(store, meta.run_id)
    with pytest.raises(PromotionRefused, match=rf"ran two models: policyengine-us 1.499.0 in step {STEP_ORDER[-2]}, "
                                               rf"policyengine-us 1.500.0 in step {STEP_ORDER[-1]}"):
        promote(store, meta.run_id, "3.0.0", {"local": LocalPublisher(store.root)}, LocalRegistry.in_store(store.root))
    assert not store.path("version_manifest.json").exists() and not store.path("production").exists()


def _unique_members(pairs: list[tuple]) -> dict:
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), f"a member named twice in {names}"
    return dict(pairs)


def _pe_terms(value) -> set[str]:
    """Every pe: name a JSON-LD document uses: property keys, and @id / @type values."""
    found = set()
    for _, node in _walk(value):
        found |= {key for key in node if key.startswith("pe:")}
        for keyword in ("@id", "@type"):
            named = node.get(keyword, [])
            found |= {name for name in (named if isinstance(named, list) else [named]) if name.startswith("pe:")}
    return found


def _model_pe_terms() -> set[str]:
    """The pe: aliases of every field of the TRO's records: the terms any TRO may emit."""
    models, found = [Node], set()
    while models:
        model = models.pop()
        models += model.__subclasses__()
        found |= {field.alias for field in model.model_fields.values() if field.alias and field.alias.startswith("pe:")}
    return found


def test_the_vocabulary_defines_every_pe_term_the_tros_use(written_tros):
    """pipeline_assets/data/pe_vocabulary.jsonld parses, gives every term a label, a comment and a range,
    marks which are proposed for TROV, defines every pe: name the TROs written by a tiny run use and
    every one the TRO's records may write (and no other), and ships in the package."""
    vocabulary = json.loads(VOCABULARY.read_text(), object_pairs_hook=_unique_members)
    assert set(vocabulary) == {"@context", "@graph"} and vocabulary["@context"]["pe"] == CONTEXT["pe"]
    terms = {node["@id"]: node for node in vocabulary["@graph"]}
    properties = {name: node for name, node in terms.items() if node["@type"] in ("rdf:Property", "owl:AnnotationProperty")}
    for name, node in terms.items():
        assert node["rdfs:label"] and node["rdfs:comment"], name
    for name, node in properties.items():
        assert node["rdfs:range"]["@id"] in ("xsd:string", "xsd:boolean"), name
        assert name == "pe:proposedForTrov" or isinstance(node["pe:proposedForTrov"], bool), name

    emitted = set().union(*map(_pe_terms, written_tros.values()))
    assert emitted <= terms.keys(), emitted - terms.keys()
    assert {"pe:emittedIn", "pe:dataBuildId", "pe:pythonVersion", "pe:usdata-pipeline"} <= emitted
    may_emit = _model_pe_terms()
    assert {"pe:builtWithModelPackageName", "pe:builtWithModelVersion", "pe:gpuModel"} <= may_emit
    assert set(properties) == may_emit | {"pe:proposedForTrov"}
    general = {"pe:containerImageDigest", "pe:pythonVersion", "pe:libraryVersions", "pe:cloudRegion", "pe:computePool",
               "pe:instanceId", "pe:gpuModel", "pe:previousRevisionSha256"}
    assert general <= {name for name, node in properties.items() if node.get("pe:proposedForTrov") is True}
    assert not properties["pe:runId"]["pe:proposedForTrov"] and not properties["pe:builtWithModelVersion"]["pe:proposedForTrov"]

    package_data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(Path("data", VOCABULARY.name).match(pattern) for pattern in package_data["pipeline_assets"])
