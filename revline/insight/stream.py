"""The insight policies as one resumable fold over a vehicle's samples in time order: pure.

:class:`Fold` holds everything the trip state machine, the episode detectors, the hard-event
detector and the activity need to go on from the last sample they saw: an open trip's running
statistics (those up to its last moving sample, and those of the stopped stretch after it, which
join the trip if it moves again and are dropped if it ends), an open episode, the last second of
speed readings. It is a ``msgspec.Struct``, so it is stored as JSON between folds
(``insight_checkpoints``): a live car's new samples are folded on from where the last fold
stopped, without reading its open trip again. :func:`revline.insight.segment.segment` and
:func:`revline.insight.episodes.events` are this fold run over a list, so the two ways give the
same rows by construction (and tests/insight/test_segment.py checks resuming at any point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, NamedTuple

import msgspec

from revline.insight.thresholds import Thresholds

__all__ = ["EventOut", "Fold", "Point", "TripOut", "TripStats", "fuel_litres", "haversine_km"]

_US: Final = 1_000_000
_EARTH_KM: Final = 6371.0088
_STOICHIOMETRIC: Final = 14.7
"""Petrol: grams of air per gram of fuel."""
_PETROL_G_PER_L: Final = 745.0
_KMH_TO_MS: Final = 1 / 3.6
_radians, _sin, _cos, _asin, _sqrt = math.radians, math.sin, math.cos, math.asin, math.sqrt


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


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two WGS84 positions, km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


def _moving(point: Point, threshold: float) -> bool:
    return point.speed is not None and point.speed >= threshold


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


class TripStats(msgspec.Struct):
    """Statistics of a run of samples and of the intervals between them; runs join end to end."""

    n: int = 0
    moving_s: float = 0.0
    gap_s: float = 0.0
    speed_km: float = 0.0
    maf_g: float = 0.0
    has_speed: bool = False
    has_maf: bool = False
    fixes: int = 0
    first_fix: tuple[float, float] | None = None
    last_fix: tuple[float, float] | None = None
    gps_km: float = 0.0
    max_speed: float | None = None
    max_rpm: float | None = None
    max_coolant: float | None = None
    min_battery: float | None = None
    fuel_first: float | None = None
    fuel_last: float | None = None
    odometer_first: float | None = None
    odometer_last: float | None = None

    def point(self, p: Point) -> None:
        """Count one sample."""
        self.n += 1
        # Inline max/min: this runs for every sample of every trip.
        if p.speed is not None:
            self.has_speed = True
            if self.max_speed is None or p.speed > self.max_speed:
                self.max_speed = p.speed
        if p.maf is not None:
            self.has_maf = True
        if p.rpm is not None and (self.max_rpm is None or p.rpm > self.max_rpm):
            self.max_rpm = p.rpm
        if p.coolant is not None and (self.max_coolant is None or p.coolant > self.max_coolant):
            self.max_coolant = p.coolant
        if p.battery is not None and (self.min_battery is None or p.battery < self.min_battery):
            self.min_battery = p.battery
        if p.lat is not None and p.lon is not None:
            fix = (p.lat, p.lon)
            last = self.last_fix
            if last is None:
                self.first_fix = fix
            elif last != fix:  # the same fix adds 0.0: skip the trigonometry
                # haversine_km inlined (same operations, same result): one call less per sample.
                p1, p2 = _radians(last[0]), _radians(p.lat)
                dp, dl = p2 - p1, _radians(p.lon - last[1])
                a = _sin(dp / 2) ** 2 + _cos(p1) * _cos(p2) * _sin(dl / 2) ** 2
                self.gps_km += 2 * _EARTH_KM * _asin(min(1.0, _sqrt(a)))
            self.last_fix = fix
            self.fixes += 1
        if p.fuel is not None:
            self.fuel_first = p.fuel if self.fuel_first is None else self.fuel_first
            self.fuel_last = p.fuel
        if p.odometer is not None:
            self.odometer_first = p.odometer if self.odometer_first is None else self.odometer_first
            self.odometer_last = p.odometer

    def interval(self, a: Point, b: Point, t: Thresholds) -> None:
        """Count the interval from sample ``a`` to the next one, ``b``."""
        dt = (b.ts - a.ts) / _US
        if b.ts - a.ts > t.gap_s * _US:
            self.gap_s += dt
        elif _moving(a, t.moving_kmh):
            self.moving_s += dt
        if a.speed is not None and b.speed is not None:
            self.speed_km += (a.speed + b.speed) / 2 * dt / 3600
        if a.maf is not None and b.maf is not None:
            self.maf_g += (a.maf + b.maf) / 2 * dt

    def join(self, o: TripStats) -> None:
        """Append the run ``o`` (the samples and intervals right after this one's)."""
        self.n += o.n
        self.moving_s += o.moving_s
        self.gap_s += o.gap_s
        self.speed_km += o.speed_km
        self.maf_g += o.maf_g
        self.has_speed = self.has_speed or o.has_speed
        self.has_maf = self.has_maf or o.has_maf
        if o.first_fix is not None:
            if self.last_fix is None:
                self.first_fix = o.first_fix
            else:
                self.gps_km += haversine_km(*self.last_fix, *o.first_fix)
            self.last_fix = o.last_fix
        self.gps_km += o.gps_km
        self.fixes += o.fixes
        self.max_speed = _max(self.max_speed, o.max_speed)
        self.max_rpm = _max(self.max_rpm, o.max_rpm)
        self.max_coolant = _max(self.max_coolant, o.max_coolant)
        self.min_battery = _min(self.min_battery, o.min_battery)
        if o.fuel_first is not None:
            self.fuel_first = self.fuel_first if self.fuel_first is not None else o.fuel_first
            self.fuel_last = o.fuel_last
        if o.odometer_first is not None:
            if self.odometer_first is None:
                self.odometer_first = o.odometer_first
            self.odometer_last = o.odometer_last


class TripOut(msgspec.Struct, frozen=True):
    """A trip as the fold emits it: its bounds, stats and whether it can still grow."""

    start: int
    end: int
    stats: TripStats
    closed: bool


class EventOut(msgspec.Struct, frozen=True):
    """An episode as the fold emits it (the ``vehicle_events`` columns, times in µs)."""

    kind: str
    start: int
    end: int
    peak: float
    threshold: float
    lat: float | None = None
    lon: float | None = None


class _Trips(msgspec.Struct):
    phase: str = "idle"
    start: int = 0
    last_moving: Point | None = None
    prev: Point | None = None
    committed: TripStats | None = None
    pending: TripStats | None = None


class _Episode(msgspec.Struct):
    start: Point | None = None
    last_ts: int = 0
    peak: float = 0.0
    previous_ts: int | None = None


class _Harsh(msgspec.Struct):
    window: list[Point] = msgspec.field(default_factory=list)
    prev_ts: int | None = None
    kind: str | None = None
    start: Point | None = None
    end: int = 0
    peak: float = 0.0


class _Activity(msgspec.Struct):
    first_ts: int | None = None
    last_ts: int = 0
    has_speed: bool = False
    latest_moving: bool = False
    streak_start: int = 0
    last_moving_ts: int | None = None


class Fold(msgspec.Struct):
    """Everything needed to go on after the last sample fed (see the module docstring)."""

    last_ts: int | None = None
    trips: _Trips = msgspec.field(default_factory=_Trips)
    coolant: _Episode = msgspec.field(default_factory=_Episode)
    battery: _Episode = msgspec.field(default_factory=_Episode)
    harsh: _Harsh = msgspec.field(default_factory=_Harsh)
    activity: _Activity = msgspec.field(default_factory=_Activity)

    def feed(self, p: Point, t: Thresholds, trips: list[TripOut], events: list[EventOut]) -> None:
        """Fold in the next sample (in time order); append what it ended."""
        self.last_ts = p.ts
        self._trip(p, t, trips)
        _episode(self.coolant, "coolant_hot", p, t, events)
        _episode(self.battery, "battery_low", p, t, events)
        self._harsh(p, t, events)
        self._activity(p, t)

    def feed_all(  # noqa: PLR0912, PLR0915 - one flat loop is the point (see docstring)
        self, points: Sequence[Point], t: Thresholds, trips: list[TripOut], events: list[EventOut]
    ) -> None:
        """:meth:`feed` each of ``points`` in turn, with the same result (same state, same
        rows in the same order): the server's loop. The thresholds are read once, the steps are
        inlined and the sample's fields are locals; only the trip statistics stay methods.
        tests/insight/test_segment.py checks it against :meth:`feed` (the reference)."""
        if not points:
            return
        moving_kmh = t.moving_kmh
        idle_us = t.idle_timeout_s * _US
        merge_us = t.merge_gap_s * _US
        episode_us = t.episode_gap_s * _US
        hot_c, low_v = t.coolant_hot_c, t.battery_low_v
        window_us = int(t.harsh_window_s * _US)
        hole_us = int(1.5 / t.harsh_min_hz * _US)
        full_us = 0.8 * window_us
        brake_ms2, accel_ms2 = t.hard_brake_ms2, t.hard_accel_ms2
        s, co, ba, h, a = self.trips, self.coolant, self.battery, self.harsh, self.activity
        for p in points:
            ts, speed = p.ts, p.speed
            moving = speed is not None and speed >= moving_kmh
            # The trip state machine (Fold._trip).
            if s.last_moving is not None:
                quiet = ts - s.last_moving.ts
                if s.phase == "driving" and quiet > idle_us:
                    s.phase = "paused"
                if s.phase == "paused" and quiet > merge_us:
                    _emit_trip(trips, s, closed=True, t=t)
                    s.phase, s.committed, s.pending = "idle", None, None
            committed, pending = s.committed, s.pending
            if s.phase != "idle" and committed is not None and pending is not None:
                into = committed if moving and pending.n == 0 else pending
                if s.prev is not None:
                    into.interval(s.prev, p, t)
                into.point(p)
                if moving:
                    if into is pending:
                        committed.join(pending)
                        s.pending = TripStats()
                    s.last_moving = p
                    s.phase = "driving"
            elif moving:
                s.committed = TripStats()
                s.committed.point(p)
                s.pending = TripStats()
                s.start = ts
                s.last_moving = p
                s.phase = "driving"
            s.prev = p
            # The episodes (_episode), coolant then battery.
            v = p.coolant
            if v is not None:
                if co.start is not None and co.previous_ts is not None and (
                    ts - co.previous_ts > episode_us
                ):
                    _emit_episode(events, "coolant_hot", co, t)
                    co.start = None
                if v > hot_c:
                    if co.start is None:
                        co.start, co.peak = p, v
                    else:
                        co.peak = max(co.peak, v)
                    co.last_ts = ts
                elif co.start is not None:
                    _emit_episode(events, "coolant_hot", co, t)
                    co.start = None
                co.previous_ts = ts
            v = p.battery
            if v is not None:
                if ba.start is not None and ba.previous_ts is not None and (
                    ts - ba.previous_ts > episode_us
                ):
                    _emit_episode(events, "battery_low", ba, t)
                    ba.start = None
                if v < low_v:
                    if ba.start is None:
                        ba.start, ba.peak = p, v
                    else:
                        ba.peak = min(ba.peak, v)
                    ba.last_ts = ts
                elif ba.start is not None:
                    _emit_episode(events, "battery_low", ba, t)
                    ba.start = None
                ba.previous_ts = ts
            if speed is not None:
                # Hard events (Fold._harsh).
                if h.prev_ts is not None and ts - h.prev_ts > hole_us:
                    h.window = []
                window = h.window
                window.append(p)
                while ts - window[0].ts > window_us:
                    window.pop(0)
                old = window[0]
                kind = None
                accel = 0.0
                if len(window) > 1 and (ts - old.ts) >= full_us and old.speed is not None:
                    accel = (speed - old.speed) * _KMH_TO_MS / ((ts - old.ts) / _US)
                    if accel <= -brake_ms2:
                        kind = "hard_brake"
                    elif accel >= accel_ms2:
                        kind = "hard_accel"
                if h.kind is not None and (kind != h.kind or ts - h.end > window_us):
                    events.append(_harsh_event(h, t))
                    h.kind = None
                if kind is not None:
                    if h.kind is None:
                        h.kind, h.start, h.peak = kind, old, 0.0
                    h.peak = max(h.peak, abs(accel))
                    h.end = ts
                h.prev_ts = ts
            # The activity (Fold._activity).
            if a.first_ts is None:
                a.first_ts = ts
            a.last_ts = ts
            if speed is not None:
                a.has_speed = True
                if moving:
                    if not a.latest_moving:
                        a.streak_start = ts
                    a.latest_moving = True
                    a.last_moving_ts = ts
                else:
                    a.latest_moving = False
        self.last_ts = points[-1].ts

    def finish(self, t: Thresholds, data_end: int | None) -> tuple[list[TripOut], list[EventOut]]:
        """What is open at the end (the trip, episodes, a hard event), as it stands now;
        ``data_end`` is the vehicle's newest sample. Does not change the fold."""
        trips: list[TripOut] = []
        events: list[EventOut] = []
        s = self.trips
        if s.phase != "idle" and s.last_moving is not None:
            newest = max(data_end or 0, self.last_ts or 0)
            closed = newest - s.last_moving.ts > t.merge_gap_s * _US
            _emit_trip(trips, s, closed=closed, t=t)
        for kind, episode in (("coolant_hot", self.coolant), ("battery_low", self.battery)):
            _emit_episode(events, kind, episode, t)
        h = self.harsh
        if h.kind is not None and h.start is not None:
            events.append(_harsh_event(h, t))
        return trips, events

    def state(self, t: Thresholds) -> tuple[str, int, int] | None:
        """``(state, since, last_ts)`` at the newest sample: driving (its latest speed is
        moving), paused (moved within the merge gap) or idle; None before any speed."""
        a = self.activity
        if not a.has_speed or a.first_ts is None:
            return None
        if a.latest_moving:
            return "driving", a.streak_start, a.last_ts
        merge_us = t.merge_gap_s * _US
        if a.last_moving_ts is not None and a.last_ts - a.last_moving_ts <= merge_us:
            return "paused", a.last_moving_ts, a.last_ts
        since = a.last_moving_ts if a.last_moving_ts is not None else a.first_ts
        return "idle", since, a.last_ts

    def _trip(self, p: Point, t: Thresholds, out: list[TripOut]) -> None:
        s = self.trips
        moving = _moving(p, t.moving_kmh)
        if s.last_moving is not None:
            quiet = p.ts - s.last_moving.ts
            if s.phase == "driving" and quiet > t.idle_timeout_s * _US:
                s.phase = "paused"
            if s.phase == "paused" and quiet > t.merge_gap_s * _US:
                _emit_trip(out, s, closed=True, t=t)
                s.phase, s.committed, s.pending = "idle", None, None
        if s.phase != "idle" and s.committed is not None and s.pending is not None:
            # Driving on (nothing stopped since the last moving sample): straight into the trip,
            # which is what joining a one-sample stretch would give, at a third of the cost.
            into = s.committed if moving and s.pending.n == 0 else s.pending
            if s.prev is not None:
                into.interval(s.prev, p, t)
            into.point(p)
            if moving:
                if into is s.pending:
                    s.committed.join(s.pending)
                    s.pending = TripStats()
                s.last_moving = p
                s.phase = "driving"
        elif moving:
            s.committed = TripStats()
            s.committed.point(p)
            s.pending = TripStats()
            s.start = p.ts
            s.last_moving = p
            s.phase = "driving"
        s.prev = p

    def _harsh(self, p: Point, t: Thresholds, out: list[EventOut]) -> None:
        if p.speed is None:
            return
        h = self.harsh
        window_us = int(t.harsh_window_s * _US)
        if h.prev_ts is not None and p.ts - h.prev_ts > int(1.5 / t.harsh_min_hz * _US):
            h.window = []  # a hole in the 5 Hz data: judge nothing across it
        h.window.append(p)
        while p.ts - h.window[0].ts > window_us:
            h.window.pop(0)
        old = h.window[0]
        kind = None
        accel = 0.0
        # A full window of dense samples (at least 80 % of it) says how fast the speed changes.
        if len(h.window) > 1 and (p.ts - old.ts) >= 0.8 * window_us and old.speed is not None:
            accel = (p.speed - old.speed) * _KMH_TO_MS / ((p.ts - old.ts) / _US)
            if accel <= -t.hard_brake_ms2:
                kind = "hard_brake"
            elif accel >= t.hard_accel_ms2:
                kind = "hard_accel"
        if h.kind is not None and (kind != h.kind or p.ts - h.end > window_us):
            out.append(_harsh_event(h, t))
            h.kind = None
        if kind is not None:
            if h.kind is None:
                h.kind, h.start, h.peak = kind, old, 0.0
            h.peak = max(h.peak, abs(accel))
            h.end = p.ts
        h.prev_ts = p.ts

    def _activity(self, p: Point, t: Thresholds) -> None:
        a = self.activity
        if a.first_ts is None:
            a.first_ts = p.ts
        a.last_ts = p.ts
        if p.speed is None:
            return
        a.has_speed = True
        if _moving(p, t.moving_kmh):
            if not a.latest_moving:
                a.streak_start = p.ts
            a.latest_moving = True
            a.last_moving_ts = p.ts
        else:
            a.latest_moving = False


def _episode(e: _Episode, kind: str, p: Point, t: Thresholds, out: list[EventOut]) -> None:
    v = p.coolant if kind == "coolant_hot" else p.battery
    if v is None:
        return
    gap_us = t.episode_gap_s * _US
    if e.start is not None and e.previous_ts is not None and p.ts - e.previous_ts > gap_us:
        _emit_episode(out, kind, e, t)
        e.start = None
    beyond = v > t.coolant_hot_c if kind == "coolant_hot" else v < t.battery_low_v
    if beyond:
        if e.start is None:
            e.start, e.peak = p, v
        else:
            e.peak = max(e.peak, v) if kind == "coolant_hot" else min(e.peak, v)
        e.last_ts = p.ts
    elif e.start is not None:
        _emit_episode(out, kind, e, t)
        e.start = None
    e.previous_ts = p.ts


def _emit_trip(out: list[TripOut], s: _Trips, *, closed: bool, t: Thresholds) -> None:
    if s.committed is None or s.last_moving is None:
        return
    end = s.last_moving.ts
    if end - s.start >= t.min_trip_s * _US:
        out.append(TripOut(s.start, end, msgspec.structs.replace(s.committed), closed))


def _emit_episode(out: list[EventOut], kind: str, e: _Episode, t: Thresholds) -> None:
    if e.start is None:
        return
    threshold, min_s = (
        (t.coolant_hot_c, t.coolant_min_s) if kind == "coolant_hot"
        else (t.battery_low_v, t.battery_min_s)
    )
    if e.last_ts - e.start.ts >= min_s * _US:
        out.append(EventOut(kind, e.start.ts, e.last_ts, e.peak, threshold, e.start.lat,
                            e.start.lon))


def _harsh_event(h: _Harsh, t: Thresholds) -> EventOut:
    threshold = t.hard_brake_ms2 if h.kind == "hard_brake" else t.hard_accel_ms2
    lat, lon = (h.start.lat, h.start.lon) if h.start is not None else (None, None)
    assert h.kind is not None
    start = h.start.ts if h.start is not None else h.end
    return EventOut(h.kind, start, h.end, round(h.peak, 3), threshold, lat, lon)


def fuel_litres(stats: TripStats) -> float | None:
    """Fuel estimated from the mass air flow (petrol, stoichiometric), litres."""
    return stats.maf_g / _STOICHIOMETRIC / _PETROL_G_PER_L if stats.has_maf else None
