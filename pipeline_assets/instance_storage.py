"""Dagster's SQLite instance storage with each database's connection kept open between uses.

Dagster's SQLite run and event-log storages build a new SQLAlchemy engine and open a new SQLite
connection for every read and write, and SQLite re-reads the schema on each new connection: about
6 of the 8 ms that storing one materialization costs on this kind of machine. A release stores about
1,500 such events (a planned event, an output and a materialization for each of its 489 area
assets) and looks up the run_id partition in the event log's index twice per output. This storage
keeps one idle connection per database file instead. The files, schema, journal modes and locking are
Dagster's own, so an instance can switch to it or back at any time (`storage: custom:` in
dagster.yaml, which `usdata-pipeline` writes for a new $DAGSTER_HOME).

A kept connection must never keep a read snapshot: SQLite holds one for as long as any statement is
unfinished, even past a rollback, and in WAL mode (Dagster's) that stops every checkpoint from
finishing, so the log grows and the run's file, which the UI watches, stops changing. So every
cursor a connection opened is closed when it goes back to the pool.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

from dagster import StringSource
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import NullPool, QueuePool

# Engines kept per storage: the index, the run database and the runs a process is writing or
# watching; the least recently used beyond this is closed (a webserver browses many runs).
KEPT_DATABASES = 16
_OPEN_CURSORS = "usdata_open_cursors"


def _file_identity(url: str) -> tuple[int, int] | None:
    """(device, inode) of the database file at `url`; None while there is no file."""
    try:
        stat = os.stat(make_url(url).database)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _pooled_engine(url: str, checkpoint_each_commit: bool) -> Engine:
    """One kept connection (more only while nested uses overlap), whose cursors are all closed when
    it is returned, so that no unfinished statement keeps a read snapshot. Dagster's databases
    are in WAL mode; with `checkpoint_each_commit` each commit reaches the database file itself, as
    it does when Dagster closes its connection, because Dagster watches a run's file (not its WAL)
    to stream the run's events to the UI."""
    engine = create_engine(
        url,
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=8,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
    )

    if checkpoint_each_commit:

        @event.listens_for(engine, "connect")
        def checkpoint_after_commits(dbapi_connection, connection_record):
            dbapi_connection.execute("PRAGMA wal_autocheckpoint=1")

    @event.listens_for(engine, "after_cursor_execute")
    def remember_cursor(conn, cursor, statement, parameters, context, executemany):
        conn.info.setdefault(_OPEN_CURSORS, []).append(cursor)

    @event.listens_for(engine, "checkin")
    def close_cursors(dbapi_connection, connection_record):
        for cursor in connection_record.info.pop(_OPEN_CURSORS, ()):
            cursor.close()

    return engine


def _release(engine: Engine, pid: int) -> None:
    """Drop an engine's connections: closed in the process that opened them, only forgotten in a
    forked child (closing there would disturb the parent's)."""
    engine.dispose(close=pid == os.getpid())


class _Engines:
    """Engines by database URL, least recently used first. An engine is replaced when its file was
    replaced or removed (a wipe, here or in another process) and after a fork (a child must not
    share its parent's SQLite connections)."""

    def __init__(self):
        self._engines: OrderedDict[str, tuple[Engine, tuple[int, int] | None, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str, checkpoint_each_commit: bool = False) -> tuple[Engine, bool]:
        """The engine for `url`, and whether it is new (its database may need creating)."""
        identity = _file_identity(url)
        with self._lock:
            kept = self._engines.pop(url, None)
            if kept is not None:
                engine, kept_identity, pid = kept
                if kept_identity == identity and identity is not None and pid == os.getpid():
                    self._engines[url] = kept
                    return engine, False
                _release(engine, pid)
            engine = _pooled_engine(url, checkpoint_each_commit)
            self._engines[url] = (engine, identity, os.getpid())
            while len(self._engines) > KEPT_DATABASES:
                _, (old, _, pid) = self._engines.popitem(last=False)
                _release(old, pid)
            return engine, True

    def note_created(self, url: str) -> None:
        """Record the identity of a file the engine has just created."""
        with self._lock:
            if url in self._engines:
                engine, _, pid = self._engines[url]
                self._engines[url] = (engine, _file_identity(url), pid)

    def dispose(self) -> None:
        with self._lock:
            for engine, _, pid in self._engines.values():
                _release(engine, pid)
            self._engines.clear()


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's run-sharded SQLite event log, keeping each shard's connection open."""

    def __init__(self, base_dir: str, inst_data=None):
        self._engines = _Engines()
        self._tables_present: set[str] = set()
        super().__init__(base_dir, inst_data)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            url = self.conn_string_for_shard(shard)
            engine, new = self._engines.get(url, checkpoint_each_commit=shard != INDEX_SHARD_NAME)
            if new:
                self._initialized_dbs.discard(shard)
            if shard not in self._initialized_dbs:  # as Dagster does it, on connections of its own
                init_engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
                self._initdb(init_engine)
                init_engine.dispose()
                self._initialized_dbs.add(shard)
                self._engines.note_created(url)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def has_table(self, table_name: str) -> bool:
        """Dagster asks before each asset event and each partition lookup, on a new engine each time;
        a table, once there, stays (migrations only add them)."""
        if table_name in self._tables_present:
            return True
        engine, _ = self._engines.get(self.conn_string_for_shard(INDEX_SHARD_NAME))
        with engine.connect() as conn:  # not _connect: Dagster asks while holding _db_lock
            present = bool(engine.dialect.has_table(conn, table_name))
        if present:
            self._tables_present.add(table_name)
        return present

    def wipe(self) -> None:
        self._engines.dispose()
        super().wipe()

    def dispose(self) -> None:
        self._engines.dispose()
        super().dispose()


class PooledSqliteRunStorage(SqliteRunStorage):
    """Dagster's SQLite run storage (runs, their tags and status), keeping its connection open."""

    def __init__(self, conn_string: str, inst_data=None):
        self._engines = _Engines()
        super().__init__(conn_string, inst_data)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        engine, _ = self._engines.get(self._conn_string)
        with engine.connect() as conn:
            with conn.begin():
                yield conn

    def dispose(self) -> None:
        self._engines.dispose()
        super().dispose()


class PooledSqliteStorage(DagsterSqliteStorage):
    """The default SQLite storage's layout under base_dir (Dagster's default is $DAGSTER_HOME), with
    the run and event-log storages above. In dagster.yaml:

        storage:
          custom:
            module: pipeline_assets.instance_storage
            class: PooledSqliteStorage
            config:
              base_dir: /absolute/path/to/dagster_home
    """

    def __init__(self, base_dir: str, inst_data=None):
        self.base_dir = base_dir
        self._run_storage = PooledSqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = PooledSqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()  # DagsterStorage's set-up: the parent's opens the stock storages

    @classmethod
    def config_type(cls):
        return {"base_dir": StringSource}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        base_dir = os.path.abspath(config_value["base_dir"])
        os.makedirs(base_dir, exist_ok=True)
        return cls(base_dir, inst_data)
