"""A throwaway PostgreSQL server for the production-instance tests: Debian's `postgresql` binaries, a
cluster under a temporary directory, listening on a free port of 127.0.0.1 and on a Unix socket in
that directory only, with a generated password (scram-sha-256) over TCP and the socket's file
permissions for local connections (trust, as a single-host deployment's peer authentication does
without a system user per role), stopped by its PID at the end.

initdb and postgres refuse to run as root (CI runs as root): there they run as `nobody`, through
runuser, on a directory handed to that user. Where the server is not installed the fixtures skip
(`.ci/run` installs it, so in CI they run).

tests/conftest.py registers the fixtures (pytest_plugins) for every test module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg2
import pytest

from tests.processes import free_port

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "usdata"
START_TIMEOUT_S = 30


@dataclass(frozen=True)
class PostgresServer:
    """How to reach the server: TCP at host:port, or the Unix socket in socket_dir (same port)."""

    host: str
    port: int
    socket_dir: Path
    username: str
    password: str

    def connect(self, db_name: str = "postgres"):
        return psycopg2.connect(host=self.host, port=self.port, user=self.username, password=self.password, dbname=db_name)


@dataclass(frozen=True)
class PostgresDatabase:
    server: PostgresServer
    db_name: str


class PostgresUnavailable(RuntimeError):
    """The server cannot run here; the message says why."""


def server_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: pg_config's bindir, else the newest Debian version's."""
    candidates = []
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(Path(bindir))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates.extend(reversed(versions))
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def as_server_user(command: list[str]) -> list[str]:
    """`command` as the user the server may run as: ourselves, or `nobody` when we are root."""
    return ["runuser", "-u", UNPRIVILEGED_USER, "--", *command] if os.geteuid() == 0 else command


def run_as_server_user(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(as_server_user(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise PostgresUnavailable(f"{Path(command[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    return done


def postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


@contextmanager
def throwaway_server() -> Iterator[PostgresServer]:
    """initdb a cluster in a temporary directory and start it; stop it by PID (pg_ctl stop) at the end.
    The benches use it too."""
    bindir = server_bindir()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL's server is not installed (no initdb/pg_ctl under `pg_config --bindir` "
                                  "or /usr/lib/postgresql/*/bin): `.ci/run` installs Debian's postgresql")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        raise PostgresUnavailable("running as root without runuser: initdb and postgres refuse root")
    root = Path(tempfile.mkdtemp(prefix="usdata-pg-"))  # short: a Unix socket's path has a length limit
    data, password = root / "data", secrets.token_hex(16)
    (root / "password").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(root, UNPRIVILEGED_USER)
        shutil.chown(root / "password", UNPRIVILEGED_USER)
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
    try:
        run_as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth-host=scram-sha-256",
                            "--auth-local=trust",
                            f"--pwfile={root / 'password'}", "-E", "UTF8", "--no-sync"])
        (root / "password").unlink()
        run_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                            "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start"])
        yield PostgresServer("127.0.0.1", port, root, SUPERUSER, password)
    finally:
        pid = postmaster_pid(data)
        if pid is not None:
            try:
                run_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
            except PostgresUnavailable:
                os.kill(pid, signal.SIGQUIT)  # the postmaster's immediate shutdown
        shutil.rmtree(root, ignore_errors=True)


def administer(server: PostgresServer, statement: str) -> None:
    """One statement outside a transaction (CREATE and DROP DATABASE cannot run in one)."""
    admin = server.connect()
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(statement)
    finally:
        admin.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session; the tests skip where it cannot run."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_server())
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
        yield server


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A new, empty database per test (tests never see each other's runs), dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    administer(postgres_server, f'CREATE DATABASE "{name}"')
    yield PostgresDatabase(postgres_server, name)
    administer(postgres_server, f'DROP DATABASE "{name}" WITH (FORCE)')  # FORCE: a killed daemon's connections linger
