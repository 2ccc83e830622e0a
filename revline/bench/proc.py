"""CPU seconds of processes, read from /proc: the figure a noisy, shared machine does not move
the way it moves wall-clock rates (a busy neighbour slows a run, it does not add to its CPU)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["cpu_seconds", "parent_pid"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children that are still running or were waited
    for (from /proc), so a run's CPU is the whole process tree's."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    # Children are listed per thread (a supervisor may start them from a thread).
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids.extend(int(child) for child in (task / "children").read_text().split())
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += sum(int(x) for x in fields[11:15]) / ticks  # utime stime cutime cstime
    return total


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (a PostgreSQL backend's parent is the postmaster)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
