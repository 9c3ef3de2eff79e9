"""Facts about local processes, read from the OS: whether one is alive, and when it started."""

from __future__ import annotations

import os
from pathlib import Path


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux); None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot, so that a reused pid is told apart
    from the process recorded; None where that cannot be read (no such process, no /proc)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # stat field 22


def process_alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        pass
    fields = _proc_stat(pid)
    return not (fields and fields[0] == "Z")


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def process_tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of `pid` and its living descendants (a server and the
    subprocesses it started); 0 for a process that cannot be read."""
    ticks, pending = 0, [pid]
    while pending:
        current = pending.pop()
        fields = _proc_stat(current)
        if fields:
            ticks += int(fields[11]) + int(fields[12])  # stat fields 14 and 15: utime, stime
        pending += _children(current)
    return ticks / os.sysconf("SC_CLK_TCK")
