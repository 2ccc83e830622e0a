"""Which PIDs to query when, and how a python-OBD answer becomes a contract field. Pure: no I/O.

The OBD source (serial, RFCOMM or BLE through a pty bridge) uses this one module for its PID
logic, so every transport samples the same way.

Scheduling: an ELM327 answers one PID at a time (~30-100 ms each over Bluetooth), so the fast
group (rpm, speed, throttle...) is queried on every tick at ``fast_hz`` and the slow group
(coolant, fuel, voltage...) is spread over the ticks, a few at a time, each PID once per
``slow_every_s``. Spreading keeps the fast rate steady instead of stalling it every few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from revline.fields import FIELDS

__all__ = [
    "FIELD_BY_PID",
    "UNIT_BY_PID",
    "PidSchedule",
    "convert",
    "split_supported",
]

FIELD_BY_PID: Final[Mapping[str, str]] = {f.obd: f.name for f in FIELDS if f.obd is not None}
"""python-OBD command name -> ``revline.contract.Sample`` field; other PIDs go to ``extra``."""

UNIT_BY_PID: Final[Mapping[str, str]] = {
    f.obd: f.obd_unit for f in FIELDS if f.obd is not None and f.obd_unit is not None
}
"""The unit each contract field is stored in, as a pint unit name of python-OBD's registry."""


def _magnitude(value: object, unit: str | None) -> float | None:
    # python-OBD answers with pint Quantities; converting (not just taking the magnitude) keeps
    # the contract's units even if a decoder ever returns, say, mph or kPa-based scales.
    to = getattr(value, "to", None)
    if to is not None:
        quantity = to(unit) if unit is not None else value
        value = getattr(quantity, "magnitude", None)
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def convert(pid: str, value: object) -> tuple[str, float, bool] | None:
    """``(key, number, is_extra)`` for a decoded answer; None when it has no single number.

    ``key`` is the contract field for the mapped PIDs (converted to the contract unit), otherwise
    the PID's own name for ``extra``.
    """
    name = FIELD_BY_PID.get(pid)
    number = _magnitude(value, UNIT_BY_PID.get(pid))
    if number is None:
        return None
    if name is None:
        return pid, number, True
    return name, number, False


def split_supported(wanted: Iterable[str], supported: set[str]) -> tuple[list[str], list[str]]:
    """The wanted PIDs the car supports, and those it does not, each in the order given."""
    kept: list[str] = []
    dropped: list[str] = []
    for pid in dict.fromkeys(wanted):
        (kept if pid in supported else dropped).append(pid)
    return kept, dropped


@dataclass
class PidSchedule:
    """Which PIDs to query on each tick: all fast ones, and the slow ones that are due.

    Time is passed in (seconds, any monotonic origin), so the schedule is tested without clocks.
    """

    fast: Sequence[str]
    slow: Sequence[str]
    fast_hz: float
    slow_every_s: float
    _due: dict[str, float] = field(default_factory=dict, init=False)
    _per_tick: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if self.fast_hz <= 0 or self.slow_every_s <= 0:
            raise ValueError("fast_hz and slow_every_s must be > 0")
        # Enough slow PIDs per tick that each one is still read once per period.
        ticks_per_period = max(1.0, self.slow_every_s * self.fast_hz)
        self._per_tick = max(1, math.ceil(len(self.slow) / ticks_per_period))

    @property
    def interval_s(self) -> float:
        """Seconds between two ticks."""
        return 1.0 / self.fast_hz

    def tick(self, now_s: float) -> list[str]:
        """The PIDs to query now. Every slow PID is read at the first tick, then once per period."""
        names = list(self.fast)
        if not self._due:
            # A fresh connection reports a full state at once, then settles into the spread.
            take = list(self.slow)
        else:
            due = sorted((when, pid) for pid, when in self._due.items() if when <= now_s)
            take = [pid for _, pid in due[: self._per_tick]]
        for pid in take:
            if pid not in names:
                names.append(pid)
            self._due[pid] = now_s + self.slow_every_s
        return names
