"""The production instance: its dagster.yaml, Dagster on PostgreSQL, and dagster-daemon starting
releases from the git sensor, the launchpad and the command line through the queue, within the
release-run limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterRunStatus, QueuedRunCoordinator, RunsFilter, instance_for_test
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

from pipeline_assets import production_instance
from pipeline_assets.jobs import JOB_TAG, RELEASE_JOB, release_job
from pipeline_assets.partitions import RUN_IDS
from pipeline_assets.production_instance import PASSWORD_VARIABLE, ProductionInstance
from resources.git import SOURCE_ROOT, running_code_sha
from resources.run_store import LocalRunStore
from tests.postgres import PostgresDatabase
from tests.processes import stop_process_group

BIN = Path(sys.executable).parent
RUNS_TIMEOUT_S = 600  # two tiny releases one after the other
RELEASE_LIMIT = 1


def production(database: PostgresDatabase, over_socket: bool = False, **limits) -> ProductionInstance:
    server = database.server
    return ProductionInstance(hostname=str(server.socket_dir) if over_socket else server.host, port=server.port,
                              db_name=database.db_name, username=server.username, **limits)


def test_the_settings_name_postgres_and_the_queue_and_hold_no_password():
    instance = ProductionInstance(hostname="db.internal", db_name="dagster", username="usdata", release_runs=2)
    settings = instance.settings()
    document = yaml.safe_load(settings)
    assert document["storage"]["postgres"]["postgres_db"] == {
        "username": "usdata", "password": {"env": PASSWORD_VARIABLE}, "db_name": "dagster", "port": 5432, "hostname": "db.internal",
        "scheme": "postgresql+psycopg2",
    }
    coordinator = document["run_coordinator"]
    assert (coordinator["module"], coordinator["class"]) == ("dagster", "QueuedRunCoordinator")
    assert coordinator["config"] == {"max_concurrent_runs": 4, "tag_concurrency_limits": [
        {"key": JOB_TAG, "value": RELEASE_JOB, "limit": 2}]}
    assert document["telemetry"] == {"enabled": False} and "run_launcher" not in document


@pytest.mark.parametrize("argv, fragment", [
    (["--port", "70000"], "port=70000"),
    (["--release-runs", "0"], "release_runs=0"),
    (["--release-runs", "5"], "release_runs=5 is above max_concurrent_runs=4"),
    (["--db-name", ""], "db_name=''"),
])
def test_bad_settings_are_one_line_errors_and_nothing_is_written(tmp_path, capsys, argv, fragment):
    base = ["--home", str(tmp_path / "home"), "--hostname", "db", "--db-name", "dagster", "--username", "u"]
    with pytest.raises(SystemExit) as exit_:
        production_instance.main(base + argv)
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "home").exists()


def test_an_existing_instance_is_never_rewritten(tmp_path, capsys):
    (tmp_path / "dagster.yaml").write_text("telemetry: {enabled: true}\n")
    with pytest.raises(SystemExit):
        production_instance.main(["--home", str(tmp_path), "--hostname", "db", "--db-name", "d", "--username", "u"])
    assert "exists" in capsys.readouterr().err and (tmp_path / "dagster.yaml").read_text() == "telemetry: {enabled: true}\n"


@pytest.mark.parametrize("over_socket", [False, True], ids=["tcp", "unix_socket"])
def test_the_instance_stores_runs_in_postgres(postgres_database, tmp_path, monkeypatch, over_socket):
    monkeypatch.setenv(PASSWORD_VARIABLE, postgres_database.server.password)
    settings = yaml.safe_load(production(postgres_database, over_socket).settings())
    with instance_for_test(overrides=settings, temp_dir=str(tmp_path)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        instance.add_dynamic_partitions(RUN_IDS, ["1.0.0_a1b2c3d4_20260101_000000"])
    with postgres_database.server.connect(postgres_database.db_name) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT partition FROM dynamic_partitions")
        assert cursor.fetchall() == [("1.0.0_a1b2c3d4_20260101_000000",)]


# --- the daemon: the queue within the limit --------------------------------------------------------
def production_environment(home: Path, store: Path, password: str, sha: str) -> dict:
    """What the daemon (and the code server and run workers it starts) and the command line see:
    this checkout first on the path, the production instance, and a git sensor watching this
    checkout at `sha` (a fixed ref: one run, however the branch moves meanwhile), at tiny scale,
    with `sha` as the running code's (as an image pins it), so no run meets version skew."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
        "DAGSTER_HOME": str(home),
        PASSWORD_VARIABLE: password,
        "PIPELINE_STORE": str(store),
        "PIPELINE_WATCH_REPO": str(SOURCE_ROOT),
        "PIPELINE_WATCH_BRANCH": sha,
        "PIPELINE_WATCH_SCALE": "tiny",
        "PIPELINE_CODE_SHA": sha,
    }


@contextmanager
def background(command: list[str], environment: dict, log: Path):
    """`command` run from the checkout, its output in `log`; killed by its PID (its process group:
    a daemon's code server and run workers too) when it has not ended by itself."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=SOURCE_ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        stop_process_group(process, grace_s=30)


def dagster_cli(environment: dict, *args: str) -> None:
    subprocess.run([str(BIN / "dagster"), *args, "-w", "workspace.yaml"], cwd=SOURCE_ROOT, env=environment,
                   check=True, capture_output=True, timeout=300)


def most_started_at_once(records) -> int:
    """The most runs whose start-to-end intervals overlap at one moment."""
    moments = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records], key=lambda m: (m[0], m[1]))
    running = most = 0
    for _, change in moments:
        running += change
        most = max(most, running)
    return most


def wait_for_release_runs(instance, count: int, daemon: subprocess.Popen, log: Path):
    deadline = time.monotonic() + RUNS_TIMEOUT_S
    while time.monotonic() < deadline:
        records = instance.get_run_records(RunsFilter(job_name=RELEASE_JOB))
        if len(records) == count and all(r.dagster_run.is_finished for r in records):
            return records
        assert daemon.poll() is None, f"dagster-daemon exited: {log.read_text()[-2000:]}"
        time.sleep(2)
    pytest.fail(f"{count} release runs not finished in {RUNS_TIMEOUT_S}s: "
                f"{[(r.dagster_run.run_id[:8], r.dagster_run.status.value) for r in records]}")


def test_sensor_and_cli_releases_at_once_queue_within_the_release_limit(postgres_database, tmp_path, monkeypatch):
    """Two release runs submitted at once, by the git sensor and by `usdata-pipeline run` (which
    submits as the UI's launchpad does): both complete, each through the queue, one at a time."""
    assert release_job.tags.get(JOB_TAG) == RELEASE_JOB, \
        f"the release job must tag its runs {JOB_TAG}={RELEASE_JOB}: the queue limits release runs by it"
    store = LocalRunStore(tmp_path / "store")
    home = tmp_path / "dagster_home"
    home.mkdir()
    sha = running_code_sha()
    environment = production_environment(home, store.root, postgres_database.server.password, sha)
    settings = yaml.safe_load(production(postgres_database, over_socket=True, max_concurrent_runs=3,
                                         release_runs=RELEASE_LIMIT).settings())
    monkeypatch.setenv(PASSWORD_VARIABLE, postgres_database.server.password)
    with instance_for_test(overrides=settings, temp_dir=str(home)) as instance, \
            background([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], environment, tmp_path / "daemon.log") as daemon, \
            background([str(BIN / "usdata-pipeline"), "run", "--scale", "tiny"], environment, tmp_path / "cli.log") as cli:
        dagster_cli(environment, "sensor", "start", "git_commit_sensor")
        records = wait_for_release_runs(instance, 2, daemon, tmp_path / "daemon.log")
        assert cli.wait(timeout=60) == 0, (tmp_path / "cli.log").read_text()[-2000:]
        assert [r.dagster_run.status for r in records] == [DagsterRunStatus.SUCCESS] * 2, \
            [r.dagster_run.run_id for r in records]
        assert [r.dagster_run.tags.get("dagster/sensor_name") for r in records].count("git_commit_sensor") == 1
        assert all(r.dagster_run.tags[JOB_TAG] == RELEASE_JOB for r in records)
        assert most_started_at_once(records) <= RELEASE_LIMIT
        for record in records:  # each went through the queue
            assert instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.RUN_ENQUEUED)
