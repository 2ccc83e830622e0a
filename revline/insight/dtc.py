"""Trouble-code events from the sets a vehicle reported: pure.

The edge sends the full set of stored and pending codes whenever it changes (``Sample.dtc``, an
empty list when cleared). A code present in a report and absent from the one before opens an
event (``first_seen``); absent from a later report, the event is ``cleared`` at that report. The
events are a function of the reports in time order, so reports arriving late or twice give the
same events once re-derived.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["DtcEvent", "dtc_events"]


@dataclass(frozen=True, slots=True)
class DtcEvent:
    """One row of ``dtc_events`` (times in µs; ``cleared`` None while active)."""

    code: str
    first_seen: int
    last_seen: int
    cleared: int | None


def dtc_events(reports: Iterable[tuple[int, Sequence[str]]]) -> list[DtcEvent]:
    """The events of ``(ts, codes)`` reports, which must be in time order."""
    open_: dict[str, list[int]] = {}
    out: list[DtcEvent] = []
    for ts, codes in reports:
        present = set(codes)
        for code in sorted(open_.keys() - present):
            first, last = open_.pop(code)
            out.append(DtcEvent(code, first, last, ts))
        for code in present:
            if code in open_:
                open_[code][1] = ts
            else:
                open_[code] = [ts, ts]
    out.extend(DtcEvent(code, first, last, None) for code, (first, last) in open_.items())
    return sorted(out, key=lambda e: (e.first_seen, e.code))
