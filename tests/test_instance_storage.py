"""The pooled SQLite instance storage: Dagster's own files, readable both ways, and its kept
connections never hold a lock, hide a write from the UI, outlive their file or cross a fork."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from dagster import AssetKey, AssetMaterialization, DagsterInstance
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.instance.ref import InstanceRef

from pipeline_assets.instance_storage import PooledSqliteEventLogStorage
from pipeline_assets.launch import instance_settings

RUN = "9" * 36
PARTITIONS = "run_ids"


def instance_over(home: Path, settings: str, name: str) -> DagsterInstance:
    (home / name).write_text(settings)
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home), config_filename=name))


@pytest.fixture
def instances(tmp_path):
    """(pooled, stock): two instances over the same $DAGSTER_HOME files."""
    pooled = instance_over(tmp_path, instance_settings(tmp_path).decode(), "pooled.yaml")
    stock = instance_over(tmp_path, "telemetry:\n  enabled: false\n", "stock.yaml")
    assert isinstance(pooled.event_log_storage, PooledSqliteEventLogStorage)
    assert type(stock.event_log_storage).__name__ == "SqliteEventLogStorage"
    yield pooled, stock
    pooled.dispose()
    stock.dispose()


def materialization(number: int) -> EventLogEntry:
    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
        job_name="release",
        event_specific_data=StepMaterializationData(
            AssetMaterialization(AssetKey(["districts", f"area_{number}"]), partition="p", metadata={"n": number})
        ),
    )
    return EventLogEntry(user_message="", level=10, job_name="release", run_id=RUN, error_info=None,
                         timestamp=time.time(), dagster_event=event)


def stored_numbers(instance: DagsterInstance) -> list[int]:
    return sorted(
        record.dagster_event.event_specific_data.materialization.metadata["n"].value
        for record in instance.all_logs(RUN, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    )


def test_pooled_and_stock_storage_read_each_others_records(instances):
    pooled, stock = instances
    for number in range(3):
        pooled.handle_new_event(materialization(number))
    pooled.add_dynamic_partitions(PARTITIONS, ["p"])
    assert stored_numbers(stock) == [0, 1, 2]
    assert stock.has_dynamic_partition(PARTITIONS, "p")
    assert stock.get_latest_materialization_event(AssetKey(["districts", "area_2"])) is not None

    stock.handle_new_event(materialization(3))
    stock.add_dynamic_partitions(PARTITIONS, ["q"])
    assert stored_numbers(pooled) == [0, 1, 2, 3]
    assert pooled.get_dynamic_partitions(PARTITIONS) == ["p", "q"]


def test_a_returned_connection_holds_no_read_lock(instances):
    """An unfinished query must not pin SQLite's WAL: a full checkpoint from another connection
    (what a writer needs to reset the log) succeeds at once."""
    pooled, _ = instances
    for number in range(20):
        pooled.handle_new_event(materialization(number))
    storage = pooled.event_log_storage
    with storage.index_connection() as conn:
        unfinished = conn.exec_driver_sql("SELECT id FROM event_logs")
        unfinished.fetchone()
    other = sqlite3.connect(storage.path_for_shard("index"), timeout=0)
    busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    other.close()
    assert busy == 0
    assert unfinished is not None  # still referenced: only closing its cursor released the snapshot


def test_each_commit_reaches_the_run_file_that_the_ui_watches(instances):
    """Dagster streams a run's events to the UI by watching the run's .db file; with a connection
    kept open the commits would otherwise stay in the WAL file."""
    pooled, stock = instances
    pooled.handle_new_event(materialization(0))  # the run's file exists before the watch starts
    seen, all_seen = [], threading.Event()

    def on_event(entry, cursor):
        seen.append(entry)
        if len(seen) >= 4:
            all_seen.set()

    stock.watch_event_logs(RUN, None, on_event)
    time.sleep(0.5)  # the watcher thread starts
    for number in range(1, 4):
        pooled.handle_new_event(materialization(number))
        time.sleep(0.2)
    assert all_seen.wait(10), f"the watcher saw {len(seen)} of 4 events"


def test_a_run_file_removed_elsewhere_is_reopened(instances):
    """A wipe in another process unlinks the run's files; later writes must land in the new file,
    not in the unlinked one the kept connection still points at."""
    pooled, stock = instances
    pooled.handle_new_event(materialization(0))
    shard = Path(pooled.event_log_storage.path_for_shard(RUN))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{shard}{suffix}").unlink(missing_ok=True)
    pooled.handle_new_event(materialization(1))
    assert shard.exists()
    assert stored_numbers(stock) == [1]


def test_a_forked_child_writes_through_connections_of_its_own(instances):
    pooled, stock = instances
    pooled.handle_new_event(materialization(0))
    storage = pooled.event_log_storage
    url = storage.conn_string_for_shard(RUN)
    parent_engine, _ = storage._engines.get(url)
    child = os.fork()
    if child == 0:  # the child: its own engine, then a write
        code = 1
        try:
            engine, new = storage._engines.get(url)
            pooled.handle_new_event(materialization(1))
            code = 0 if new and engine is not parent_engine else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert storage._engines.get(url) == (parent_engine, False)  # the parent keeps its own
    pooled.handle_new_event(materialization(2))
    assert stored_numbers(stock) == [0, 1, 2]
