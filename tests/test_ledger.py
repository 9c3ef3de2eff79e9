"""The git ledger: one commit per settled run and per registered version, checked with git itself."""

from __future__ import annotations

import logging
import subprocess

import pytest

from pipeline_assets.cli import main
from pipeline_assets.driver import run_release, settle_run
from pipeline_assets.promotion import RELEASE_TRO, promote, rollback
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import TRO_NAME
from resources.compute import LocalPool
from resources.git import CodeState
from resources.ledger import CLONE_DIR, GitLedger, LedgerError, redact
from tests.conftest import PINNED_SHA
from tests.test_promotion import local_backends

CODE = CodeState(sha=PINNED_SHA, branch="main", dirty=False, diff_sha256=None)


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def subjects(repo) -> list[str]:
    """Commit messages, newest first."""
    return git(repo, "log", "--format=%s").splitlines()


def show(repo, path: str, rev: str = "HEAD") -> bytes:
    return subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, check=True).stdout


def test_a_local_ledger_records_a_run_a_promotion_and_a_rollback(store, tmp_path):
    store, run_id = store
    ledger = GitLedger.open(str(tmp_path / "ledger"), store.root)
    repo = ledger.work_tree
    publishers, registry = local_backends(store)

    settle_run(store, run_id, True, [], ledger=ledger)
    assert subjects(repo) == [f"run {run_id} completed"]
    assert show(repo, f"runs/{run_id}/meta.json") == store.read_bytes(store.meta_key(run_id))
    assert show(repo, f"runs/{run_id}/{TRO_NAME}") == store.read_bytes(store.run_key(run_id, TRO_NAME))

    settle_run(store, run_id, True, [], ledger=ledger)  # settled already: nothing new, no commit
    assert len(subjects(repo)) == 1

    entry = promote(store, run_id, "1.57.0", publishers, registry, ledger=ledger)
    back = rollback(store, "1.57.0", "1.57.1", publishers, registry, store.root / "production", ledger=ledger)
    assert subjects(repo) == [
        f"rollback 1.57.1 to the files of 1.57.0 (run {run_id})",
        f"promote 1.57.0 (run {run_id})",
        f"run {run_id} completed",
    ]
    promoted = "HEAD~1"
    assert set(git(repo, "show", "--name-only", "--format=", promoted).split()) == {
        "releases/1.57.0/registry_entry.json", f"releases/1.57.0/{RELEASE_TRO}", f"runs/{run_id}/meta.json"}
    assert show(repo, "releases/1.57.0/registry_entry.json") == entry.model_dump_json(indent=2).encode()
    assert show(repo, f"releases/1.57.0/{RELEASE_TRO}") == store.read_bytes(f"releases/1.57.0/{RELEASE_TRO}")
    assert show(repo, f"runs/{run_id}/meta.json") == store.read_bytes(store.meta_key(run_id))  # now promoted
    assert b'"status": "promoted"' in show(repo, f"runs/{run_id}/meta.json", promoted)
    assert show(repo, "releases/1.57.1/registry_entry.json") == back.model_dump_json(indent=2).encode()
    assert show(repo, f"releases/1.57.1/{RELEASE_TRO}") == store.read_bytes(f"production/1.57.0/{RELEASE_TRO}")
    assert git(repo, "log", "-1", "--format=%an <%ae>").strip() == "usdata-pipeline <usdata-pipeline@users.noreply.invalid>"
    git(repo, "fsck", "--strict")


def test_a_remote_ledger_is_pushed_after_each_event(store, tmp_path):
    """A bare repository stands in for the remote; the driver run reuses the tiny run's upstream steps."""
    store, old_run = store
    remote = tmp_path / "ledger.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    ledger = GitLedger.open(remote.as_uri(), store.root)
    assert ledger.work_tree == store.root / CLONE_DIR

    meta, _ = run_release(store, config_for_scale("tiny"), CODE, running_sha=PINNED_SHA, ledger=ledger)
    publishers, registry = local_backends(store)
    promote(store, old_run, "2.0.0", publishers, registry, ledger=ledger)

    assert subjects(remote) == [f"promote 2.0.0 (run {old_run})", f"run {meta.run_id} completed"]
    assert show(remote, f"runs/{meta.run_id}/{TRO_NAME}") == store.read_bytes(store.run_key(meta.run_id, TRO_NAME))
    assert show(remote, f"runs/{meta.run_id}/meta.json", "HEAD~1") == store.read_bytes(store.meta_key(meta.run_id))
    assert show(remote, f"runs/{old_run}/meta.json") == store.read_bytes(store.meta_key(old_run))

    # Another writer pushes first: the next event is rebased on top of it, nothing is lost.
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(remote), str(other)], check=True, capture_output=True)
    (other / "NOTE").write_text("reviewed\n")
    git(other, "add", "NOTE")
    git(other, "-c", "user.name=r", "-c", "user.email=r@x", "commit", "-q", "-m", "review note")
    git(other, "push", "-q", "origin", "HEAD:main")
    assert ledger.commit({"releases/2.0.0/extra.json": b"{}"}, "annotate 2.0.0") is not None
    assert subjects(remote)[:2] == ["annotate 2.0.0", "review note"]
    assert ledger.commit({"releases/2.0.0/extra.json": b"{}"}, "annotate 2.0.0") is None  # nothing new
    assert len(subjects(remote)) == 4


def test_a_failed_run_is_recorded_without_a_tro(store, tmp_path):
    store, _ = store
    ledger = GitLedger.open(str(tmp_path / "ledger"), store.root)
    with pytest.raises(ValueError):  # new local fit settings, and the area step cannot start its workers
        run_release(store, config_for_scale("tiny", local_fit={"epochs": 40}), CODE, pool=LocalPool(2, "no-such-start-method"),
                    running_sha=PINNED_SHA, ledger=ledger)
    run_id = store.list_runs()[-1].run_id
    assert subjects(ledger.work_tree) == [f"run {run_id} failed"]
    assert git(ledger.work_tree, "show", "--name-only", "--format=", "HEAD").split() == [f"runs/{run_id}/meta.json"]
    assert show(ledger.work_tree, f"runs/{run_id}/meta.json") == store.read_bytes(store.meta_key(run_id))


def test_a_credential_in_the_remote_url_reaches_no_file_and_no_message(tmp_path, caplog):
    secret = "ghp_LedgerSecretToken42"
    url = f"https://pipeline:{secret}@127.0.0.1:9/ledger.git"  # nothing listens on port 9
    store_root = tmp_path / "store"
    ledger = GitLedger.open(url, store_root)
    with pytest.raises(LedgerError) as failed:
        ledger.commit({"runs/x/meta.json": b"{}"}, "run x completed")
    assert secret not in str(failed.value) and "***@127.0.0.1" in str(failed.value) and "\n" not in str(failed.value)
    with caplog.at_level(logging.ERROR, logger="resources.ledger"):
        assert ledger.record({"runs/x/meta.json": b"{}"}, "run x completed") is None
    assert "was not recorded in the ledger" in caplog.text and secret not in caplog.text
    assert not [p for p in store_root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert redact(f"see {url} and {url}") == "see https://***@127.0.0.1:9/ledger.git and https://***@127.0.0.1:9/ledger.git"


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_path_that_is_not_a_git_repository_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / "notes"
    if kind == "file":
        path.write_text("x")
    else:
        (path / "sub").mkdir(parents=True)
    with pytest.raises(LedgerError, match="exists and is not a git repository") as refused:
        GitLedger.open(str(path), tmp_path / "store")
    assert "\n" not in str(refused.value)
    assert GitLedger.open(str(tmp_path / "empty"), tmp_path / "store").work_tree.joinpath(".git").is_dir()


def test_a_bad_ledger_refuses_the_run_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("PIPELINE_LEDGER", str(tmp_path / "not-a-repo.txt"))
    (tmp_path / "not-a-repo.txt").write_text("x")
    monkeypatch.setenv("PIPELINE_CODE_SHA", PINNED_SHA)
    monkeypatch.setattr("pipeline_assets.cli.code_state", lambda repo, ref=None: CODE)
    assert main(["run", "--scale", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usdata-pipeline: error: ledger ") and "is not a git repository" in err and "\n" not in err
    assert not (tmp_path / "store" / "runs").exists()
