"""The git sensor (one run per new commit) and the run-status sensors (meta.json follows the Dagster run)."""

from __future__ import annotations

import os
import subprocess

import pytest
from dagster import (
    AssetCheckResult,
    Definitions,
    SensorResult,
    SkipReason,
    asset,
    asset_check,
    build_run_status_sensor_context,
    build_sensor_context,
    instance_for_test,
    materialize,
    validate_run_config,
)

from pipeline_assets import defs, tro
from pipeline_assets.driver import start_run
from pipeline_assets.identity import parse_run_id
from pipeline_assets.identity_contract import config_hash
from pipeline_assets.jobs import RELEASE_JOB
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.run_start import START_TAGS
from pipeline_assets.steps.config import config_for_scale
from pipeline_assets.tro import TRO_NAME
from resources.dagster_resources import RunStoreResource
from resources.git import CodeState
from resources.run_store import LocalRunStore, RunStatus
from sensors.git_sensor import build_git_sensor
from sensors.run_status import release_failure_sensor, release_success_sensor
from tests.conftest import PINNED_SHA


def git(repo, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True,
    ).stdout.strip()


def commit(repo, text: str) -> str:
    (repo / "file.txt").write_text(text)
    git(repo, "add", "file.txt")
    git(repo, "commit", "-q", "-m", text)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    return path


def tick(sensor, instance, store: LocalRunStore, cursor: str | None = None):
    resources = {"run_store": RunStoreResource(root=str(store.root))}
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context)


def store_listing(store: LocalRunStore) -> list[str]:
    return sorted(str(path.relative_to(store.root)) for path in store.root.rglob("*"))


def test_each_new_commit_gives_one_run_request_and_a_tick_writes_nothing(repo, tmp_path):
    """A tick (a preview in the UI is one) only asks for the run: the store is left as it was."""
    store = LocalRunStore(tmp_path / "store")
    store.root.mkdir()
    (store.root / "runs").mkdir()
    sha = commit(repo, "one")
    sensor = build_git_sensor(repo, "main", "tiny")
    with instance_for_test() as instance:
        result = tick(sensor, instance, store)
        assert isinstance(result, SensorResult) and result.cursor == sha
        (request,) = result.run_requests
        (add,) = result.dynamic_partitions_requests
        run_id = request.partition_key
        assert parse_run_id(run_id).sha8 == sha[:8]
        assert add.partitions_def_name == RUN_IDS and list(add.partition_keys) == [run_id]
        assert request.run_key == sha
        assert {name: request.tags[name] for name in START_TAGS} == {
            "run_id": run_id, "git_sha": sha, "branch": "main", "scale": "tiny",
            "config_hash": config_hash(config_for_scale("tiny"))}
        assert request.run_config["resources"]["run_store"]["config"]["root"] == str(store.root)
        assert store_listing(store) == ["runs"]

        again = tick(sensor, instance, store, cursor=sha)
        assert isinstance(again, SkipReason) and "no new commit" in again.skip_message

        newer = commit(repo, "two")
        (next_request,) = tick(sensor, instance, store, cursor=sha).run_requests
        assert next_request.run_key == newer and next_request.partition_key != run_id
        assert next_request.tags["git_sha"] == newer
        assert store_listing(store) == ["runs"]


def test_the_requested_run_creates_its_record_when_it_starts(repo, tmp_path):
    """The request's first step makes meta.json from the request's tags, pinned to the commit."""
    store = LocalRunStore(tmp_path / "store")
    sha = commit(repo, "one")
    with instance_for_test() as instance:
        (request,) = tick(build_git_sensor(repo, "main", "tiny"), instance, store).run_requests
        run_id = request.partition_key
        instance.add_dynamic_partitions(RUN_IDS, [run_id])
        run_config = request.run_config
        run_config["resources"]["code"] = {"config": {"sha": sha}}  # the steps run the commit's code
        result = defs.resolve_job_def(RELEASE_JOB).execute_in_process(
            partition_key=run_id, instance=instance, tags=request.tags, run_config=run_config,
            op_selection=["policy_data_db"],
        )
        assert result.success
    meta = store.read_meta(run_id)
    assert (meta.sha, meta.branch, meta.dirty) == (sha, "main", False)
    assert meta.orchestrator.pid == os.getpid()  # the process executing the step: in-process here, else the run worker
    assert meta.created_at == parse_run_id(run_id).started_at
    assert meta.config == config_for_scale("tiny").model_dump(mode="json")
    assert meta.step_timings["policy_data_db"].status == "succeeded"


def test_the_request_resolves_against_the_release_job(repo, tmp_path):
    """Through Dagster's own tick evaluation: the new partition is accepted in the same tick, and the
    run config is valid for the release job."""
    sensor = build_git_sensor(repo, "main", "tiny")
    commit(repo, "one")
    code_location = Definitions(
        assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, sensors=[sensor], resources=defs.resources
    ).get_repository_def()
    resources = {"run_store": RunStoreResource(root=str(tmp_path / "store"))}
    with instance_for_test() as instance, build_sensor_context(
        instance=instance, instance_ref=instance.get_ref(), repository_def=code_location, resources=resources
    ) as context:
        (request,) = code_location.get_sensor_def("git_commit_sensor").evaluate_tick(context).run_requests
    assert request.tags["dagster/partition"] == request.partition_key
    validate_run_config(defs.resolve_job_def(RELEASE_JOB), request.run_config)


def test_unreadable_repository_is_a_skip_not_a_crash(tmp_path):
    store = LocalRunStore(tmp_path / "store")
    missing = tmp_path / "no-such-repo"
    with instance_for_test() as instance:
        result = tick(build_git_sensor(missing, "main", "tiny"), instance, store)
    assert isinstance(result, SkipReason) and str(missing) in result.skip_message
    assert not store.root.exists()


def test_unknown_scale_is_refused_when_the_sensor_is_built(repo):
    with pytest.raises(ValueError, match="unknown scale"):
        build_git_sensor(repo, "main", "huge")


# --- run-status sensors ----------------------------------------------------------------------------
def release_run(tmp_path, instance, assets):
    """A run record in a tmp store, and a tiny Dagster run tagged with its partition whose config names
    the store; the sensor's own resource points elsewhere, so the run's config must win."""
    store = LocalRunStore(tmp_path / "store")
    run_id = start_run(store, config_for_scale("tiny"), CodeState(PINNED_SHA, "main", False, None)).run_id
    result = materialize(
        assets,
        instance=instance,
        tags={"dagster/partition": run_id},
        resources={"run_store": RunStoreResource()},
        run_config={"resources": {"run_store": {"config": {"root": str(store.root)}}}},
        raise_on_error=False,
    )
    elsewhere = {"run_store": RunStoreResource(root=str(tmp_path / "elsewhere"))}
    return store, run_id, result, elsewhere


def status_context(instance, run, event, resources):
    return build_run_status_sensor_context(
        sensor_name="release_status", dagster_instance=instance, dagster_run=run, dagster_event=event, resources=resources
    )


@pytest.mark.parametrize("check_passes", [True, False])
def test_success_sensor_settles_the_run(tmp_path, monkeypatch, check_passes):
    written = []

    def write_tro(store, run_id, signer):  # a stand-in TRO: the real one needs a whole release's steps
        written.append(run_id)
        return store.write_run_file(run_id, TRO_NAME, b"{}")

    monkeypatch.setattr(tro, "write_tro", write_tro)  # under seal_tro, which writes a TRO only where none is

    @asset
    def fine(run_store: RunStoreResource):
        return 1

    @asset_check(asset=fine)
    def fine_check():
        return AssetCheckResult(passed=check_passes)

    with instance_for_test() as instance:
        store, run_id, result, resources = release_run(tmp_path, instance, [fine, fine_check])
        assert result.success
        with status_context(instance, result.dagster_run, result.get_run_success_event(), resources) as context:
            release_success_sensor(context)
            release_success_sensor(context)  # a second tick changes nothing
    meta = store.read_meta(run_id)
    if check_passes:
        assert meta.status is RunStatus.completed and written == [run_id]
    else:
        assert meta.status is RunStatus.failed and meta.error.step == "checks" and "fine:fine_check" in meta.error.message
        assert written == []


def test_failure_sensor_names_the_step_and_the_error(tmp_path):
    @asset
    def broken(run_store: RunStoreResource):
        raise ValueError("disk full\nsecond line")

    with instance_for_test() as instance:
        store, run_id, result, resources = release_run(tmp_path, instance, [broken])
        assert not result.success
        with status_context(instance, result.dagster_run, result.get_run_failure_event(), resources) as context:
            release_failure_sensor(context)
            first = store.read_meta(run_id)
            release_failure_sensor(context)  # the record is already failed: left as it is
    assert first.status is RunStatus.failed
    assert first.error.step == "broken" and first.error.message == "ValueError: disk full"
    assert store.read_meta(run_id).model_dump(exclude={"updated_at"}) == first.model_dump(exclude={"updated_at"})


def test_a_run_without_a_record_is_left_alone(tmp_path):
    @asset
    def fine(run_store: RunStoreResource):
        return 1

    with instance_for_test() as instance:
        store, run_id, result, resources = release_run(tmp_path, instance, [fine])
        run = result.dagster_run.with_tags({"dagster/partition": "1.0.0_00000000_20260101_000000"})
        with status_context(instance, run, result.get_run_success_event(), resources) as context:
            assert release_success_sensor(context) is None
    assert store.read_meta(run_id).status is RunStatus.running
