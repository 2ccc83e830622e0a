"""Health and driving events: pure detectors over one vehicle's samples in time order.

- **coolant_hot**: coolant above ``coolant_hot_c`` for at least ``coolant_min_s``;
- **battery_low**: control module voltage below ``battery_low_v`` for at least ``battery_min_s``;
- **hard_brake** / **hard_accel**: the speed change over ``harsh_window_s`` beyond
  ``hard_brake_ms2`` / ``hard_accel_ms2``, judged only where speed comes at ``harsh_min_hz`` or
  faster (at 1 Hz a brake and a tunnel look alike).

An episode is a run of readings beyond the threshold with no reading back within it and no two
readings further apart than ``episode_gap_s`` (hard events: than the window). Like the trips, the
events are a function of the set of samples, so the server can recompute a window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from revline.insight.segment import Point
from revline.insight.thresholds import Thresholds

__all__ = ["Event", "events", "harsh_events", "threshold_episodes"]

_US: Final = 1_000_000
_KMH_TO_MS: Final = 1 / 3.6


@dataclass(frozen=True, slots=True)
class Event:
    """One episode (the ``vehicle_events`` table's columns, times in µs)."""

    kind: str
    start: int
    end: int
    peak: float
    threshold: float
    lat: float | None = None
    lon: float | None = None


def threshold_episodes(
    points: Sequence[Point],
    kind: str,
    value: Callable[[Point], float | None],
    beyond: Callable[[float], bool],
    *,
    threshold: float,
    min_s: float,
    gap_s: float,
    worse: Callable[[float, float], float],
) -> list[Event]:
    """Runs of readings ``beyond`` the threshold lasting at least ``min_s``; ``worse`` picks the
    peak (max for a temperature, min for a voltage)."""
    out: list[Event] = []
    run: list[Point] = []
    peak = 0.0
    gap_us = gap_s * _US

    def close() -> None:
        if run and run[-1].ts - run[0].ts >= min_s * _US:
            out.append(Event(kind, run[0].ts, run[-1].ts, peak, threshold, run[0].lat, run[0].lon))

    previous: Point | None = None
    for point in points:
        v = value(point)
        if v is None:
            continue
        if run and previous is not None and point.ts - previous.ts > gap_us:
            close()
            run = []
        if beyond(v):
            peak = v if not run else worse(peak, v)
            run.append(point)
        elif run:
            close()
            run = []
        previous = point
    close()
    return out


def harsh_events(points: Sequence[Point], t: Thresholds) -> list[Event]:
    """Hard braking and acceleration where speed is sampled at ``harsh_min_hz`` or faster."""
    speeds = [p for p in points if p.speed is not None]
    window_us = int(t.harsh_window_s * _US)
    max_step_us = int(1.5 / t.harsh_min_hz * _US)  # 50 % jitter on the sampling period
    out: list[Event] = []
    open_kind: str | None = None
    start = end = 0
    peak = 0.0
    where: Point | None = None
    j = 0  # the window's oldest point
    run_start = 0  # first point after the last step longer than max_step
    for i, p in enumerate(speeds):
        if i and p.ts - speeds[i - 1].ts > max_step_us:
            run_start = i
        j = max(j, run_start)
        while p.ts - speeds[j].ts > window_us:
            j += 1
        kind = None
        accel = 0.0
        old = speeds[j]
        # A full window of dense samples (at least 80 % of it) says how fast the speed changes.
        if i > j and (p.ts - old.ts) >= 0.8 * window_us and p.speed is not None:
            assert old.speed is not None
            accel = (p.speed - old.speed) * _KMH_TO_MS / ((p.ts - old.ts) / _US)
            if accel <= -t.hard_brake_ms2:
                kind = "hard_brake"
            elif accel >= t.hard_accel_ms2:
                kind = "hard_accel"
        if open_kind is not None and (kind != open_kind or p.ts - end > window_us):
            threshold = t.hard_brake_ms2 if open_kind == "hard_brake" else t.hard_accel_ms2
            lat, lon = (where.lat, where.lon) if where else (None, None)
            out.append(Event(open_kind, start, end, round(peak, 3), threshold, lat, lon))
            open_kind = None
        if kind is not None:
            if open_kind is None:
                open_kind, start, peak, where = kind, old.ts, 0.0, old
            peak = max(peak, abs(accel))
            end = p.ts
    if open_kind is not None:
        threshold = t.hard_brake_ms2 if open_kind == "hard_brake" else t.hard_accel_ms2
        lat, lon = (where.lat, where.lon) if where else (None, None)
        out.append(Event(open_kind, start, end, round(peak, 3), threshold, lat, lon))
    return out


def events(points: Sequence[Point], t: Thresholds) -> list[Event]:
    """Every event in ``points`` (one vehicle, sorted by time), ordered by start."""
    found = [
        *threshold_episodes(
            points,
            "coolant_hot",
            lambda p: p.coolant,
            lambda v: v > t.coolant_hot_c,
            threshold=t.coolant_hot_c,
            min_s=t.coolant_min_s,
            gap_s=t.episode_gap_s,
            worse=max,
        ),
        *threshold_episodes(
            points,
            "battery_low",
            lambda p: p.battery,
            lambda v: v < t.battery_low_v,
            threshold=t.battery_low_v,
            min_s=t.battery_min_s,
            gap_s=t.episode_gap_s,
            worse=min,
        ),
        *harsh_events(points, t),
    ]
    return sorted(found, key=lambda e: (e.start, e.kind))
