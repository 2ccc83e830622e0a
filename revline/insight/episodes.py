"""Health and driving events: pure detectors over one vehicle's samples in time order.

- **coolant_hot**: coolant above ``coolant_hot_c`` for at least ``coolant_min_s``;
- **battery_low**: control module voltage below ``battery_low_v`` for at least ``battery_min_s``;
- **hard_brake** / **hard_accel**: the speed change over ``harsh_window_s`` beyond
  ``hard_brake_ms2`` / ``hard_accel_ms2``, judged only where speed comes at ``harsh_min_hz`` or
  faster (at 1 Hz a brake and a tunnel look alike).

An episode is a run of readings beyond the threshold with no reading back within it and no two
readings further apart than ``episode_gap_s`` (hard events: than the window). Like the trips, the
events are a function of the set of samples, so the server can recompute a window. The
detectors are part of :class:`revline.insight.stream.Fold`; :func:`events` runs it over a list.
"""

from __future__ import annotations

from collections.abc import Sequence

from revline.insight.stream import EventOut, Fold, Point, TripOut
from revline.insight.thresholds import Thresholds

__all__ = ["Event", "events"]


Event = EventOut
"""One episode (the ``vehicle_events`` table's columns, times in µs)."""


def events(points: Sequence[Point], t: Thresholds) -> list[Event]:
    """Every event in ``points`` (one vehicle, sorted by time), ordered by start."""
    fold = Fold()
    ignored: list[TripOut] = []
    found: list[EventOut] = []
    for point in points:
        fold.feed(point, t, ignored, found)
    found += fold.finish(t, None)[1]
    return sorted(found, key=lambda e: (e.start, e.kind))
