import subprocess
from datetime import datetime, timezone

import pytest

from pipeline_assets.identity import (
    InvalidRunId,
    VersionSkewError,
    ensure_no_skew,
    make_run_id,
    parse_run_id,
)
from resources.git import GitError, code_state, running_code_sha

SHA = "a1b2c3d4" + "0" * 32


def test_run_id_round_trips():
    when = datetime(2026, 3, 18, 14, 30, 22, tzinfo=timezone.utc)
    run_id = make_run_id("1.57.0", SHA, when)
    assert run_id == "1.57.0_a1b2c3d4_20260318_143022"
    parsed = parse_run_id(run_id)
    assert (parsed.version, parsed.sha8, parsed.started_at) == ("1.57.0", "a1b2c3d4", when)
    assert str(parsed) == run_id
    assert not set("/|,") & set(run_id)


def test_run_id_is_utc():
    from datetime import timedelta

    local = datetime(2026, 3, 18, 16, 30, 22, tzinfo=timezone(timedelta(hours=2)))
    assert make_run_id("1.0.0", SHA, local).endswith("_20260318_143022")


@pytest.mark.parametrize(
    "bad",
    ["", "1.57.0_a1b2c3d4", "1.57.0_A1B2C3D4_20260318_143022", "1.57.0_a1b2c3d4_20261318_143022",
     "1.57/0_a1b2c3d4_20260318_143022", "1.57.0_a1b2c3d4_20260318_143022,x", "latest"],
)
def test_malformed_run_id_is_a_one_line_error_naming_the_form(bad):
    with pytest.raises(InvalidRunId) as err:
        parse_run_id(bad)
    message = str(err.value)
    assert "\n" not in message and repr(bad) in message and "{version}_{sha8}_{YYYYMMDD_HHMMSS}" in message


def test_make_run_id_needs_a_full_sha():
    with pytest.raises(InvalidRunId, match="full 40-hex"):
        make_run_id("1.0.0", "a1b2c3d4")


def test_skew_guard_names_both_shas():
    other = "f" * 40
    with pytest.raises(VersionSkewError) as err:
        ensure_no_skew("1.0.0_a1b2c3d4_20260318_143022", SHA, "state_weights", running_sha=other)
    assert SHA in str(err.value) and other in str(err.value) and "state_weights" in str(err.value)
    ensure_no_skew("1.0.0_a1b2c3d4_20260318_143022", SHA, "state_weights", running_sha=SHA)


def test_running_sha_prefers_the_image_variable(monkeypatch):
    monkeypatch.setenv("PIPELINE_CODE_SHA", SHA)
    assert running_code_sha() == SHA


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "config", "user.email", "t@example.org")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-qm", "one")
    return tmp_path


def test_code_state_pins_branch_and_detects_dirty_tree(repo):
    clean = code_state(repo, "main")
    assert len(clean.sha) == 40 and clean.branch == "main" and not clean.dirty and clean.diff_sha256 is None
    (repo / "a.txt").write_text("two\n")
    dirty = code_state(repo)
    assert dirty.dirty and len(dirty.diff_sha256) == 64 and dirty.sha == clean.sha
    (repo / "a.txt").write_text("three\n")
    assert code_state(repo).diff_sha256 != dirty.diff_sha256


def test_unknown_ref_is_a_clear_error(repo):
    with pytest.raises(GitError, match="no-such-branch"):
        code_state(repo, "no-such-branch")


def test_runs_started_in_the_same_second_get_their_own_run_ids(tmp_path):
    """A run that reuses every step finishes within a second; the next one waits for its own second."""
    from pipeline_assets.driver import start_run
    from pipeline_assets.steps.config import config_for_scale
    from resources.git import CodeState
    from resources.run_store import LocalRunStore

    store, code = LocalRunStore(tmp_path), CodeState(sha=SHA, branch="main", dirty=False, diff_sha256=None)
    first = start_run(store, config_for_scale("tiny"), code)
    second = start_run(store, config_for_scale("tiny"), code)
    assert first.run_id != second.run_id
    assert parse_run_id(second.run_id).started_at > parse_run_id(first.run_id).started_at
    assert [m.run_id for m in store.list_runs()] == [first.run_id, second.run_id]
