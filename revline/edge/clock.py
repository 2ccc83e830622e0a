"""When to believe the wall clock, and what timestamp a sample gets.

A Raspberry Pi has no real-time clock: it boots at 1970 or at the last shutdown's time
(fake-hwclock) and is put right by NTP later, if a network is there at all. The rule
(``docs/edge.md``):

* The wall clock is *trusted* once the system says it is synchronised (the kernel's
  ``STA_UNSYNC`` bit is clear, or systemd-timesyncd's ``/run/systemd/timesync/synchronized``
  exists), or a GPS fix gave the time. From then on a sample's ``ts`` is its monotonic time plus
  the measured offset ``wall - monotonic``; the offset follows NTP, and a change of more than a
  second is logged as a clock jump.
* Before that, samples are spooled with their monotonic time and the boot they belong to and are
  not sent. When trust comes in the same boot, their ``ts`` is rewritten exactly
  (``mono + offset``). If the device restarts first, the monotonic times mean nothing any more:
  those samples are sent with ``FLAG_CLOCK_UNSYNCED`` and a best-effort ``ts``.

:class:`ClockModel` is pure (no I/O); :class:`SystemClock` reads the real clocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

__all__ = [
    "JUMP_THRESHOLD_US",
    "ClockJump",
    "ClockModel",
    "ClockSource",
    "SystemClock",
    "read_boot_id",
]

JUMP_THRESHOLD_US: Final = 1_000_000
_TIME_ERROR: Final = 5  # adjtimex() return value while the kernel clock is unsynchronised
_TIMESYNCD_FLAG: Final = Path("/run/systemd/timesync/synchronized")


class ClockSource(Protocol):
    """The clocks the model reads; tests inject a fake one that syncs when told to."""

    def mono_ns(self) -> int: ...

    def wall_ns(self) -> int: ...

    def synchronized(self) -> bool: ...


class SystemClock:
    """The machine's clocks; ``synchronized`` asks the kernel (adjtimex) and systemd-timesyncd."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(path, use_errno=True) if path else None

    def mono_ns(self) -> int:
        """Monotonic nanoseconds, the same clock sources stamp readings with."""
        return time.monotonic_ns()

    def wall_ns(self) -> int:
        """UTC nanoseconds as the system believes it."""
        return time.time_ns()

    def synchronized(self) -> bool:
        """True when NTP (or chrony, or timesyncd) has set the clock."""
        if _TIMESYNCD_FLAG.exists():
            return True
        if self._libc is None:
            return False
        # struct timex is ~200 bytes on every ABI; modes=0 (zeroed buffer) only reads the state.
        buf = ctypes.create_string_buffer(512)
        state = int(self._libc.adjtimex(buf))
        return state not in (-1, _TIME_ERROR)


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    """This boot's random id: monotonic times are comparable only within one boot."""
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class ClockJump:
    """The wall clock moved against the monotonic clock by ``delta_us`` (NTP step, manual set)."""

    delta_us: int
    first_trust: bool
    """True when this is the moment the clock became trusted, not a jump of a trusted clock."""


class ClockModel:
    """Decides a sample's timestamp from monotonic time; pure, fed by :meth:`observe`."""

    def __init__(self, mode: Literal["auto", "trusted", "untrusted"] = "auto") -> None:
        self.mode = mode
        self.offset_us: int | None = None
        """``wall - monotonic`` in µs once trusted; None while the wall clock is not believed."""
        self.source: str = "none"

    @property
    def trusted(self) -> bool:
        """Whether timestamps are real UTC now."""
        return self.offset_us is not None

    def observe(
        self, mono_ns: int, wall_ns: int, *, synchronized: bool, gps_wall_us: int | None = None
    ) -> ClockJump | None:
        """Take one look at the clocks; returns a jump (or the first trust) if the offset moved."""
        candidate: int | None = None
        source = self.source
        mono_us = mono_ns // 1000
        if gps_wall_us is not None:
            candidate, source = gps_wall_us - mono_us, "gps"
        if self.mode == "trusted" or (self.mode == "auto" and synchronized):
            # With NTP in charge, the system clock is the better reference than a GPS fix
            # (whose time is only as good as the receiver's latency).
            candidate, source = wall_ns // 1000 - mono_us, "system"
        elif self.source == "system" and gps_wall_us is None:
            candidate = None  # lost NTP sync: keep the last good offset, monotonic carries on
        if candidate is None:
            return None
        previous = self.offset_us
        # A GPS fix alone never moves an NTP-trusted offset: NTP wins once it has spoken.
        if previous is not None and self.source == "system" and source == "gps":
            return None
        self.offset_us, self.source = candidate, source
        if previous is None:
            return ClockJump(delta_us=0, first_trust=True)
        if abs(candidate - previous) > JUMP_THRESHOLD_US:
            return ClockJump(delta_us=candidate - previous, first_trust=False)
        return None

    def stamp(self, mono_ns: int, wall_ns: int) -> tuple[int, bool]:
        """``(ts_us, trusted)`` for an instant; untrusted ts is the raw wall clock (best effort)."""
        if self.offset_us is None:
            return max(wall_ns // 1000, 0), False
        return mono_ns // 1000 + self.offset_us, True
