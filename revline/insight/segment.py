"""Trip segmentation: a pure state machine over one vehicle's samples in time order.

States: **idle** -> **driving** when a sample's speed reaches ``moving_kmh``; driving -> **paused**
when no moving sample came for ``idle_timeout_s`` (the car stands, or samples stopped); paused ->
driving if a moving sample comes within ``resume_window_s`` of the pause, otherwise the trip ended
at its last moving sample and the state is idle. A trip spans its first to its last moving
sample; one shorter than ``min_trip_s`` is not a trip.

So two moving samples belong to the same trip exactly when no stretch longer than
``merge_gap_s`` (idle timeout + resume window) without a moving sample lies between them: the
trips are a function of the SET of samples, whatever order or pieces they arrived in. That is
what lets the server recompute only a window around late data (:mod:`revline.insight.window`).

No I/O; times are integer microseconds, values in the units of :mod:`revline.fields`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final, NamedTuple

from revline.insight.thresholds import Thresholds

__all__ = ["Activity", "Point", "Trip", "activity", "haversine_km", "segment", "trip_of"]

_US: Final = 1_000_000
_EARTH_KM: Final = 6371.0088
_STOICHIOMETRIC: Final = 14.7
"""Petrol: grams of air per gram of fuel."""
_PETROL_G_PER_L: Final = 745.0


class Point(NamedTuple):
    """What the insight policies read of one sample (None: not measured)."""

    ts: int
    speed: float | None = None
    """OBD speed, else GPS speed, km/h."""
    rpm: float | None = None
    coolant: float | None = None
    battery: float | None = None
    fuel: float | None = None
    maf: float | None = None
    lat: float | None = None
    lon: float | None = None
    odometer: float | None = None


@dataclass(frozen=True, slots=True)
class Trip:
    """One trip's summary (the ``trips`` table's columns, times in µs)."""

    start: int
    end: int
    start_lat: float | None
    start_lon: float | None
    end_lat: float | None
    end_lon: float | None
    moving_s: float
    distance_km: float
    distance_source: str
    max_speed: float | None
    max_rpm: float | None
    max_coolant: float | None
    min_battery: float | None
    fuel_used_pct: float | None
    fuel_used_l: float | None
    odometer_start: float | None
    """First OBD odometer reading in the trip (the history may correct it)."""
    odometer_end: float | None
    samples: int
    gap_s: float
    closed: bool

    @property
    def duration_s(self) -> float:
        """End minus start, seconds."""
        return (self.end - self.start) / _US

    @property
    def avg_speed(self) -> float | None:
        """Distance over duration, km/h; None for a trip of no duration."""
        return self.distance_km / self.duration_s * 3600 if self.duration_s > 0 else None

    @property
    def completeness(self) -> float:
        """1 - gaps / duration: 1 for a trip without gaps."""
        return max(0.0, 1 - self.gap_s / self.duration_s) if self.duration_s > 0 else 1.0


@dataclass(frozen=True, slots=True)
class Activity:
    """The state machine at a vehicle's newest sample."""

    state: str
    """``idle``, ``driving`` (the newest speed is moving) or ``paused`` (stopped in a trip)."""
    since: int
    last_ts: int


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two WGS84 positions, km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


def _moving(point: Point, threshold: float) -> bool:
    return point.speed is not None and point.speed >= threshold


def segment(points: Sequence[Point], t: Thresholds, *, data_end: int | None = None) -> list[Trip]:
    """The trips in ``points`` (one vehicle, sorted by time). ``data_end`` is the vehicle's
    newest sample anywhere (default: the last point): a trip that newer moving samples could
    still extend is not ``closed``."""
    if not points:
        return []
    end_of_data = points[-1].ts if data_end is None else max(data_end, points[-1].ts)
    idle_us = int(t.idle_timeout_s * _US)
    merge_us = int(t.merge_gap_s * _US)
    trips: list[Trip] = []
    state = "idle"
    first = last = -1  # indexes of the open trip's first and last moving samples
    for i, point in enumerate(points):
        moving = _moving(point, t.moving_kmh)
        if state == "driving" and point.ts - points[last].ts > idle_us:
            state = "paused"
        if state == "paused" and point.ts - points[last].ts > merge_us:
            trips.append(trip_of(points, first, last, t, closed=True))
            state = "idle"
        if moving:
            if state == "idle":
                first = i
            last = i
            state = "driving"
    if state != "idle":
        closed = end_of_data - points[last].ts > merge_us
        trips.append(trip_of(points, first, last, t, closed=closed))
    min_us = t.min_trip_s * _US
    return [trip for trip in trips if trip.end - trip.start >= min_us]


def activity(points: Sequence[Point], t: Thresholds) -> Activity | None:
    """The state at the newest of ``points`` (sorted): driving if its latest speed reading is
    moving, paused if a moving sample came within the merge gap, else idle."""
    speeds = [p for p in points if p.speed is not None]
    if not points or not speeds:
        return None
    last_ts = points[-1].ts
    latest = speeds[-1]
    if latest.speed is not None and latest.speed >= t.moving_kmh:
        since = latest.ts
        for p in reversed(speeds):
            if not _moving(p, t.moving_kmh):
                break
            since = p.ts
        return Activity("driving", since, last_ts)
    moving = [p for p in speeds if _moving(p, t.moving_kmh)]
    merge_us = int(t.merge_gap_s * _US)
    if moving and last_ts - moving[-1].ts <= merge_us:
        return Activity("paused", moving[-1].ts, last_ts)
    stopped = moving[-1].ts if moving else points[0].ts
    return Activity("idle", stopped, last_ts)


def _max(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def trip_of(points: Sequence[Point], first: int, last: int, t: Thresholds, *, closed: bool) -> Trip:
    """The summary of ``points[first..last]``, a trip."""
    span = points[first : last + 1]
    gap_us = t.gap_s * _US
    moving_s = gap_total = 0.0
    speed_km = maf_g = 0.0
    for a, b in pairwise(span):
        dt = (b.ts - a.ts) / _US
        if dt * _US > gap_us:
            gap_total += dt
        elif _moving(a, t.moving_kmh):
            moving_s += dt
        if a.speed is not None and b.speed is not None:
            speed_km += (a.speed + b.speed) / 2 * dt / 3600
        if a.maf is not None and b.maf is not None:
            maf_g += (a.maf + b.maf) / 2 * dt
    fixes = [(p.lat, p.lon) for p in span if p.lat is not None and p.lon is not None]
    gps_km = sum(
        haversine_km(a[0], a[1], b[0], b[1]) for a, b in pairwise(fixes)
    )
    if len(fixes) >= 2 and 2 * len(fixes) >= len(span):
        distance, source = gps_km, "gps"
    elif any(p.speed is not None for p in span):
        distance, source = speed_km, "speed"
    else:
        distance, source = 0.0, "none"
    fuel = [p.fuel for p in span if p.fuel is not None]
    odometer = [p.odometer for p in span if p.odometer is not None]
    has_maf = any(p.maf is not None for p in span)
    return Trip(
        start=span[0].ts,
        end=span[-1].ts,
        start_lat=fixes[0][0] if fixes else None,
        start_lon=fixes[0][1] if fixes else None,
        end_lat=fixes[-1][0] if fixes else None,
        end_lon=fixes[-1][1] if fixes else None,
        moving_s=moving_s,
        distance_km=distance,
        distance_source=source,
        max_speed=_max([p.speed for p in span]),
        max_rpm=_max([p.rpm for p in span]),
        max_coolant=_max([p.coolant for p in span]),
        min_battery=-m if (m := _max([-p.battery for p in span if p.battery is not None]))
        is not None else None,
        fuel_used_pct=max(0.0, fuel[0] - fuel[-1]) if fuel else None,
        fuel_used_l=maf_g / _STOICHIOMETRIC / _PETROL_G_PER_L if has_maf else None,
        odometer_start=odometer[0] if odometer else None,
        odometer_end=odometer[-1] if odometer else None,
        samples=len(span),
        gap_s=gap_total,
        closed=closed,
    )
