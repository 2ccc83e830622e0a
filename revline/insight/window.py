"""Which samples to re-read, and which stored rows to replace, after a write: pure.

A write touched ``[lo, hi]`` of a vehicle. Samples further apart than ``reach`` never belong to
the same trip or episode (:attr:`Thresholds.reach_s`), so new samples can only change the stored
items (trips, events) within reach of the span, and those they merge with. :func:`widen` grows
the span over such items until none is left within reach (the caller asks its store again after
each step). Then :func:`window`: the **core** (the span plus a reach on each side) is where
stored items are replaced by recomputed ones; the **read** range adds the margin
(:attr:`Thresholds.margin_s`) so that a piece never stored (shorter than its minimum) that the
new samples extend is read whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from revline.insight.thresholds import Thresholds

__all__ = ["Window", "meets", "reach_us", "widen", "window"]

_US: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Window:
    """Microsecond bounds of one recompute."""

    core_lo: int
    core_hi: int
    read_lo: int
    read_hi: int


def meets(lo: int, hi: int, start: int, end: int) -> bool:
    """True when ``[start, end]`` and ``[lo, hi]`` share an instant."""
    return end >= lo and start <= hi


def widen(lo: int, hi: int, found: Iterable[tuple[int | None, int | None]]) -> tuple[int, int]:
    """``[lo, hi]`` grown over the extents ``found`` within reach of it (None: nothing)."""
    for start, end in found:
        if start is not None:
            lo = min(lo, start)
        if end is not None:
            hi = max(hi, end)
    return lo, hi


def window(lo: int, hi: int, t: Thresholds) -> Window:
    """The core and read range of the widened span ``[lo, hi]``."""
    reach = int(t.reach_s * _US)
    margin = int(t.margin_s * _US)
    return Window(lo - reach, hi + reach, lo - margin, hi + margin)


def reach_us(t: Thresholds) -> int:
    """:attr:`Thresholds.reach_s` in microseconds."""
    return int(t.reach_s * _US)
