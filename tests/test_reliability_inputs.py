"""Reliability suite, bad input: every command and every variable the pipeline reads, given what a
careless operator or a hostile environment gives it.

Each case must exit 2 with exactly one line on stderr naming the bad value, before any work starts:
the store, the Dagster home and everything else under the world's root are byte-for-byte unchanged
(a home that did not exist still does not). Unreadable records (a meta.json truncated, not JSON,
with an unknown status or field; a step record; the registry) affect only what they belong to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline_assets.cli import ENVIRONMENT, main
from pipeline_assets.driver import start_run
from pipeline_assets.promotion import clean, promote, stage_release
from pipeline_assets.reuse import find_reusable
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import SealedRunLender
from resources.git import CodeState
from resources.ledger import LEDGER_VARIABLE
from resources.lineage import TRANSPORT_VARIABLE, URL_VARIABLE
from resources.publishers import LocalPublisher
from resources.registry import LocalRegistry
from resources.run_store import LocalRunStore, RunStatus
from tests.conftest import PINNED_SHA

CODE = CodeState(PINNED_SHA, "main", False, None)
SECRET = "tok3nV4lue"
NOT_THE_INSTALLED_CODE = "f" * 40  # a `run` that got past its checks would be refused, never started
METRIC = "state_weights.final_mean_rel_abs_error"
# The bad meta.json kinds, by what each holds (written over a copy of a good one in `world`).
BAD_META = {"truncated": "0.1.0_a1b2c3d4_20250101_000001", "not_json": "0.1.0_a1b2c3d4_20250101_000002",
            "unknown_status": "0.1.0_a1b2c3d4_20250101_000003", "unknown_field": "0.1.0_a1b2c3d4_20250101_000004"}
BAD_STEP_RECORD = "0.1.0_a1b2c3d4_20250101_000005"


def _past_run(store: LocalRunStore, minutes_ago: int, status: RunStatus | None = None, **fields) -> str:
    """A run record only (no files), created `minutes_ago`, moved on to `status`, with `fields` set."""
    started = datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)
    run_id = start_run(store, config_for_scale("tiny"), CODE, started).run_id

    def change(meta) -> None:
        if status is not None:
            meta.transition(status)
        for name, value in fields.items():
            setattr(meta, name, value)

    store.update_meta(run_id, change)
    return run_id


def _lock(path: Path) -> bool:
    """Make `path` a directory nobody can write to, root included (chattr +i; chmod for others)."""
    path.mkdir(parents=True)
    (path / "inside").write_text("x")
    locked = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0 or os.geteuid() != 0
    if os.geteuid() != 0:
        path.chmod(0o555)
    try:
        (path / "probe").write_text("x")
    except OSError:
        return locked
    (path / "probe").unlink()
    return False


@pytest.fixture(scope="module")
def world(tiny_release, tmp_path_factory):
    """Every store and path the cases point at, under one root that each case snapshots."""
    root = tmp_path_factory.mktemp("world")
    source, meta, _ = tiny_release
    good = LocalRunStore(root / "store")
    shutil.copytree(source.root, good.root)
    promoted = meta.run_id
    stage_release(good, promoted)
    promote(good, promoted, "1.0.0", {"local": LocalPublisher(good.root)}, LocalRegistry.in_store(good.root))
    runs = {
        "promoted": promoted,
        "bare": _past_run(good, 30, RunStatus.completed),  # completed, but no files: does not verify
        "dirty": _past_run(good, 29, RunStatus.completed, dirty=True, diff_sha256="d" * 64),
        "failed": _past_run(good, 28, RunStatus.failed),
        "running": _past_run(good, 27),
    }

    broken = LocalRunStore(root / "broken")  # one good run's records, and unreadable ones beside it
    for rel in ["meta.json", "trace.tro.jsonld", *(f"steps/{p.name}" for p in good.path(f"runs/{promoted}/steps").glob("*.json"))]:
        target = broken.path(f"runs/{promoted}/{rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(good.path(f"runs/{promoted}/{rel}"), target)
    shutil.copyfile(good.path("version_manifest.json"), broken.path("version_manifest.json"))
    text = good.read_bytes(good.meta_key(promoted)).decode()
    bad = {"truncated": text[: len(text) // 2], "not_json": "{this is not json",
           "unknown_status": text.replace('"status": "promoted"', '"status": "paused"'),
           "unknown_field": text.replace('"status": "promoted"', '"status": "promoted", "colour": "blue"')}
    for kind, run_id in BAD_META.items():
        broken.path(f"runs/{run_id}").mkdir(parents=True)
        broken.path(broken.meta_key(run_id)).write_text(bad[kind].replace(promoted, run_id))
    step_broken = _past_run(broken, 1, RunStatus.completed)
    shutil.move(broken.path(f"runs/{step_broken}"), broken.path(f"runs/{BAD_STEP_RECORD}"))
    broken.update_meta(BAD_STEP_RECORD, lambda m: setattr(m, "run_id", BAD_STEP_RECORD))
    broken.path(f"runs/{BAD_STEP_RECORD}/steps").mkdir()
    broken.path(f"runs/{BAD_STEP_RECORD}/steps/policy_data_db.json").write_text('{"step": "policy_data_db"')

    bad_registry = LocalRunStore(root / "bad_registry")
    runs["bad_registry_run"] = _past_run(bad_registry, 26, RunStatus.completed)
    bad_registry.path("version_manifest.json").write_text('{"current": "1.0.0", "versions": [')
    bad_registry.path("production/1.0.0").mkdir(parents=True)
    no_registry = LocalRunStore(root / "no_registry")  # production/ holds a version, the registry is gone
    _past_run(no_registry, 25, RunStatus.failed)
    no_registry.path("production/1.0.0").mkdir(parents=True)

    (root / "a_file").write_text("not a directory")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a git repository")
    for name, settings in {"yaml_broken": "storage: [unclosed\n", "yaml_list": "- telemetry\n- storage\n"}.items():
        (root / name).mkdir()
        (root / name / "dagster.yaml").write_text(settings)
    locked = _lock(root / "locked")
    gnupg = tmp_path_factory.mktemp("gnupg")  # outside the root: gpg keeps its own files here
    gnupg.chmod(0o700)
    paths = {"root": root, "store": good.root, "broken": broken.root, "bad_registry": bad_registry.root,
             "no_registry": no_registry.root, "file": root / "a_file", "notes": root / "notes",
             "locked": root / "locked", "gnupg": gnupg, "absent": root / "absent",
             **{name: root / name for name in ("yaml_broken", "yaml_list")}}
    yield {"paths": paths, "runs": runs, "locked": locked}
    subprocess.run(["chattr", "-i", str(root / "locked")], capture_output=True)
    (root / "locked").chmod(0o755)
    subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], capture_output=True)


_hashes: dict[tuple, str] = {}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: a directory's mode, a link's target, a file's mode and sha256 (hashed
    again whenever its size, inode or times changed, so a rewrite is always seen)."""
    tree = {}
    prefix = len(str(root)) + 1
    for folder, dirs, files in os.walk(root):  # one lstat per path: every case takes two snapshots
        for path in (os.path.join(folder, name) for name in dirs + files):
            rel, info = path[prefix:], os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                tree[rel] = f"link {os.readlink(path)}"
            elif stat.S_ISDIR(info.st_mode):
                tree[rel] = f"dir {info.st_mode:o}"
            else:
                key = (rel, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                if key not in _hashes:
                    _hashes[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                tree[rel] = f"file {info.st_mode:o} {_hashes[key]}"
    return tree


# (case id, store, environment, argv, what the line must name). Placeholders: {name} is a path of
# the world, <name> a run of it. The store is the good one unless named; DAGSTER_HOME does not exist.
CASES = [
    # run
    ("run-scale", None, {}, ["run", "--scale", "huge"], "huge"),
    ("run-epochs-zero", None, {}, ["run", "--epochs", "0"], "0 must be at least 1"),
    ("run-epochs-word", None, {}, ["run", "--epochs", "many"], "'many'"),
    ("run-epochs-huge", None, {}, ["run", "--epochs", "100001"], "100001 must be at most"),
    ("run-workers-zero", None, {}, ["run", "--workers", "0"], "0 must be at least 1"),
    ("run-workers-999", None, {}, ["run", "--workers", "999"], "999 must be at most"),
    ("run-workers-word", None, {}, ["run", "--workers", "two"], "'two'"),
    ("run-threads-zero", None, {}, ["run", "--fit-threads", "0"], "0 must be at least 1"),
    ("run-threads-999", None, {}, ["run", "--fit-threads", "999"], "999 must be at most"),
    ("run-device", None, {}, ["run", "--fit-device", "gpu"], "'gpu'"),
    ("run-branch-and-sha", None, {}, ["run", "--branch", "main", "--sha", "abc1234"], "not both"),
    ("run-sha-4-hex", None, {}, ["run", "--sha", "abcd"], "'abcd' is not a SHA"),
    ("run-sha-not-hex", None, {}, ["run", "--sha", "xyz1234"], "'xyz1234' is not a SHA"),
    ("run-sha-41-hex", None, {}, ["run", "--sha", "a" * 41], "a" * 41),
    ("run-sha-unknown", None, {}, ["run", "--sha", "deadbeef" * 5], "deadbeef" * 5),
    ("run-branch-empty", None, {}, ["run", "--branch", ""], "'' is not a branch"),
    ("run-branch-unknown", None, {}, ["run", "--branch", "no-such-branch-anywhere"], "no-such-branch-anywhere"),
    ("run-database-both", None, {}, ["run", "--build-database", "--reuse-database"], "not allowed with"),
    ("run-unknown-flag", None, {}, ["run", "--turbo"], "--turbo"),
    # status
    ("status-empty", None, {}, ["status", ""], "malformed run_id ''"),
    ("status-word", None, {}, ["status", "latest"], "malformed run_id 'latest'"),
    ("status-bad-time", None, {}, ["status", "1.0.0_a1b2c3d4_20261399_000000"], "20261399_000000"),
    ("status-path", None, {}, ["status", "../../etc/passwd"], "../../etc/passwd"),
    ("status-unknown", None, {}, ["status", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    ("status-two-runs", None, {}, ["status", "<promoted>", "<failed>"], "<failed>"),
    # resume
    ("resume-missing", None, {}, ["resume"], "run_id"),
    ("resume-empty", None, {}, ["resume", ""], "malformed run_id ''"),
    ("resume-malformed", None, {}, ["resume", "yesterday"], "'yesterday'"),
    ("resume-unknown", None, {}, ["resume", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    # promote
    ("promote-no-version", None, {}, ["promote", "<bare>"], "--version"),
    ("promote-version-short", None, {}, ["promote", "<bare>", "--version", "1.2"], "'1.2'"),
    ("promote-version-v", None, {}, ["promote", "<bare>", "--version", "v2.0.0"], "'v2.0.0'"),
    ("promote-version-empty", None, {}, ["promote", "<bare>", "--version", ""], "invalid version ''"),
    ("promote-run-empty", None, {}, ["promote", "", "--version", "2.0.0"], "malformed run_id ''"),
    ("promote-unknown", None, {}, ["promote", "1.0.0_a1b2c3d4_20260318_143022", "--version", "2.0.0"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    ("promote-failed", None, {}, ["promote", "<failed>", "--version", "2.0.0"], "<failed> is failed"),
    ("promote-running", None, {}, ["promote", "<running>", "--version", "2.0.0"], "<running> is running"),
    ("promote-promoted", None, {}, ["promote", "<promoted>", "--version", "2.0.0"], "<promoted> is already promoted as 1.0.0"),
    ("promote-dirty", None, {}, ["promote", "<dirty>", "--version", "2.0.0"], "<dirty> was made from a dirty work tree"),
    ("promote-registered", None, {}, ["promote", "<bare>", "--version", "1.0.0"], "version 1.0.0 is already in the registry"),
    ("promote-unverified", None, {}, ["promote", "<bare>", "--version", "2.0.0"], "<bare> does not verify"),
    # rollback
    ("rollback-no-as", None, {}, ["rollback", "--to", "1.0.0"], "--as"),
    ("rollback-to-malformed", None, {}, ["rollback", "--to", "1.0", "--as", "1.0.1"], "'1.0'"),
    ("rollback-as-malformed", None, {}, ["rollback", "--to", "1.0.0", "--as", "1.0.1.0"], "'1.0.1.0'"),
    ("rollback-to-unknown", None, {}, ["rollback", "--to", "9.9.9", "--as", "9.9.10"], "cannot roll back to 9.9.9"),
    ("rollback-as-registered", None, {}, ["rollback", "--to", "1.0.0", "--as", "1.0.0"], "version 1.0.0 is already"),
    # versions
    ("versions-argument", None, {}, ["versions", "1.0.0"], "1.0.0"),
    ("versions-registry-kind", None, {"PIPELINE_REGISTRY": "s3"}, ["versions"], "PIPELINE_REGISTRY='s3'"),
    ("versions-registry-empty", None, {"PIPELINE_REGISTRY": ""}, ["versions"], "PIPELINE_REGISTRY=''"),
    ("versions-gcs-no-bucket", None, {"PIPELINE_REGISTRY": "gcs"}, ["versions"], "PIPELINE_GCS_BUCKET"),
    # clean
    ("clean-no-keep", None, {}, ["clean"], "--keep"),
    ("clean-keep-negative", None, {}, ["clean", "--keep", "-1"], "-1 must be at least 0"),
    ("clean-keep-word", None, {}, ["clean", "--keep", "all"], "'all'"),
    ("clean-keep-fraction", None, {}, ["clean", "--keep", "1.5"], "'1.5'"),
    # verify
    ("verify-missing", None, {}, ["verify"], "run_id"),
    ("verify-empty", None, {}, ["verify", ""], "malformed run_id ''"),
    ("verify-malformed", None, {}, ["verify", "1.0.0_zzzzzzzz_20260318_143022"], "1.0.0_zzzzzzzz_20260318_143022"),
    ("verify-unknown", None, {}, ["verify", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    # reproduce
    ("reproduce-empty", None, {}, ["reproduce", ""], "malformed run_id ''"),
    ("reproduce-malformed", None, {}, ["reproduce", "run-7"], "'run-7'"),
    ("reproduce-unknown", None, {}, ["reproduce", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    ("reproduce-failed", None, {}, ["reproduce", "<failed>"], "<failed> is failed"),
    # runs
    ("runs-where-no-equals", None, {}, ["runs", "--where", "status"], "filter 'status'"),
    ("runs-where-unknown", None, {}, ["runs", "--where", "colour=blue"], "'colour'"),
    ("runs-fields-empty-name", None, {}, ["runs", "--fields", "sha,,status"], "'sha,,status'"),
    ("runs-fields-unknown", None, {}, ["runs", "--fields", "nosuchfield"], "'nosuchfield'"),
    ("runs-format", None, {}, ["runs", "--format", "xml"], "'xml'"),
    # timeline
    ("timeline-no-metric", None, {}, ["timeline", "--by", "config_hash"], "metric"),
    ("timeline-no-by", None, {}, ["timeline", METRIC], "--by"),
    ("timeline-metric-unknown", None, {}, ["timeline", "nosuch.metric", "--by", "config_hash"], "'nosuch.metric'"),
    ("timeline-metric-text", None, {}, ["timeline", "sha", "--by", "config_hash"], "'sha' is not a number"),
    ("timeline-by-unknown", None, {}, ["timeline", METRIC, "--by", "colour"], "'colour'"),
    ("timeline-by-empty", None, {}, ["timeline", METRIC, "--by", ""], "'' is not FIELD"),
    ("timeline-factor-one", None, {}, ["timeline", METRIC, "--by", "config_hash", "--factor", "1"], "factor 1.0 must be greater than 1"),
    ("timeline-factor-nan", None, {}, ["timeline", METRIC, "--by", "config_hash", "--factor", "nan"], "factor nan"),
    ("timeline-factor-inf", None, {}, ["timeline", METRIC, "--by", "config_hash", "--factor", "inf"], "factor inf"),
    ("timeline-factor-word", None, {}, ["timeline", METRIC, "--by", "config_hash", "--factor", "big"], "'big'"),
    ("timeline-output-not-png", None, {}, ["timeline", METRIC, "--by", "config_hash", "--output", "{absent}/t.png"], "--output"),
    ("timeline-output-directory", None, {}, ["timeline", METRIC, "--by", "config_hash", "--format", "png", "--output", "{notes}"], "{notes}"),
    ("timeline-output-locked", None, {}, ["timeline", METRIC, "--by", "config_hash", "--format", "png", "--output", "{locked}/t.png"], "{locked}"),
    ("timeline-format", None, {}, ["timeline", METRIC, "--by", "config_hash", "--format", "svg"], "'svg'"),
    # compare
    ("compare-one-run", None, {}, ["compare", "<promoted>"], "run_b"),
    ("compare-unknown", None, {}, ["compare", "<promoted>", "1.0.0_a1b2c3d4_20260318_143022"], "unknown run 1.0.0_a1b2c3d4_20260318_143022"),
    ("compare-empty", None, {}, ["compare", "", "<promoted>"], "malformed run_id ''"),
    ("compare-format", None, {}, ["compare", "<promoted>", "<failed>", "--format", "html"], "'html'"),
    # the command line itself
    ("no-command", None, {}, [], "required"),
    ("unknown-command", None, {}, ["frobnicate"], "frobnicate"),
    # the store
    ("store-empty", None, {"PIPELINE_STORE": ""}, ["status"], "PIPELINE_STORE is set but empty"),
    ("store-file", None, {"PIPELINE_STORE": "{file}"}, ["status"], "PIPELINE_STORE={file} is a file"),
    ("store-under-file", None, {"PIPELINE_STORE": "{file}/store"}, ["runs"], "{file}/store"),
    ("store-locked-clean", None, {"PIPELINE_STORE": "{locked}"}, ["clean", "--keep", "0"], "PIPELINE_STORE={locked} is not writable"),
    ("store-under-locked-run", None, {"PIPELINE_STORE": "{locked}/store"}, ["run", "--scale", "tiny"], "{locked}/store is not writable"),
    ("store-file-promote", None, {"PIPELINE_STORE": "{file}"}, ["promote", "<promoted>", "--version", "2.0.0"], "{file}"),
    # the Dagster instance
    ("home-empty", None, {"DAGSTER_HOME": ""}, ["clean", "--keep", "0"], "DAGSTER_HOME is set but empty"),
    ("home-file", None, {"DAGSTER_HOME": "{file}"}, ["promote", "<bare>", "--version", "2.0.0"], "DAGSTER_HOME={file} is a file"),
    ("home-locked", None, {"DAGSTER_HOME": "{locked}"}, ["run", "--scale", "tiny"], "DAGSTER_HOME={locked} is not writable"),
    ("home-under-locked", None, {"DAGSTER_HOME": "{locked}/home"}, ["reproduce", "<promoted>"], "{locked}/home is not writable"),
    ("home-yaml-broken", None, {"DAGSTER_HOME": "{yaml_broken}"}, ["clean", "--keep", "0"], "{yaml_broken}/dagster.yaml is not valid YAML"),
    ("home-yaml-list", None, {"DAGSTER_HOME": "{yaml_list}"}, ["resume", "<failed>"], "{yaml_list}/dagster.yaml holds a list"),
    # signing, ledger, lineage, compute, code, registry backends, runtime labels, the sensor's settings
    ("gpg-no-such-key", None, {"PIPELINE_GPG_KEY": "nobody@example.invalid", "GNUPGHOME": "{gnupg}"}, ["run", "--scale", "tiny"], "PIPELINE_GPG_KEY='nobody@example.invalid'"),
    ("gpg-no-keyring", None, {"PIPELINE_GPG_KEY": "k@example.org", "GNUPGHOME": "{absent}/gnupg"}, ["resume", "<failed>"], "GNUPGHOME='{absent}/gnupg'"),
    ("ledger-file", None, {LEDGER_VARIABLE: "{file}"}, ["run", "--scale", "tiny"], "ledger {file} exists and is not a git repository"),
    ("ledger-not-git", None, {LEDGER_VARIABLE: "{notes}"}, ["promote", "<bare>", "--version", "2.0.0"], "ledger {notes} exists"),
    ("ledger-under-locked", None, {LEDGER_VARIABLE: "{locked}/ledger"}, ["rollback", "--to", "1.0.0", "--as", "1.0.1"], "{locked}/ledger is not writable"),
    ("ledger-scheme", None, {LEDGER_VARIABLE: f"ftp://ops:{SECRET}@example.org/ledger.git?token={SECRET}"}, ["run", "--scale", "tiny"], "unknown scheme 'ftp'"),
    ("lineage-transport", None, {TRANSPORT_VARIABLE: "kafka"}, ["run", "--scale", "tiny"], f"{TRANSPORT_VARIABLE}='kafka'"),
    ("lineage-http-no-url", None, {TRANSPORT_VARIABLE: "http"}, ["resume", "<failed>"], URL_VARIABLE),
    ("lineage-url", None, {URL_VARIABLE: "marquez:5000"}, ["run", "--scale", "tiny"], "'marquez:5000'"),
    ("lineage-url-secret", None, {URL_VARIABLE: f"ftp://ops:{SECRET}@marquez/api?api_key={SECRET}"}, ["reproduce", "<promoted>"], "ftp://***@marquez/api?***"),
    ("compute-kind", None, {"PIPELINE_COMPUTE": "cloud"}, ["run", "--scale", "tiny"], "PIPELINE_COMPUTE='cloud'"),
    ("compute-empty", None, {"PIPELINE_COMPUTE": ""}, ["versions"], "PIPELINE_COMPUTE=''"),
    ("modal-gpu", None, {"PIPELINE_MODAL_GPU": "Z80"}, ["run", "--scale", "tiny"], "PIPELINE_MODAL_GPU='Z80'"),
    ("code-sha-short", None, {"PIPELINE_CODE_SHA": "abc123"}, ["run", "--scale", "tiny"], "PIPELINE_CODE_SHA='abc123'"),
    ("code-sha-upper", None, {"PIPELINE_CODE_SHA": "A" * 40}, ["resume", "<failed>"], "A" * 40),
    ("gcs-bucket", None, {"PIPELINE_GCS_BUCKET": "Bad_Bucket!"}, ["versions"], "PIPELINE_GCS_BUCKET='Bad_Bucket!'"),
    ("gcs-project", None, {"PIPELINE_GCS_PROJECT": "X"}, ["promote", "<bare>", "--version", "2.0.0"], "PIPELINE_GCS_PROJECT='X'"),
    ("hf-repo", None, {"PIPELINE_HF_REPO": "not a repo"}, ["rollback", "--to", "1.0.0", "--as", "1.0.1"], "PIPELINE_HF_REPO='not a repo'"),
    ("tro-base-relative", None, {"PIPELINE_TRO_BASE": "policyengine.org/usdata/"}, ["run", "--scale", "tiny"], "PIPELINE_TRO_BASE='policyengine.org/usdata/'"),
    ("tro-base-no-slash", None, {"PIPELINE_TRO_BASE": "https://policyengine.org/usdata"}, ["promote", "<bare>", "--version", "2.0.0"], "PIPELINE_TRO_BASE='https://policyengine.org/usdata'"),
    ("image-digest", None, {"PIPELINE_IMAGE_DIGEST": "latest"}, ["run", "--scale", "tiny"], "PIPELINE_IMAGE_DIGEST='latest'"),
    ("cloud-region-newline", None, {"PIPELINE_CLOUD_REGION": "us-east1\nrm -rf"}, ["run", "--scale", "tiny"], "PIPELINE_CLOUD_REGION="),
    ("compute-pool-long", None, {"PIPELINE_COMPUTE_POOL": "p" * 201}, ["resume", "<failed>"], "PIPELINE_COMPUTE_POOL="),
    ("cloud-provider-control", None, {"PIPELINE_CLOUD_PROVIDER": "gcp\x1b[2J"}, ["run", "--scale", "tiny"], "PIPELINE_CLOUD_PROVIDER="),
    ("instance-id-newline", None, {"PIPELINE_INSTANCE_ID": "i-1\ni-2"}, ["reproduce", "<promoted>"], "PIPELINE_INSTANCE_ID="),
    ("watch-scale", None, {"PIPELINE_WATCH_SCALE": "huge"}, ["versions"], "PIPELINE_WATCH_SCALE='huge'"),
    ("watch-repo", None, {"PIPELINE_WATCH_REPO": "{absent}/repo"}, ["clean", "--keep", "0"], "PIPELINE_WATCH_REPO='{absent}/repo'"),
    ("watch-branch", None, {"PIPELINE_WATCH_BRANCH": "--force"}, ["promote", "<bare>", "--version", "2.0.0"], "PIPELINE_WATCH_BRANCH='--force'"),
    # unreadable records: a command about the run names its file; the registry names its file
    *((f"status-meta-{kind}", "broken", {}, ["status", run_id], f"{{broken}}/runs/{run_id}/meta.json") for kind, run_id in BAD_META.items()),
    ("promote-meta-unreadable", "broken", {}, ["promote", BAD_META["not_json"], "--version", "2.0.0"], f"runs/{BAD_META['not_json']}/meta.json"),
    ("resume-meta-unreadable", "broken", {}, ["resume", BAD_META["unknown_status"]], f"runs/{BAD_META['unknown_status']}/meta.json"),
    ("verify-meta-unreadable", "broken", {}, ["verify", BAD_META["truncated"]], f"runs/{BAD_META['truncated']}/meta.json"),
    ("compare-meta-unreadable", "broken", {}, ["compare", "<promoted>", BAD_META["unknown_field"]], "colour"),
    ("compare-step-record-unreadable", "broken", {}, ["compare", "<promoted>", BAD_STEP_RECORD], f"runs/{BAD_STEP_RECORD}/steps/policy_data_db.json"),
    ("versions-registry-unreadable", "bad_registry", {}, ["versions"], "{bad_registry}/version_manifest.json"),
    ("promote-registry-unreadable", "bad_registry", {}, ["promote", "<bad_registry_run>", "--version", "2.0.0"], "{bad_registry}/version_manifest.json"),
    ("rollback-registry-unreadable", "bad_registry", {}, ["rollback", "--to", "1.0.0", "--as", "1.0.1"], "{bad_registry}/version_manifest.json"),
    ("clean-registry-unreadable", "bad_registry", {}, ["clean", "--keep", "0"], "{bad_registry}/version_manifest.json"),
    ("clean-registry-missing", "no_registry", {}, ["clean", "--keep", "0"], "production/ holds 1.0.0"),
]
LOCKED_CASES = {case[0] for case in CASES if "{locked}" in json.dumps(case[2:])}


def _fill(text: str, world) -> str:
    for name, path in world["paths"].items():
        text = text.replace(f"{{{name}}}", str(path))
    for name, run_id in world["runs"].items():
        text = text.replace(f"<{name}>", run_id)
    return text


@pytest.mark.reliability("bad_input")
@pytest.mark.parametrize("case, store, environment, argv, named", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, monkeypatch, capsys, case, store, environment, argv, named):
    if case in LOCKED_CASES and not world["locked"]:
        pytest.skip("no directory can be made unwritable here")
    for variable in [v.name for v in ENVIRONMENT] + [LEDGER_VARIABLE, URL_VARIABLE, "PIPELINE_GPG_KEY", "GNUPGHOME"]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PIPELINE_STORE", str(world["paths"][store or "store"]))
    monkeypatch.setenv("DAGSTER_HOME", str(world["paths"]["absent"] / "dagster_home"))
    monkeypatch.setenv("PIPELINE_CODE_SHA", NOT_THE_INSTALLED_CODE)
    for name, value in environment.items():
        monkeypatch.setenv(name, _fill(value, world))
    root = world["paths"]["root"]
    before = snapshot(root)
    assert main([_fill(arg, world) for arg in argv]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usdata-pipeline: error: "), err
    assert _fill(named, world) in lines[0]
    assert SECRET not in err and out == ""
    assert snapshot(root) == before
    assert not world["paths"]["absent"].exists()


def test_the_table_covers_every_command_and_eighty_cases():
    from pipeline_assets.cli import COMMANDS

    assert len(CASES) >= 80 and len({case[0] for case in CASES}) == len(CASES)
    assert set(COMMANDS) <= {case[3][0] for case in CASES if case[3]}
    named = " ".join(json.dumps(case[2]) for case in CASES)
    assert all(variable.name in named for variable in ENVIRONMENT)


@pytest.mark.reliability("bad_input")
@pytest.mark.parametrize("argv", [["status"], ["runs"], ["timeline", METRIC, "--by", "config_hash"], ["clean", "--keep", "100"]],
                         ids=["status", "runs", "timeline", "clean"])
def test_a_listing_names_each_unreadable_record_once_and_lists_the_rest(world, monkeypatch, capsys, argv):
    monkeypatch.setenv("PIPELINE_STORE", str(world["paths"]["broken"]))
    monkeypatch.setenv("DAGSTER_HOME", str(world["paths"]["absent"] / "dagster_home"))
    before = snapshot(world["paths"]["broken"])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    warnings = err.splitlines()
    assert all(line.startswith("usdata-pipeline: warning: unreadable record ") for line in warnings), err
    unreadable = [*BAD_META.values()] + ([BAD_STEP_RECORD] if argv[0] in ("runs", "timeline") else [])
    assert sorted(line.split(" ")[4].split("/runs/")[1].split("/")[0] for line in warnings) == sorted(unreadable)
    if argv[0] != "clean":
        assert world["runs"]["promoted"] in out
    assert snapshot(world["paths"]["broken"]) == before
    assert not world["paths"]["absent"].exists()


@pytest.mark.reliability("bad_input")
def test_the_reuse_scan_of_a_new_run_passes_over_unreadable_run_records(world, caplog):
    store = LocalRunStore(world["paths"]["broken"])
    found = find_reusable(store, "0.1.0_a1b2c3d4_20990101_000000", "source_datasets", "no-such-key", SealedRunLender(store))
    assert found is None
    assert sum("unreadable record" in r.getMessage() for r in caplog.records) >= len(BAD_META)


@pytest.mark.reliability("bad_input")
def test_clean_keeps_what_production_or_any_registry_names(world, tmp_path):
    """A run named only by production/ (its registry entry lost to another backend) is kept; so are
    promoted and running runs; an unnamed failed run goes."""
    store = LocalRunStore(tmp_path / "store")
    named_by_production = _past_run(store, 20, RunStatus.failed)
    promoted = _past_run(store, 19, RunStatus.completed)
    store.update_meta(promoted, lambda m: m.transition(RunStatus.promoted))
    running = _past_run(store, 18)
    unnamed = _past_run(store, 17, RunStatus.failed)
    in_other_registry = _past_run(store, 16, RunStatus.failed)
    store.path("production/1.0.0").mkdir(parents=True)
    store.path("production/1.0.0/release.tro.jsonld").write_text(json.dumps({"@graph": [{"pe:runId": named_by_production}]}))
    local = LocalRegistry.in_store(store.root)
    other = LocalRegistry(tmp_path / "bucket" / "version_manifest.json")  # stands in for the configured backend
    entry = {"created_at": "2026-01-01T00:00:00Z", "hf": None, "gcs": None, "diagnostics_path": "d", "git_sha": "s",
             "env_id": None, "config_hash": None, "tro_path": "t", "tro_sha256": "h"}
    from resources.registry import VersionManifest

    local.add(VersionManifest(version="1.0.0", run_id=promoted, **entry))
    other.add(VersionManifest(version="1.0.1", run_id=in_other_registry, **entry))
    assert clean(store, other, keep=0) == [unnamed]
    assert {m.run_id for m in store.list_runs()} == {named_by_production, promoted, running, in_other_registry}


@pytest.mark.reliability("bad_input")
def test_a_variable_read_at_import_time_is_refused_before_the_import(tmp_path):
    """PIPELINE_WATCH_SCALE is read when the definitions are imported: a real process, so the import is fresh."""
    import sys

    env = {**os.environ, "PIPELINE_WATCH_SCALE": "huge", "PIPELINE_STORE": str(tmp_path / "store"),
           "DAGSTER_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "pipeline_assets.cli", "versions"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["usdata-pipeline: error: PIPELINE_WATCH_SCALE='huge': expected one of tiny, small, reference, large"]
    assert list(tmp_path.iterdir()) == []


def test_dagster_home_checks_before_it_creates_anything(world, monkeypatch):
    from pipeline_assets.launch import dagster_home

    for bad in (world["paths"]["file"], world["paths"]["yaml_broken"], world["paths"]["locked"] / "home"):
        monkeypatch.setenv("DAGSTER_HOME", str(bad))
        before = snapshot(world["paths"]["root"])
        with pytest.raises(ValueError, match=str(bad)):
            dagster_home()
        assert snapshot(world["paths"]["root"]) == before


def test_a_sha_is_never_recorded_as_a_branch(tmp_path):
    from resources.git import code_state

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "trunk")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "--allow-empty", "-m", "one")
    git("branch", "feature")
    sha = git("rev-parse", "HEAD")
    for ref in (sha, sha[:7], sha[:4]):
        assert code_state(tmp_path, ref).branch == "trunk"  # the checkout's branch, never the SHA
    assert code_state(tmp_path, "feature").branch == "feature"


def test_urls_echoed_anywhere_lose_their_credentials_and_query_strings():
    from resources.ledger import redact

    shown = redact(f"push to https://ops:{SECRET}@example.org/l.git?token={SECRET}#main failed; retry later?")
    assert SECRET not in shown
    assert shown == "push to https://***@example.org/l.git?***#main failed; retry later?"


@pytest.mark.reliability("bad_input")
def test_an_unreadable_gcs_registry_is_named_and_never_written_over(gcs_client, gcs_bucket):
    from resources.registry import GcsRegistry, RegistryError, VersionManifest

    gcs_bucket.blob("version_manifest.json").upload_from_string(b'{"current": "1.0.0", "versions": [')
    generation = gcs_bucket.get_blob("version_manifest.json").generation
    registry = GcsRegistry(gcs_client, gcs_bucket.name)
    with pytest.raises(RegistryError, match=f"^unreadable registry gs://{gcs_bucket.name}/version_manifest.json: ") as unreadable:
        registry.add(VersionManifest(version="1.0.1", created_at=datetime.now(timezone.utc), hf=None, gcs=None, run_id="r",
                                     diagnostics_path="d", git_sha="s", env_id=None, config_hash=None, tro_path="t", tro_sha256="h"))
    assert "\n" not in str(unreadable.value)
    assert gcs_bucket.get_blob("version_manifest.json").generation == generation
