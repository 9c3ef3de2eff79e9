"""The processes a test starts: a free port on 127.0.0.1 to bind, stopping servers by the PID it holds,
and finding a run's processes by the store in their environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Terminate the process we started (started with start_new_session), then kill what is left of
    its session: the code servers and run workers a webserver or daemon started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    name: str
    cmdline: str


def processes_of(store: Path) -> list[Proc]:
    """The live processes whose environment carries this store: every process of a run started
    with it (the orchestrator, the forkserver, the resource tracker, step processes, pool workers)."""
    marker = f"PIPELINE_STORE={store}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            found.append(Proc(int(entry.name), int(ppid), name, cmdline))
    return found


def wait_no_process_left(store: Path, timeout: float = 60) -> list[Proc]:
    """The run's processes still alive after `timeout` s (none: all gone). A code server shuts down
    on its own poll once its runs have ended, which a loaded machine can stretch to tens of seconds."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(store)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
