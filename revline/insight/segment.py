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

The machine itself is :class:`revline.insight.stream.Fold` (resumable: the server folds a live
car's new samples on from where it stopped); :func:`segment` runs it over a list. No I/O; times
are integer microseconds, values in the units of :mod:`revline.fields`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from revline.insight.stream import (
    EventOut,
    Fold,
    Point,
    TripOut,
    fuel_litres,
    haversine_km,
)
from revline.insight.thresholds import Thresholds

__all__ = ["Activity", "Point", "Trip", "activity", "haversine_km", "segment", "trip_of"]

_US: Final = 1_000_000


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


def trip_of(out: TripOut) -> Trip:
    """The summary of a trip the fold emitted."""
    st = out.stats
    if st.fixes >= 2 and 2 * st.fixes >= st.n:
        distance, source = st.gps_km, "gps"
    elif st.has_speed:
        distance, source = st.speed_km, "speed"
    else:
        distance, source = 0.0, "none"
    return Trip(
        start=out.start,
        end=out.end,
        start_lat=st.first_fix[0] if st.first_fix else None,
        start_lon=st.first_fix[1] if st.first_fix else None,
        end_lat=st.last_fix[0] if st.last_fix else None,
        end_lon=st.last_fix[1] if st.last_fix else None,
        moving_s=st.moving_s,
        distance_km=distance,
        distance_source=source,
        max_speed=st.max_speed,
        max_rpm=st.max_rpm,
        max_coolant=st.max_coolant,
        min_battery=st.min_battery,
        fuel_used_pct=(
            max(0.0, st.fuel_first - st.fuel_last)
            if st.fuel_first is not None and st.fuel_last is not None else None
        ),
        fuel_used_l=fuel_litres(st),
        odometer_start=st.odometer_first,
        odometer_end=st.odometer_last,
        samples=st.n,
        gap_s=st.gap_s,
        closed=out.closed,
    )


def segment(points: Sequence[Point], t: Thresholds, *, data_end: int | None = None) -> list[Trip]:
    """The trips in ``points`` (one vehicle, sorted by time). ``data_end`` is the vehicle's
    newest sample anywhere (default: the last point): a trip that newer moving samples could
    still extend is not ``closed``."""
    fold = Fold()
    out: list[TripOut] = []
    ignored: list[EventOut] = []
    for point in points:
        fold.feed(point, t, out, ignored)
    out += fold.finish(t, data_end)[0]
    return [trip_of(trip) for trip in out]


def activity(points: Sequence[Point], t: Thresholds) -> Activity | None:
    """The state at the newest of ``points`` (sorted): driving if its latest speed reading is
    moving, paused if a moving sample came within the merge gap, else idle."""
    fold = Fold()
    ignored_trips: list[TripOut] = []
    ignored: list[EventOut] = []
    for point in points:
        fold.feed(point, t, ignored_trips, ignored)
    found = fold.state(t)
    return None if found is None else Activity(*found)
