"""A real ELM327 emulator (``python -m elm``, PyPI ELM327-emulator) for the OBD source tests.

The emulator runs in batch mode: it prints its pseudo-tty to a file and executes commands read
from its stdin (its own interpreter: ``scenario car``, ``engineoff``, or Python statements such as
setting the stored DTCs). A stable symlink points at the current pty, as ``/dev/rfcomm0`` would,
so a restarted emulator appears at the same path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class Elm327Emulator:
    """One ``python -m elm -s car`` process; ``link`` is a stable path to its serial port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.link = workdir / "obd-adapter"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pty = ""
        self._runs = 0

    def start(self, *, net_port: int | None = None, dtcs: tuple[str, ...] = ()) -> None:
        """Start an emulator (on a pty, or on TCP ``net_port``); point ``link`` at its pty."""
        self._runs += 1
        out = self.workdir / f"elm-{self._runs}.out"
        cmd = [sys.executable, "-m", "elm", "-s", "car", "-b", str(out)]
        if net_port is not None:
            cmd += ["-n", str(net_port)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=self.workdir,  # it writes elm.log where it runs
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"emulator exited with {self.proc.returncode}")
            text = out.read_text() if out.exists() else ""
            if net_port is not None and "STARTED" in text:
                break  # in TCP mode no pty is printed
            first = text.splitlines()[:1]
            if net_port is None and first and first[0].strip():
                self.pty = first[0].strip()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("emulator did not report its port")
        if dtcs:
            self.set_dtcs(*dtcs)
        if net_port is None:
            tmp = self.workdir / "link.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.pty)
            os.replace(tmp, self.link)  # atomic, like udev re-creating /dev/rfcomm0
        # In TCP mode no probe connection: the emulator serves one client at a time, and the
        # transport under test retries a refused connection on its own anyway.

    def command(self, line: str) -> None:
        """Send one line to the emulator's interpreter."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def set_dtcs(self, *codes: str) -> None:
        """Store these DTCs (two bytes each, e.g. '0143' = P0143); the MIL follows."""
        # On CAN (ISO 15765-4) a mode 03 answer is 43, a DTC count byte, then the DTCs; the
        # emulator leaves the count out and python-OBD, following the standard, skips that byte.
        # The emulator counts list entries, so glue the count byte to the first one.
        stored = [f"{len(codes):02X}{codes[0]}", *codes[1:]] if codes else []
        self.command(f"import elm.obd_message as m; m.DTC_STORED[:] = {stored!r}")

    def kill(self) -> None:
        """SIGKILL the emulator, like pulling the adapter out of the OBD port."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc = None


@contextlib.contextmanager
def emulator_in(workdir: Path) -> Iterator[Elm327Emulator]:
    """An emulator handle working in ``workdir``; whatever it started is killed on leaving."""
    emulator = Elm327Emulator(workdir)
    try:
        yield emulator
    finally:
        emulator.kill()
