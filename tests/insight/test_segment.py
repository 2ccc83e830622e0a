"""The pure insight policies: trips, events, odometer and trouble codes from simulated drives."""

from __future__ import annotations

import random
from dataclasses import replace

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revline.insight.dtc import DtcEvent, dtc_events
from revline.insight.episodes import Event, events
from revline.insight.odometer import TripEnd, history
from revline.insight.segment import Point, Trip, activity, segment, trip_of
from revline.insight.stream import EventOut, Fold, TripOut
from revline.insight.thresholds import THRESHOLDS, Thresholds
from revline.insight.window import meets, reach_us, widen, window
from tests.fixtures.insight import KNOWN_STOPS, T0, US, Leg, drive, move, off, ramp, stop


def _bounds(trips: list[Trip]) -> list[tuple[float, float]]:
    return [((t.start - T0) / US, (t.end - T0) / US) for t in trips]


def test_known_stops_give_exactly_the_expected_trips() -> None:
    """A red light and a short pause stay in the trip; a long stop, a parked hour split it."""
    trips = segment(drive(KNOWN_STOPS), THRESHOLDS)
    assert _bounds(trips) == [(0, 1619), (2220, 2519), (6120, 6419)]
    assert all(t.closed for t in trips)
    second = trips[1]
    assert second.samples == 300
    assert second.distance_source == "gps"
    assert second.distance_km == pytest.approx(299 / 3600 * 50, rel=1e-3)
    assert second.max_speed == 50.0
    assert second.gap_s == 0
    assert second.completeness == 1.0
    assert trips[0].moving_s == 600 + 300 + 199  # the last interval is after the trip


def test_a_gap_in_the_data_inside_the_merge_gap_is_one_trip_with_a_gap() -> None:
    """Samples stopping for 200 s while driving pause the trip; moving again resumes it."""
    trips = segment(drive([move(300), off(200), move(300)]), THRESHOLDS)
    assert _bounds(trips) == [(0, 799)]
    assert trips[0].gap_s == pytest.approx(201)
    assert trips[0].completeness == pytest.approx(1 - 201 / 799)


def test_a_trip_newer_samples_could_extend_is_not_closed() -> None:
    """The last trip is open until the merge gap has passed in the data."""
    points = drive([move(300), stop(100)])
    assert not segment(points, THRESHOLDS)[0].closed
    assert segment(points, THRESHOLDS, data_end=T0 + 2000 * US)[0].closed


def test_without_gps_the_distance_is_integrated_speed() -> None:
    """Speed only: distance is the trapezoid of the speed readings."""
    points = [p._replace(lat=None, lon=None) for p in drive([move(360, 60)])]
    (trip,) = segment(points, THRESHOLDS)
    assert trip.distance_source == "speed"
    assert trip.distance_km == pytest.approx(359 / 3600 * 60)


def test_activity_is_driving_paused_or_idle_at_the_newest_sample() -> None:
    """The state machine at the end of the data."""
    assert activity(drive([stop(10), move(100)]), THRESHOLDS).state == "driving"  # type: ignore[union-attr]
    assert activity(drive([move(100), stop(100)]), THRESHOLDS).state == "paused"  # type: ignore[union-attr]
    assert activity(drive([move(100), stop(900)]), THRESHOLDS).state == "idle"  # type: ignore[union-attr]


def test_hard_braking_at_5_hz_is_an_event_and_at_1_hz_is_not() -> None:
    """60 -> 0 km/h in 3 s (5.6 m/s²) is hard braking where speed comes at 5 Hz."""
    legs = [move(60, 60), ramp(3, 60, 0), stop(30), ramp(10, 0, 50), move(60, 50)]
    found = [e for e in events(drive(legs, hz=5), THRESHOLDS) if e.kind.startswith("hard")]
    assert [e.kind for e in found] == ["hard_brake"]
    assert found[0].peak == pytest.approx(60 / 3.6 / 3, rel=0.1)
    assert [e for e in events(drive(legs, hz=1), THRESHOLDS) if e.kind.startswith("hard")] == []


def test_coolant_and_battery_episodes_need_their_minimum_duration() -> None:
    """115 °C for 60 s is an episode, for 5 s it is not; 11 V for 60 s is a low battery."""
    hot = Leg("move", 60, 50, coolant=115.0)
    blip = Leg("move", 5, 50, coolant=115.0)
    low = Leg("stop", 60, battery=11.0)
    found = events(drive([move(60), hot, move(60), blip, move(60), low, stop(10)]), THRESHOLDS)
    assert [(e.kind, (e.start - T0) / US, (e.end - T0) / US, e.peak) for e in found] == [
        ("coolant_hot", 60, 119, 115.0),
        ("battery_low", 245, 304, 11.0),
    ]


def test_odometer_history_never_goes_backwards_and_flags_anomalies() -> None:
    """A reading behind is a rollback (ignored), far ahead a jump (taken), none accumulates."""
    points = history(
        None,
        [
            TripEnd(1, 10.0, 1000.0),
            TripEnd(2, 10.0, 1010.2),
            TripEnd(3, 10.0, 900.0),
            TripEnd(4, 10.0, None),
            TripEnd(5, 10.0, 1500.0),
        ],
        THRESHOLDS,
    )
    assert [(p.odometer_km, p.source, p.anomaly) for p in points] == [
        (1000.0, "obd", None),
        (1010.2, "obd", None),
        (1020.2, "distance", "rollback"),
        (1030.2, "distance", None),
        (1500.0, "obd", "jump"),
    ]
    values = [p.odometer_km for p in points]
    assert values == sorted(values)


def test_a_code_set_then_cleared_is_one_event_with_both_times() -> None:
    """Reports [], [P0300], [P0300, P0420], [P0420], [] give two events, both cleared."""
    reports = [(1, []), (2, ["P0300"]), (3, ["P0300", "P0420"]), (4, ["P0420"]), (5, [])]
    assert dtc_events(reports) == [DtcEvent("P0300", 2, 3, 4), DtcEvent("P0420", 3, 4, 5)]
    assert dtc_events(reports[:3]) == [
        DtcEvent("P0300", 2, 3, None),
        DtcEvent("P0420", 3, 3, None),
    ]


# -- late, shuffled and split: the server's window recompute, in memory --------------------------


class _Store:
    """What the server keeps, in memory, updated the way revline.insight.store does it: a
    write wholly after the checkpoint is folded on from it, any other recomputed by window."""

    def __init__(self, t: Thresholds) -> None:
        self.t = t
        self.points: dict[int, Point] = {}
        self.trips: list[Trip] = []
        self.events: list[Event] = []
        self.checkpoint: Fold | None = None
        self.resumed = 0

    def write(self, chunk: list[Point]) -> None:
        for p in chunk:
            self.points[p.ts] = p
        lo, hi = min(p.ts for p in chunk), max(p.ts for p in chunk)
        end = max(self.points)
        cp = self.checkpoint
        if cp is not None and cp.last_ts is not None and lo > cp.last_ts:
            self._resume(cp, end)
        else:
            self._window(lo, hi, end)
        merge = int(self.t.merge_gap_s * US)
        self.trips = [replace(x, closed=True) if end - x.end > merge else x for x in self.trips]

    def _resume(self, fold: Fold, end: int) -> None:
        self.resumed += 1
        fold = msgspec.json.decode(msgspec.json.encode(fold), type=Fold)  # as stored
        last = fold.last_ts
        assert last is not None
        since = fold.trips.start if fold.trips.phase != "idle" else last + 1
        new = [self.points[ts] for ts in sorted(self.points) if ts > last]
        closed: list[TripOut] = []
        found: list[EventOut] = []
        for p in new:
            fold.feed(p, self.t, closed, found)
        open_trips, open_events = fold.finish(self.t, end)
        self.trips = [x for x in self.trips if x.end < since]
        self.trips += [trip_of(x) for x in closed + open_trips]
        keys = {(e.kind, e.start): e for e in self.events}
        keys.update({(e.kind, e.start): e for e in found + open_events})
        self.events = sorted(keys.values(), key=lambda x: (x.start, x.kind))
        self.checkpoint = fold

    def _window(self, lo: int, hi: int, end: int) -> None:
        reach = reach_us(self.t)
        while True:
            extents = [(x.start, x.end) for x in self.trips] + [
                (x.start, x.end) for x in self.events
            ]
            found: list[tuple[int | None, int | None]] = [
                (s, e) for s, e in extents if meets(lo - reach, hi + reach, s, e)
            ]
            wider = widen(lo, hi, found)
            if wider == (lo, hi):
                break
            lo, hi = wider
        w = window(lo, hi, self.t)
        read = [self.points[ts] for ts in sorted(self.points) if w.read_lo <= ts <= w.read_hi]
        fold = Fold()
        trips: list[TripOut] = []
        events_: list[EventOut] = []
        for p in read:
            fold.feed(p, self.t, trips, events_)
        open_trips, open_events = fold.finish(self.t, end)
        new_trips = [trip_of(x) for x in trips + open_trips
                     if meets(w.core_lo, w.core_hi, x.start, x.end)]
        new_events = [x for x in events_ + open_events
                      if meets(w.core_lo, w.core_hi, x.start, x.end)]
        self.trips = sorted(
            [x for x in self.trips if not meets(w.core_lo, w.core_hi, x.start, x.end)]
            + new_trips,
            key=lambda x: x.start,
        )
        self.events = sorted(
            [x for x in self.events if not meets(w.core_lo, w.core_hi, x.start, x.end)]
            + new_events,
            key=lambda x: (x.start, x.kind),
        )
        self.checkpoint = fold if read and w.read_hi >= end else None


_LEG = st.one_of(
    st.builds(move, st.integers(1, 900), st.sampled_from([8, 30, 50, 90])),
    st.builds(stop, st.integers(1, 900)),
    st.builds(off, st.integers(1, 3000)),
    st.builds(ramp, st.integers(2, 8), st.sampled_from([0, 50, 90]), st.sampled_from([0, 60])),
    st.builds(Leg, st.just("move"), st.integers(1, 120), st.just(40.0), st.none(),
              st.sampled_from([90.0, 115.0]), st.sampled_from([14.0, 11.0])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    legs=st.lists(_LEG, min_size=1, max_size=10),
    hz=st.sampled_from([1.0, 5.0]),
    pieces=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    shuffle_samples=st.booleans(),
)
def test_late_shuffled_and_split_uploads_give_the_same_trips_and_events(
    legs: list[Leg], hz: float, pieces: int, seed: int, shuffle_samples: bool
) -> None:
    """Any split of a drive into writes, in any order, recomputed by windows, gives the trips
    and events of the whole drive segmented at once."""
    points = drive(legs, hz=hz)
    if not points:
        return
    rng = random.Random(seed)
    order = list(points)
    if shuffle_samples:
        rng.shuffle(order)  # samples in any batch: a backlog resent out of order
    cuts = sorted(rng.sample(range(1, len(order)), min(pieces - 1, len(order) - 1)))
    chunks = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    rng.shuffle(chunks)  # writes in any order: live first, backlog later, halves
    store = _Store(THRESHOLDS)
    for chunk in chunks:
        store.write(chunk)
    assert store.trips == segment(points, THRESHOLDS)
    assert store.events == events(points, THRESHOLDS)


def test_the_window_reaches_past_the_longest_unstored_piece() -> None:
    """The margin covers a reach plus the longest thing shorter than its minimum."""
    t = THRESHOLDS
    assert t.margin_s >= t.reach_s + max(t.min_trip_s, t.coolant_min_s, t.battery_min_s)
    assert t.reach_s >= t.merge_gap_s


def test_a_short_movement_stored_as_nothing_is_read_whole_when_late_data_extends_it() -> None:
    """50 s of moving (too short to store), then, in a later write, driving 480 s after it:
    the window reads the short piece whole and the trip starts at its first moving sample."""
    points = drive([move(50), stop(479), move(300)])
    store = _Store(THRESHOLDS)
    store.write(points[:529])
    assert store.trips == []
    store.write(points[529:])
    assert _bounds(store.trips) == [(0, 828)]
    assert store.trips == segment(points, THRESHOLDS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    legs=st.lists(_LEG, min_size=1, max_size=10),
    hz=st.sampled_from([1.0, 5.0]),
    size=st.integers(1, 400),
)
def test_a_live_upload_folded_on_from_checkpoints_gives_the_same_trips_and_events(
    legs: list[Leg], hz: float, size: int
) -> None:
    """A drive sent live (in order, in writes of any size) is folded on from the stored state
    after the first write, and ends as the trips and events of the whole drive."""
    points = drive(legs, hz=hz)
    store = _Store(THRESHOLDS)
    for k in range(0, len(points), size):
        store.write(points[k : k + size])
    assert store.trips == segment(points, THRESHOLDS)
    assert store.events == events(points, THRESHOLDS)
    assert store.resumed >= (len(points) - 1) // size - 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    legs=st.lists(_LEG, min_size=1, max_size=10),
    hz=st.sampled_from([1.0, 5.0]),
    size=st.integers(1, 400),
    seed=st.integers(0, 2**32),
    holes=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_the_servers_loop_feed_all_gives_what_feed_gives_sample_by_sample(
    legs: list[Leg], hz: float, size: int, seed: int, holes: float
) -> None:
    """Fold.feed_all over writes of any size, resumed from the stored state, gives the rows
    and the state Fold.feed gives one sample at a time, with any field missing or noisy."""
    rng = random.Random(seed)
    points = [  # every field but the time may be missing, or off by up to 10 %
        Point._make(
            v if k == 0 or v is None else None if rng.random() < holes
            else v * rng.uniform(0.9, 1.1)
            for k, v in enumerate(p)
        )
        for p in drive(legs, hz=hz)
    ]
    slow, fast = Fold(), Fold()
    for k in range(0, len(points), size):
        piece = points[k : k + size]
        slow_rows: tuple[list[TripOut], list[EventOut]] = ([], [])
        fast_rows: tuple[list[TripOut], list[EventOut]] = ([], [])
        for p in piece:
            slow.feed(p, THRESHOLDS, *slow_rows)
        fast.feed_all(piece, THRESHOLDS, *fast_rows)
        assert fast_rows == slow_rows
        assert msgspec.json.encode(fast) == msgspec.json.encode(slow)
        assert fast.finish(THRESHOLDS, None) == slow.finish(THRESHOLDS, None)
        fast = msgspec.json.decode(msgspec.json.encode(fast), type=Fold)  # as stored
        slow = msgspec.json.decode(msgspec.json.encode(slow), type=Fold)
