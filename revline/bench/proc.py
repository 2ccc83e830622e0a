"""CPU seconds of processes, read from /proc: the figure a noisy, shared machine does not move
the way it moves wall-clock rates (a busy neighbour slows a run, it does not add to its CPU)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["cpu_seconds", "listener_pid", "parent_pid"]


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


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` of this machine (a private broker or database
    server), found through /proc; None if it is not here or not ours to see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None
