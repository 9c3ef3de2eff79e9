"""The tamper suite: each way of changing a run's or a release's bytes behind its records' back is
caught by verify and refused by reuse, promotion and rollback, and a raw input is known by the bytes
a step read, not by what a sums file says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline_assets import stages, step_graph
from pipeline_assets.cli import main
from pipeline_assets.driver import run_release
from pipeline_assets.promotion import PromotionRefused, promote, rollback, stage_release
from pipeline_assets.reuse import read_record, record_key
from pipeline_assets.stages import RawInputChanged
from pipeline_assets.steps import geography
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import INPUTS_ID, SIGNATURE_SUFFIX, GpgSigner, canonical_bytes, located, read_tro, tro_revisions, verify_run, write_tro
from resources.files import sha256_file
from resources.git import CodeState
from resources.publishers import LocalPublisher
from resources.registry import LocalRegistry
from resources.run_store import LocalRunStore, RunStatus
from tests.conftest import PINNED_SHA, copy_store

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)
CONFIG = config_for_scale("tiny")
KEY = "signer@example.org"
OTHER_KEY = "forger@example.org"
TAMPERED_STEP_FILES = {"policy_data_db": stages.ARTIFACTS["policy_data_db"], "state_weights": stages.ARTIFACTS["state_weights"]}


# --- which raw inputs each step opens, seen by an audit hook (installed once: hooks stay) ------------
_watch: dict = {"step": None, "opened": None}


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watch["opened"] is not None and _watch["step"] and isinstance(args[0], (str, os.PathLike)):
        path = Path(os.fsdecode(args[0]))
        if path.parent == geography.raw_inputs_dir():
            _watch["opened"].setdefault(_watch["step"], set()).add(path.name)


sys.addaudithook(_audit)


def watching_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Record, per step, the raw input files it opens in this process (step -> names)."""
    execute_step, execute_areas = stages.execute_step, stages.execute_areas

    def step(store, run_id, name, *args, **kwargs):
        _watch["step"] = name
        return execute_step(store, run_id, name, *args, **kwargs)

    def areas(*args, **kwargs):
        _watch["step"] = "local_areas"
        return execute_areas(*args, **kwargs)

    monkeypatch.setattr(stages, "execute_step", step)
    monkeypatch.setattr(stages, "execute_areas", areas)
    _watch["opened"] = {}
    return _watch["opened"]


def make_key(home: str, email: str) -> None:
    subprocess.run(["gpg", "--homedir", home, "--batch", "--passphrase", "", "--quick-gen-key", f"test <{email}>",
                    "default", "default", "never"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def keyring():
    """A throwaway keyring with the pipeline's signing key and a forger's, configured for the module."""
    home = tempfile.mkdtemp(prefix="gnupg-")  # short: gpg-agent's socket path has a length limit
    make_key(home, KEY)
    make_key(home, OTHER_KEY)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GNUPGHOME", home)
        env.setenv("PIPELINE_GPG_KEY", KEY)
        yield home
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def sealed(keyring, tmp_path_factory):
    """(store, run_id, raw inputs opened per step): one signed, completed and staged tiny run,
    computed from scratch while watching which raw input files each step opened."""
    store = LocalRunStore(tmp_path_factory.mktemp("sealed"))
    with pytest.MonkeyPatch.context() as patch:
        opened = watching_steps(patch)
        meta, _ = run_release(store, CONFIG, CODE, running_sha=PINNED_SHA)
        _watch.update(step=None, opened=None)
    stage_release(store, meta.run_id)
    return store, meta.run_id, opened


@pytest.fixture(scope="module")
def relent(sealed, tmp_path_factory):
    """(store, the sealed run, a second run that reused every step of it, signed and staged): a
    tampered second run has a sound, older lender behind it, so the next run takes from that instead
    of computing every step again, while the tampered run, the newer, is still the first one asked."""
    source, first, _ = sealed
    store = copy_store(source, tmp_path_factory.mktemp("relent"))
    meta, _ = run_release(store, CONFIG, CODE, running_sha=PINNED_SHA)
    stage_release(store, meta.run_id)
    return store, first, meta.run_id


@pytest.fixture(scope="module")
def released(sealed, tmp_path_factory):
    """(store, run_id): a copy of the sealed run promoted as 1.0.0 to the local production/."""
    source, run_id, _ = sealed
    store = copy_store(source, tmp_path_factory.mktemp("released"))
    promote(store, run_id, "1.0.0", *local_backends(store))
    return store, run_id


def local_backends(store: LocalRunStore):
    return {"local": LocalPublisher(store.root)}, LocalRegistry(store.root / "version_manifest.json")


def run_file(store: LocalRunStore, run_id: str, rel: str) -> Path:
    return store.path(store.run_key(run_id, rel))


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def cli(monkeypatch, capsys, store: LocalRunStore, *argv: str) -> tuple[int, list[str], list[str]]:
    """(exit status, stdout lines, stderr lines) of the CLI against `store`."""
    monkeypatch.setenv("PIPELINE_STORE", str(store.root))
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


# --- the tamper classes of a sealed run --------------------------------------------------------------
def flip_artifact(store, run_id, keyring):
    flip_byte(run_file(store, run_id, TAMPERED_STEP_FILES["policy_data_db"]))


def replace_weights_and_their_record(store, run_id, keyring):
    """Other weights, and the step record's sha256 updated to match them."""
    rel = TAMPERED_STEP_FILES["state_weights"]
    path = run_file(store, run_id, rel)
    np.save(path, np.load(path) * 2)
    record = read_record(store, run_id, "state_weights")
    record.outputs[rel] = sha256_file(path)
    run_file(store, run_id, record_key("state_weights")).write_text(record.model_dump_json(indent=2))


def edit_tro_hash(store, run_id, keyring):
    path = tro_revisions(store, run_id)[0]
    doc = json.loads(path.read_bytes())
    doc["@graph"][0]["trov:hasComposition"]["trov:hasArtifact"][-1]["trov:hash"]["trov:hashValue"] = "0" * 64
    path.write_bytes(canonical_bytes(doc))


def edit_tro_text(store, run_id, keyring):
    """An edit the composition fingerprint does not cover: only the signature can catch it."""
    path = tro_revisions(store, run_id)[0]
    doc = json.loads(path.read_bytes())
    doc["@graph"][0]["schema:description"] = "another run"
    path.write_bytes(canonical_bytes(doc))


def forge_unsigned_revision(store, run_id, keyring):
    write_tro(store, run_id)  # a v2 beside the signed v1, with no signature


def remove_signature(store, run_id, keyring):
    path = tro_revisions(store, run_id)[0]
    path.with_name(path.name + SIGNATURE_SUFFIX).unlink()


def signature_of_other_bytes(store, run_id, keyring):
    path = tro_revisions(store, run_id)[0]
    path.with_name(path.name + SIGNATURE_SUFFIX).write_bytes(GpgSigner(KEY, keyring).sign(b"other bytes"))


def signature_by_another_key(store, run_id, keyring):
    path = tro_revisions(store, run_id)[0]
    path.with_name(path.name + SIGNATURE_SUFFIX).write_bytes(GpgSigner(OTHER_KEY, keyring).sign(path.read_bytes()))


def flip_area_file(store, run_id, keyring):
    flip_byte(run_file(store, run_id, "h5s/national/US.h5"))


def edit_earlier_revision(store, run_id, keyring):
    """A signed v2 beside v1, then v1 edited: the latest revision alone would still verify."""
    write_tro(store, run_id, GpgSigner(KEY, keyring))
    edit_tro_hash(store, run_id, keyring)


def swap_revisions(store, run_id, keyring):
    """Two signed revisions exchanged, each with its own signature: only the chain's order tells."""
    write_tro(store, run_id, GpgSigner(KEY, keyring))
    first, second = tro_revisions(store, run_id)
    for suffix in ("", SIGNATURE_SUFFIX):
        a, b = first.with_name(first.name + suffix), second.with_name(second.name + suffix)
        data = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(data)


RUN_TAMPERS = {
    # class: (tamper, a fragment of verify's line, the steps (or step:part) a next run must not reuse
    # from the tampered run (None: none at all))
    "artifact byte flipped": (flip_artifact, "artifacts/policy_data.db: expected sha256", ("policy_data_db",)),
    "area file flipped": (flip_area_file, "h5s/national/US.h5: expected sha256", ("local_areas:national",)),
    "earlier revision edited": (edit_earlier_revision, "trace.tro.jsonld: fingerprint", None),
    "revisions swapped": (swap_revisions, "the chain was re-ordered or forged", None),
    "weights and record replaced": (replace_weights_and_their_record, "artifacts/state_weights.npy: expected sha256",
                                    ("state_weights",)),
    "TRO hash edited": (edit_tro_hash, "the TRO was edited", None),
    "TRO text edited": (edit_tro_text, "trace.tro.jsonld: signature bad", None),
    "unsigned v2 forged": (forge_unsigned_revision, "trace.tro.v2.jsonld: signature missing", None),
    "signature removed": (remove_signature, "trace.tro.jsonld: signature missing", None),
    "signature of other bytes": (signature_of_other_bytes, "trace.tro.jsonld: signature bad", None),
    "signature by another key": (signature_by_another_key, "trace.tro.jsonld: signature other key", None),
}


@pytest.mark.reliability("tamper")
@pytest.mark.parametrize("name", RUN_TAMPERS)
def test_a_tampered_run_fails_verify_and_is_neither_reused_nor_promoted(name, relent, keyring, tmp_path, monkeypatch, capsys):
    source, _, run_id = relent
    store = copy_store(source, tmp_path)
    tamper, fragment, not_reused = RUN_TAMPERS[name]
    tamper(store, run_id, keyring)

    status, out, _ = cli(monkeypatch, capsys, store, "verify", run_id)
    assert status == 1 and out and all(line.startswith(f"FAILED {run_id}: ") for line in out)
    assert any(fragment in line for line in out), out

    with pytest.raises(PromotionRefused, match=f"run {run_id} does not verify against its TRO"):
        promote(store, run_id, "1.0.0", *local_backends(store))
    assert not store.path("production").exists() and not store.path("version_manifest.json").exists()

    meta, _ = run_release(store, CONFIG, CODE, running_sha=PINNED_SHA)
    for refused in not_reused or step_graph.STEP_ORDER:
        step, _, part = refused.partition(":")
        record = read_record(store, meta.run_id, step)
        if part:
            assert record.reused_parts.get(part) != run_id, refused
        else:
            assert record.reused_from != run_id and run_id not in record.reused_parts.values(), refused
    if not_reused is None:
        assert all(timing.reused_from != run_id and run_id not in timing.reused_parts.values()
                   for timing in meta.step_timings.values())
    assert verify_run(store, meta.run_id).ok  # what the next run made instead is sound


def assert_lent_every_step(store: LocalRunStore, run_id: str, lender: str) -> None:
    for step in [step for step, spec in stages.STEPS.items() if spec.config]:  # the reusable steps
        assert read_record(store, run_id, step).reused_from == lender, step
    assert verify_run(store, run_id).ok


def test_an_untampered_run_lends_every_step(relent, tmp_path):
    """The control of the classes above: the second run reused every reusable step of the sealed
    one, and the same next run reuses every step of the second, the newest."""
    source, first, run_id = relent
    assert_lent_every_step(source, run_id, first)
    store = copy_store(source, tmp_path)
    meta, _ = run_release(store, CONFIG, CODE, running_sha=PINNED_SHA)
    assert_lent_every_step(store, meta.run_id, run_id)


# --- raw inputs: declared, hashed as read, in the reuse key --------------------------------------------
def test_every_raw_input_a_step_opens_is_declared(sealed):
    _, _, opened = sealed
    assert {"policy_data_db", "source_datasets", "calibration_package"} <= opened.keys()
    for step, names in opened.items():
        assert names <= set(stages.STEPS[step].raw_inputs), step
    packaged = {p.name for p in geography.raw_inputs_dir().iterdir()} - {"SHA256SUMS"}
    assert {name for spec in stages.STEPS.values() for name in spec.raw_inputs} == packaged


def test_the_tro_lists_the_raw_input_bytes_the_steps_read(sealed):
    store, run_id, _ = sealed
    read = {}
    for step in step_graph.STEP_ORDER:
        declared = stages.STEPS[step].raw_inputs
        record = read_record(store, run_id, step)
        assert record.raw_inputs == {f"raw_inputs/{name}": sha256_file(geography.raw_input(name)) for name in declared}
        read |= record.raw_inputs
    assert located(read_tro(tro_revisions(store, run_id)[0]), INPUTS_ID) == read


@pytest.fixture
def raw_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the packaged raw inputs, which the package reads instead of its own."""
    copy = tmp_path / "package" / geography.RAW_INPUTS_PREFIX
    shutil.copytree(geography.raw_inputs_dir(), copy)
    monkeypatch.setattr(geography, "PACKAGED_RAW_INPUTS", copy)
    return copy


def change_snap_households(raw_dir: Path) -> str:
    """Change one state's SNAP households and commit it, SHA256SUMS updated; return its new sha256."""
    path = raw_dir / "snap_state.csv"
    header, first, *rest = path.read_text().splitlines()
    geo, households, cost = first.split(",")
    path.write_text("\n".join([header, f"{geo},{float(households) + 1},{cost}", *rest]) + "\n")
    digest = sha256_file(path)
    sums = raw_dir / "SHA256SUMS"
    sums.write_text("".join(f"{digest if name == path.name else old}  {name}\n"
                            for old, name in (line.split() for line in sums.read_text().splitlines() if line)))
    return digest


@pytest.mark.reliability("tamper")
def test_a_changed_raw_input_is_computed_again_and_the_tro_has_its_new_hash(sealed, raw_copy, tmp_path):
    source, run_id, _ = sealed
    store = copy_store(source, tmp_path)
    digest = change_snap_households(raw_copy)

    meta, _ = run_release(store, CONFIG, CODE, running_sha=PINNED_SHA)
    database = read_record(store, meta.run_id, "policy_data_db")
    assert database.reuse == "computed" and database.raw_inputs["raw_inputs/snap_state.csv"] == digest
    assert read_record(store, meta.run_id, "source_datasets").reused_from == run_id  # it does not read that file
    assert located(read_tro(tro_revisions(store, meta.run_id)[0]), INPUTS_ID)["raw_inputs/snap_state.csv"] == digest
    assert verify_run(store, meta.run_id).ok
    # the earlier run's TRO still states the bytes it read: they are no longer there
    report = verify_run(store, run_id)
    assert [m.path for m in report.mismatches] == ["raw_inputs/snap_state.csv"]
    with pytest.raises(PromotionRefused, match="raw_inputs/snap_state.csv"):
        promote(store, run_id, "1.0.0", *local_backends(store))


@pytest.mark.reliability("tamper")
def test_a_raw_input_changed_under_a_step_fails_it_in_one_line(raw_copy, tmp_path, monkeypatch):
    store = LocalRunStore(tmp_path / "store")
    build = stages.STEPS["policy_data_db"].run

    def build_then_change(*args):
        result = build(*args)
        change_snap_households(raw_copy)
        return result

    monkeypatch.setitem(stages.STEPS, "policy_data_db", replace(stages.STEPS["policy_data_db"], run=build_then_change))
    with pytest.raises(RawInputChanged, match="raw input raw_inputs/snap_state.csv changed while step policy_data_db read it"):
        run_release(store, CONFIG, CODE, running_sha=PINNED_SHA)
    [meta] = store.list_runs()
    assert meta.status is RunStatus.failed and meta.error.step == "policy_data_db"
    assert "snap_state.csv" in meta.error.message and "\n" not in meta.error.message
    assert read_record(store, meta.run_id, "policy_data_db") is None  # no record claims the step's bytes


# --- releases: the production copy against its release TRO ---------------------------------------------
def production(store: LocalRunStore, version: str) -> Path:
    return store.root / "production" / version


def release_files(store: LocalRunStore, version: str) -> dict[str, str]:
    root = production(store, version)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def flip_production_file(store):
    flip_byte(production(store, "1.0.0") / "states" / "AL.h5")


def leave_temporary_file(store):
    """What a promotion killed mid-copy leaves beside a file (publishers' _place naming)."""
    (production(store, "1.0.0") / "states" / ".AL.h5.k2j4x9.tmp").write_bytes(b"half a file")


def add_stray_file(store):
    (production(store, "1.0.0") / "states" / "XX.h5").write_bytes(b"not part of the release")


def remove_production_file(store):
    (production(store, "1.0.0") / "districts" / "AL-01.h5").unlink()


def edit_release_tro(store):
    path = store.path("releases/1.0.0/release.tro.jsonld")
    doc = json.loads(path.read_bytes())
    doc["@graph"][0]["trov:hasComposition"]["trov:hasArtifact"][0]["trov:hash"]["trov:hashValue"] = "0" * 64
    path.write_bytes(canonical_bytes(doc))


def replace_published_run_tro(store):
    path = production(store, "1.0.0") / "trace.tro.jsonld"
    path.write_bytes(path.read_bytes().replace(b"usdata-pipeline run", b"usdata-pipeline rum"))


RELEASE_TAMPERS = {
    "production file flipped": (flip_production_file, "states/AL.h5: expected sha256"),
    "temporary file left": (leave_temporary_file, "1.0.0/states/.AL.h5.k2j4x9.tmp: a file the release TRO does not list"),
    "stray file added": (add_stray_file, "1.0.0/states/XX.h5: a file the release TRO does not list"),
    "production file removed": (remove_production_file, "districts/AL-01.h5: expected sha256"),
    "release TRO edited": (edit_release_tro, "the TRO was edited"),
    "published run TRO replaced": (replace_published_run_tro, "trace.tro.jsonld: expected sha256"),
}


@pytest.mark.reliability("tamper")
@pytest.mark.parametrize("name", RELEASE_TAMPERS)
def test_a_tampered_production_copy_fails_verify_release_and_is_never_republished(
    name, released, tmp_path, monkeypatch, capsys
):
    source, _ = released
    store = copy_store(source, tmp_path)
    tamper, fragment = RELEASE_TAMPERS[name]
    tamper(store)
    registry_before = store.path("version_manifest.json").read_bytes()

    status, out, _ = cli(monkeypatch, capsys, store, "verify", "--release", "1.0.0")
    assert status == 1 and out and all(line.startswith("FAILED release 1.0.0: ") for line in out)
    assert any(fragment in line for line in out), out

    with pytest.raises(PromotionRefused, match="cannot roll back to 1.0.0: its production copy does not verify") as refused:
        rollback(store, "1.0.0", "1.0.1", *local_backends(store), store.root / "production")
    assert "\n" not in str(refused.value)
    assert not production(store, "1.0.1").exists()
    assert store.path("version_manifest.json").read_bytes() == registry_before


def test_a_release_verifies_and_rolls_back_to_exactly_the_files_its_tro_lists(released, tmp_path, monkeypatch, capsys):
    source, run_id = released
    store = copy_store(source, tmp_path)
    status, out, _ = cli(monkeypatch, capsys, store, "verify", "--release", "1.0.0")
    assert status == 0 and out[0].startswith("OK release 1.0.0: ")
    entry = rollback(store, "1.0.0", "1.0.1", *local_backends(store), store.root / "production")
    assert (entry.roll_back_version, entry.run_id) == ("1.0.0", run_id)
    assert release_files(store, "1.0.1") == release_files(store, "1.0.0")
    status, out, _ = cli(monkeypatch, capsys, store, "verify", "--release", "1.0.1")
    assert status == 0, out


def test_staging_never_stages_a_temporary_file(sealed, tmp_path):
    source, run_id, _ = sealed
    store = copy_store(source, tmp_path)
    shutil.rmtree(store.path(f"staging/{run_id}"))
    (run_file(store, run_id, "h5s/states") / ".AL.h5.k2j4x9.tmp").write_bytes(b"half a file")
    manifest = stage_release(store, run_id)
    staged = store.path(f"staging/{run_id}")
    assert not [p for p in staged.rglob("*") if p.name.endswith(".tmp")]
    assert "states/AL.h5" in manifest.files and not any(rel.endswith(".tmp") for rel in manifest.files)


@pytest.mark.reliability("bad_input")
@pytest.mark.parametrize("argv, fragment", [
    (["verify"], "a run_id or --release VERSION"),
    (["verify", "0.1.0_a1b2c3d4_20260318_143022", "--release", "1.0.0"], "a run_id or --release VERSION"),
    (["verify", "--release", "1.0"], "invalid version '1.0'"),
    (["verify", "--release", "9.9.9"], "--release 9.9.9: not a registered version"),
])
def test_verify_refuses_bad_arguments_in_one_line(argv, fragment, released, tmp_path, monkeypatch, capsys):
    source, _ = released
    store = copy_store(source, tmp_path)
    status, out, err = cli(monkeypatch, capsys, store, *argv)
    assert status == 2 and out == [] and len(err) == 1 and fragment in err[0], err


def test_a_publish_interrupted_mid_copy_leaves_nothing_in_the_release(sealed, tmp_path, monkeypatch):
    """The local publisher copies outside the release folder and links a file in only when whole, so
    a promotion killed mid-copy leaves no temporary file in production/{version}/."""
    import resources.publishers as publishers

    source, run_id, _ = sealed
    store = copy_store(source, tmp_path)
    copies = []

    def interrupted_copy(src, dst):
        copies.append(Path(dst))
        raise KeyboardInterrupt

    monkeypatch.setattr(publishers.shutil, "copyfile", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        promote(store, run_id, "1.0.0", *local_backends(store))
    [partial] = copies
    assert not partial.is_relative_to(production(store, "1.0.0"))
    assert not [p for p in production(store, "1.0.0").rglob("*") if p.is_file()]
