"""Insight kept up to date from every committed write: the derivation and its background task.

Inside each write's transaction (:meth:`Insight.apply`) only cheap facts are recorded: one
``insight_dirty`` row per vehicle of the write (its time span, merged with what is already
there) and the trouble-code reports the samples carry, from which that vehicle's ``dtc_events``
are re-derived at once (reports are rare: a few a day).

After commit, :meth:`Insight.run` folds each dirty vehicle once its first unfolded write is
``settle_s`` old, many vehicles per transaction (each statement takes arrays of them):

- **live**: every new sample comes after the vehicle's checkpoint (``insight_checkpoints``, the
  :class:`revline.insight.stream.Fold` state after its newest folded sample): only the new
  samples are read and folded on; the trips and events they end or extend replace the open ones;
- **by window** (late or out-of-order data, or no checkpoint): widen the span to the stored trips
  and events within reach of it (repeated until stable), read the cold samples of the widened
  span plus a margin, fold them, replace the trips and events that meet the span; the fold
  becomes the checkpoint if the read reached the newest sample, else the checkpoint is dropped.

Then the odometer history is re-derived from the first replaced trip on, the activity updated,
and the dirty row deleted if no write touched it meanwhile (its ``generation`` is unchanged);
if one did, the row's start moves past the new checkpoint when that is exact
(:data:`ADVANCE_SQL`), so a car written to during its folds is still folded live.

Why that is exact: trips and events are functions of the set of samples, where samples further
apart than a reach (:attr:`Thresholds.reach_s`) never interact; the widened span holds every
stored item they could merge with, and the margin every unstored piece (shorter than its
minimum); a checkpoint is used only when nothing older than it was written since. So a backlog
uploaded late, shuffled or in halves gives the rows the same samples give live, and a
redelivered write changes nothing. A per-vehicle advisory lock keeps two folders (consumers or
``revline insight fold``) from folding the same vehicle at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, groupby, repeat
from operator import is_not, itemgetter
from typing import Any, Final

import msgspec

from revline.contract import FLAG_CLOCK_UNSYNCED, Sample
from revline.fields import FIELD_BY_NAME
from revline.insight.dtc import dtc_events
from revline.insight.episodes import Event
from revline.insight.odometer import OdometerPoint, TripEnd, history
from revline.insight.segment import Trip, trip_of
from revline.insight.stream import EventOut, Fold, Point, TripOut
from revline.insight.thresholds import THRESHOLDS, Thresholds
from revline.insight.window import meets, reach_us, widen, window
from revline.logs import kv
from revline.storage.derive import Staged

__all__ = ["Insight", "InsightMarks", "mark", "recompute", "setup_connection"]

log = logging.getLogger("revline.insight")

_US: Final = 1_000_000
_LOCK_CLASS: Final = 0x1E51  # advisory lock class of insight's per-vehicle recompute
_DTC: Final = 1 + Sample.__struct_fields__.index("dtc")
"""Position of ``dtc`` in a staging row (the VIN, then the sample's fields)."""
_DTC_OF: Final = itemgetter(_DTC)


def _at(param: str) -> str:
    """A bigint of microseconds as a timestamptz (exact, no float)."""
    return f"(timestamptz 'epoch' + {param} * interval '1 microsecond')"


def _us(column: str) -> str:
    """A timestamptz as bigint microseconds (extract gives an exact numeric)."""
    return f"(extract(epoch FROM {column}) * 1000000)::bigint"


def _value(name: str) -> str:
    field = FIELD_BY_NAME[name]
    return f"{field.cold_column} / 1e{field.db_digits}::float8"


MARK_DIRTY_SQL: Final = (
    "INSERT INTO insight_dirty AS d (vin, ts_min, ts_max) "
    f"SELECT u.vin, {_at('u.lo')}, {_at('u.hi')} "
    "FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u (vin, lo, hi) "
    "ON CONFLICT (vin) DO UPDATE SET ts_min = least(d.ts_min, excluded.ts_min), "
    "ts_max = greatest(d.ts_max, excluded.ts_max), generation = d.generation + 1"
)
"""One row per vehicle of a write, merged into what waits: O(vehicles), not O(samples)."""

INSERT_REPORT_SQL: Final = (
    f"INSERT INTO dtc_reports (vin, ts, seq, codes) VALUES ($1, {_at('$2')}, $3, $4::text[]) "
    "ON CONFLICT (vin, ts, seq) DO NOTHING"
)
REPORTS_SQL: Final = f"SELECT {_us('ts')}, codes FROM dtc_reports WHERE vin = $1 ORDER BY ts, seq"
UPSERT_DTC_SQL: Final = (
    "INSERT INTO dtc_events AS e (vin, code, first_seen, last_seen, cleared) "
    f"VALUES ($1, $2, {_at('$3')}, {_at('$4')}, {_at('$5')}) "
    "ON CONFLICT (vin, code, first_seen) DO UPDATE SET last_seen = excluded.last_seen, "
    "cleared = excluded.cleared "
    "WHERE (e.last_seen, e.cleared) IS DISTINCT FROM (excluded.last_seen, excluded.cleared)"
)
"""Keeps ``detected_at`` of an event already known: the new-code alert fires once."""
DELETE_STALE_DTC_SQL: Final = (
    "DELETE FROM dtc_events e WHERE e.vin = $1 AND NOT EXISTS ("
    "SELECT 1 FROM unnest($2::text[], $3::bigint[]) AS u (code, first) "
    f"WHERE u.code = e.code AND {_at('u.first')} = e.first_seen)"
)

CLAIM_SQL: Final = (
    "SELECT d.vin FROM insight_dirty d LEFT JOIN LATERAL ("
    "SELECT t.start_ts FROM trips t WHERE t.vin = d.vin AND NOT t.closed "
    "ORDER BY t.start_ts DESC LIMIT 1) AS o ON d.ts_max > now() - $3 * interval '1 second' "
    "WHERE d.dirty_since <= now() - greatest($1 * interval '1 second', "
    "$4 * (d.ts_max - o.start_ts)) "
    "ORDER BY d.dirty_since LIMIT $2"
)
"""Vehicles due: settled, and a live open trip not refolded more often than a fraction of its
length (greatest() ignores the NULL of a vehicle without one)."""
# Every statement below works on many vehicles at once: arrays of (vin, bounds) unnested, so a
# recompute of hundreds of vehicles is a dozen round trips, not a dozen per vehicle.
_SPANS: Final = "unnest($1::text[], $2::bigint[], $3::bigint[]) AS u (vin, lo, hi)"
_FROM: Final = "unnest($1::text[], $2::bigint[]) AS u (vin, lo)"

LOCK_DIRTY_SQL: Final = (
    f"SELECT vin, {_us('ts_min')}, {_us('ts_max')}, generation FROM insight_dirty "
    "WHERE vin = ANY($1::text[]) AND pg_try_advisory_xact_lock($2, hashtext(vin)) ORDER BY vin"
)
"""The dirty spans of the vehicles no other recompute holds, each now held by this one."""
HULL_SQL: Final = (
    f"SELECT u.vin, min(x.s), max(x.e) FROM {_SPANS} CROSS JOIN LATERAL ("
    f"SELECT {_us('t.start_ts')} AS s, {_us('t.end_ts')} AS e FROM trips t "
    f"WHERE t.vin = u.vin AND t.end_ts >= {_at('u.lo')} AND t.start_ts <= {_at('u.hi')} "
    f"UNION ALL SELECT {_us('v.start_ts')}, {_us('v.end_ts')} FROM vehicle_events v "
    f"WHERE v.vin = u.vin AND v.end_ts >= {_at('u.lo')} AND v.start_ts <= {_at('u.hi')}"
    ") AS x GROUP BY u.vin"
)
_POINT_COLUMNS: Final = (
    f"{_us('s.ts')}, coalesce({_value('speed')}, {_value('gps_speed')}), "
    + ", ".join(
        _value(name)
        for name in ("rpm", "coolant", "battery", "fuel", "maf", "lat", "lon", "odometer")
    )
)
POINTS_SQL: Final = (
    f"SELECT u.vin, p.* FROM {_SPANS} CROSS JOIN LATERAL (SELECT {_POINT_COLUMNS} "
    f"FROM samples s WHERE s.vin = u.vin AND s.ts >= {_at('u.lo')} AND s.ts <= {_at('u.hi')} "
    f"AND s.flags & {FLAG_CLOCK_UNSYNCED} = 0 ORDER BY s.ts, s.seq) AS p ORDER BY u.vin"
)
"""What :class:`Point` holds, from the cold table (samples of an unsynced clock left out). A
lateral read per vehicle: one index range scan each on ``(vin, ts, seq)``, whatever the
planner's statistics say (a hash join over the whole table was its choice on fresh data)."""
POINTS_AFTER_SQL: Final = (
    f"SELECT u.vin, p.* FROM {_FROM} CROSS JOIN LATERAL (SELECT {_POINT_COLUMNS} "
    f"FROM samples s WHERE s.vin = u.vin AND s.ts > {_at('u.lo')} "
    f"AND s.flags & {FLAG_CLOCK_UNSYNCED} = 0 ORDER BY s.ts, s.seq) AS p ORDER BY u.vin"
)
"""The samples after a checkpoint: all a live car's fold reads."""
CHECKPOINTS_SQL: Final = (
    f"SELECT vin, {_us('last_ts')}, state FROM insight_checkpoints WHERE vin = ANY($1::text[])"
)
SAVE_CHECKPOINT_SQL: Final = (
    f"INSERT INTO insight_checkpoints (vin, last_ts, state) VALUES ($1, {_at('$2')}, $3) "
    "ON CONFLICT (vin) DO UPDATE SET last_ts = excluded.last_ts, state = excluded.state, "
    "updated_at = now()"
)
DROP_CHECKPOINTS_SQL: Final = "DELETE FROM insight_checkpoints WHERE vin = ANY($1::text[])"
COUNT_EVENTS_SQL: Final = (
    "UPDATE trips t SET hard_brakes = c.brakes, hard_accels = c.accels FROM ("
    "SELECT x.vin, x.start_ts, count(e.kind) FILTER (WHERE e.kind = 'hard_brake') AS brakes, "
    "count(e.kind) FILTER (WHERE e.kind = 'hard_accel') AS accels "
    f"FROM {_FROM} JOIN trips x ON x.vin = u.vin AND x.end_ts >= {_at('u.lo')} "
    "LEFT JOIN vehicle_events e ON e.vin = x.vin AND e.kind IN ('hard_brake', 'hard_accel') "
    "AND e.start_ts BETWEEN x.start_ts AND x.end_ts GROUP BY x.vin, x.start_ts) AS c "
    "WHERE t.vin = c.vin AND t.start_ts = c.start_ts "
    "AND (t.hard_brakes, t.hard_accels) IS DISTINCT FROM (c.brakes, c.accels)"
)
"""Each trip's hard brakes and accelerations, from the events stored (whichever fold made them)."""
DATA_END_SQL: Final = (
    f"SELECT vin, {_us('ts')} FROM vehicle_state WHERE vin = ANY($1::text[])"
)
PREVIOUS_ODOMETER_SQL: Final = (
    f"SELECT u.vin, p.odometer_km FROM {_FROM} CROSS JOIN LATERAL ("
    "SELECT odometer_km FROM odometer_history h "
    f"WHERE h.vin = u.vin AND h.ts < {_at('u.lo')} ORDER BY h.ts DESC LIMIT 1) AS p"
)
DELETE_TRIPS_SQL: Final = (
    f"DELETE FROM trips t USING {_SPANS} WHERE t.vin = u.vin "
    f"AND t.end_ts >= {_at('u.lo')} AND t.start_ts <= {_at('u.hi')}"
)
LATER_TRIPS_SQL: Final = (
    f"SELECT t.vin, {_us('t.end_ts')}, t.distance_km, h.reading_km, {_us('t.start_ts')} "
    f"FROM {_FROM} JOIN trips t ON t.vin = u.vin AND t.end_ts >= {_at('u.lo')} "
    "LEFT JOIN odometer_history h ON h.vin = t.vin AND h.ts = t.end_ts "
    "ORDER BY t.vin, t.end_ts"
)
DELETE_HISTORY_SQL: Final = (
    f"DELETE FROM odometer_history h USING {_FROM} "
    f"WHERE h.vin = u.vin AND h.ts >= {_at('u.lo')}"
)
INSERT_HISTORY_SQL: Final = (
    "INSERT INTO odometer_history (vin, ts, odometer_km, reading_km, source, anomaly, "
    f"anomaly_km) VALUES ($1, {_at('$2')}, $3, $4, $5, $6, $7)"
)
_TRIP_COLUMNS: Final = (
    "start_lat", "start_lon", "end_lat", "end_lon", "duration_s", "moving_s", "distance_km",
    "distance_source", "avg_speed", "max_speed", "max_rpm", "max_coolant", "min_battery",
    "fuel_used_pct", "fuel_used_l", "odometer_start", "odometer_end", "samples", "gap_s",
    "completeness", "hard_brakes", "hard_accels", "closed",
)
INSERT_TRIP_SQL: Final = (
    f"INSERT INTO trips (vin, start_ts, end_ts, {', '.join(_TRIP_COLUMNS)}) "
    f"VALUES ($1, {_at('$2')}, {_at('$3')}, "
    + ", ".join(f"${i}" for i in range(4, 4 + len(_TRIP_COLUMNS)))
    + ")"
)
UPDATE_TRIP_ODOMETER_SQL: Final = (
    f"UPDATE trips SET odometer_start = $3, odometer_end = $4 "
    f"WHERE vin = $1 AND start_ts = {_at('$2')}"
)
DELETE_EVENTS_SQL: Final = (
    f"DELETE FROM vehicle_events e USING {_SPANS} WHERE e.vin = u.vin "
    f"AND e.end_ts >= {_at('u.lo')} AND e.start_ts <= {_at('u.hi')} AND NOT EXISTS ("
    "SELECT 1 FROM unnest($4::text[], $5::text[], $6::bigint[]) AS n (vin, kind, start) "
    f"WHERE n.vin = e.vin AND n.kind = e.kind AND {_at('n.start')} = e.start_ts)"
)
UPSERT_EVENT_SQL: Final = (
    "INSERT INTO vehicle_events AS e (vin, kind, start_ts, end_ts, peak, threshold, lat, lon) "
    f"VALUES ($1, $2, {_at('$3')}, {_at('$4')}, $5, $6, $7, $8) "
    "ON CONFLICT (vin, kind, start_ts) DO UPDATE SET end_ts = excluded.end_ts, "
    "peak = excluded.peak, threshold = excluded.threshold, lat = excluded.lat, lon = excluded.lon"
)
"""Keeps ``detected_at`` of an episode already known (an alert on it fires once)."""
UPSERT_ACTIVITY_SQL: Final = (
    "INSERT INTO vehicle_activity AS a (vin, state, state_since, last_ts, computed_at) "
    f"VALUES ($1, $2, {_at('$3')}, {_at('$4')}, now()) "
    "ON CONFLICT (vin) DO UPDATE SET state = excluded.state, state_since = excluded.state_since, "
    "last_ts = excluded.last_ts, computed_at = now() WHERE a.last_ts <= excluded.last_ts"
)
CLOSE_TRIPS_SQL: Final = (
    f"UPDATE trips t SET closed = true FROM {_FROM} WHERE t.vin = u.vin AND NOT t.closed "
    f"AND t.end_ts < {_at('u.lo')} - $3 * interval '1 second'"
)
"""Trips the newest data has left behind by more than the merge gap can no longer grow."""
LOCK_ROWS_SQL: Final = (
    "SELECT vin FROM insight_dirty WHERE vin = ANY($1::text[]) ORDER BY vin FOR UPDATE"
)
"""Row locks in VIN order, the order writers take them in: no deadlock with a write."""
DONE_SQL: Final = (
    "DELETE FROM insight_dirty d USING unnest($1::text[], $2::bigint[]) AS u (vin, generation) "
    "WHERE d.vin = u.vin AND d.generation = u.generation"
)
AGAIN_SQL: Final = "UPDATE insight_dirty SET dirty_since = now() WHERE vin = ANY($1::text[])"
"""Written to meanwhile (generation changed): folded again after the settle time."""
ADVANCE_SQL: Final = (
    f"UPDATE insight_dirty d SET ts_min = greatest(d.ts_min, {_at('(u.hi + 1)')}), "
    f"ts_max = greatest(d.ts_max, {_at('(u.hi + 1)')}) "
    "FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], "
    "$6::bigint[]) AS u (vin, lo, bound, hi, n, generation) "
    f"WHERE d.vin = u.vin AND d.generation <> u.generation AND d.ts_min >= {_at('u.bound')} "
    "AND (SELECT count(*) FROM samples s WHERE s.vin = u.vin "
    f"AND s.ts >= {_at('u.lo')} AND s.ts <= {_at('u.hi')} "
    f"AND s.flags & {FLAG_CLOCK_UNSYNCED} = 0) = u.n"
)
"""A fold that writes came in during (generation changed) leaves the rest of the span dirty,
not its folded part: it moves the span's start past the new checkpoint when every write since
begins at or after ``bound`` (``ts_min`` not lowered: for a live fold the old checkpoint + 1,
for a window the span it locked) and no sample the fold did not read landed in what it read up
to the new checkpoint (``[lo, hi]``: the count is the ``n`` it read). Else the span stays as it
is (folded again by window). Without it a vehicle written to during each of its folds would be
recomputed by window on every fold."""
POSTPONE_SQL: Final = (
    "UPDATE insight_dirty SET dirty_since = now() + interval '1 minute' WHERE vin = $1"
)


async def record_dtc(connection: Any, reports: Sequence[tuple[str, int, int, list[str]]]) -> None:
    """Store ``(vin, ts, seq, codes)`` reports and re-derive their vehicles' ``dtc_events``."""
    await connection.executemany(
        INSERT_REPORT_SQL, [(vin, ts, seq, sorted(codes)) for vin, ts, seq, codes in reports]
    )
    for vin in sorted({vin for vin, *_ in reports}):
        found = dtc_events(await connection.fetch(REPORTS_SQL, vin))
        await connection.execute(
            DELETE_STALE_DTC_SQL, vin, [e.code for e in found], [e.first_seen for e in found]
        )
        await connection.executemany(
            UPSERT_DTC_SQL,
            [(vin, e.code, e.first_seen, e.last_seen, e.cleared) for e in found],
        )


_FOREVER: Final = 2**62


@dataclass
class _Plan:
    """What one fold of a chunk found, per vehicle, before it is written."""

    trips: dict[str, list[Trip]] = field(default_factory=dict)
    events: dict[str, list[Event]] = field(default_factory=dict)
    trips_from: dict[str, tuple[int, int]] = field(default_factory=dict)
    """The range whose stored trips are replaced (and odometer re-derived from its start)."""
    events_from: dict[str, tuple[int, int]] = field(default_factory=dict)
    """The range whose stored events are replaced (a resumed fold only adds and extends)."""
    folds: dict[str, Fold] = field(default_factory=dict)
    """Checkpoints to store: the fold reached the vehicle's newest sample."""
    stale: list[str] = field(default_factory=list)
    """Checkpoints to drop: a window that did not reach the newest sample."""
    read: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Per vehicle whose stored rows now cover all it read up to its checkpoint: the first
    instant read, the ``bound`` of :data:`ADVANCE_SQL` and how many samples were read."""


_TURN: Final = 2000
"""Samples folded between two turns of the event loop: a few ms of pure Python. The fold runs
on the consumer's event loop in these slices, so its writes and acks wait at most one slice;
in a thread the fold held the GIL for 5-ms switch intervals each time the loop woke, and the
consumer's p99 commit latency at a steady 10k samples/s went from ~270 to ~750 ms."""


class _Pacer:
    """Hands the event loop a turn after every :data:`_TURN` samples of folding."""

    def __init__(self) -> None:
        self._done = 0

    async def folded(self, samples: int) -> None:
        self._done += samples
        if self._done >= _TURN:
            self._done = 0
            await asyncio.sleep(0)


async def _run(
    fold: Fold, points: Sequence[Point], t: Thresholds, data_end: int | None, pacer: _Pacer
) -> tuple[list[Trip], list[Event]]:
    trips: list[TripOut] = []
    found: list[EventOut] = []
    for k in range(0, len(points), _TURN):  # slices: feed_all of each in turn = of the whole
        piece = points[k : k + _TURN]
        fold.feed_all(piece, t, trips, found)
        await pacer.folded(len(piece))
    open_trips, open_events = fold.finish(t, data_end)
    return [trip_of(x) for x in trips + open_trips], found + open_events


_FIELDS: Final = itemgetter(slice(1, None))


def _points(rows: Sequence[Any]) -> dict[str, list[Point]]:
    """Each vehicle's points from rows of ``(vin, *Point)`` ordered by vin: built at C speed
    (``tuple.__new__`` on the record's slice is what ``Point(*row[1:])`` builds)."""
    new = partial(tuple.__new__, Point)
    return {vin: list(map(new, map(_FIELDS, group))) for vin, group in groupby(rows, _VIN)}


_VIN: Final = itemgetter(0)


async def recompute(connection: Any, vins: Sequence[str], t: Thresholds = THRESHOLDS) -> int:
    """Fold the dirty spans of ``vins`` into their trips, events, odometer and activity, in the
    caller's transaction; how many vehicles were folded (those another recompute holds, or
    with nothing dirty, are left alone). A vehicle whose new samples all come after its
    checkpoint is folded on from it; any other is recomputed by window."""
    # The reads below are many short index scans whose estimated cost invites JIT compilation:
    # ~10 ms of it per statement, more than the statement itself.
    await connection.execute("SET LOCAL jit = off")
    dirty = await connection.fetch(LOCK_DIRTY_SQL, sorted(set(vins)), _LOCK_CLASS)
    if not dirty:
        return 0
    order = [row[0] for row in dirty]
    checkpoints = {
        vin: (last, state) for vin, last, state in await connection.fetch(CHECKPOINTS_SQL, order)
    }
    data_end = dict(await connection.fetch(DATA_END_SQL, order))
    live = [vin for vin, lo, _, _ in dirty if vin in checkpoints and lo > checkpoints[vin][0]]
    plan = _Plan()
    windowed = sorted(set(order) - set(live))
    if windowed:
        await _by_window(connection, {v: (lo, hi) for v, lo, hi, _ in dirty if v in windowed},
                         data_end, plan, t)
    if live:
        after = [checkpoints[v][0] for v in live]
        rows = await connection.fetch(POINTS_AFTER_SQL, live, after)
        points = _points(rows)
        pacer = _Pacer()
        for vin in live:
            fold = msgspec.convert(checkpoints[vin][1], Fold)
            s = fold.trips
            since = s.start if s.phase != "idle" else checkpoints[vin][0] + 1
            plan.trips[vin], plan.events[vin] = await _run(
                fold, points.get(vin, []), t, data_end.get(vin), pacer
            )
            plan.trips_from[vin] = (since, _FOREVER)
            plan.folds[vin] = fold
        for k, vin in enumerate(live):
            plan.read[vin] = (after[k] + 1, after[k] + 1, len(points.get(vin, ())))
    await _write(connection, order, plan, data_end, t)
    await connection.fetch(LOCK_ROWS_SQL, order)
    generation = {vin: gen for vin, _, _, gen in dirty}
    await connection.execute(DONE_SQL, order, [generation[v] for v in order])
    advanced = sorted(v for v in plan.read if plan.folds[v].last_ts is not None)
    await connection.execute(
        ADVANCE_SQL, advanced, [plan.read[v][0] for v in advanced],
        [plan.read[v][1] for v in advanced], [plan.folds[v].last_ts for v in advanced],
        [plan.read[v][2] for v in advanced], [generation[v] for v in advanced],
    )
    await connection.execute(AGAIN_SQL, order)
    return len(order)


async def _by_window(
    connection: Any,
    dirty: dict[str, tuple[int, int]],
    data_end: dict[str, int],
    plan: _Plan,
    t: Thresholds,
) -> None:
    """The windowed recompute: widen each span over what is stored within reach, read it with
    its margin, keep what meets the span plus a reach."""
    span = await _widened(connection, dirty, t)
    order = sorted(span)
    windows = {vin: window(*span[vin], t) for vin in order}
    rows = await connection.fetch(
        POINTS_SQL, order, [windows[v].read_lo for v in order], [windows[v].read_hi for v in order]
    )
    points = _points(rows)
    pacer = _Pacer()
    for vin in order:
        w, read = windows[vin], points.get(vin, [])
        fold = Fold()
        trips, found = await _run(fold, read, t, data_end.get(vin), pacer)
        plan.trips[vin] = [tr for tr in trips if meets(w.core_lo, w.core_hi, tr.start, tr.end)]
        plan.events[vin] = [ev for ev in found if meets(w.core_lo, w.core_hi, ev.start, ev.end)]
        plan.trips_from[vin] = plan.events_from[vin] = (w.core_lo, w.core_hi)
        end = data_end.get(vin)
        if read and (end is None or w.read_hi >= end):
            plan.folds[vin] = fold  # it saw everything up to the newest sample: resumable
            if fold.last_ts is not None and fold.last_ts <= w.core_hi:
                # All it read is kept; later writes must begin in the widened span.
                plan.read[vin] = (w.read_lo, span[vin][0], len(read))
        else:
            plan.stale.append(vin)


async def _write(
    connection: Any, order: list[str], plan: _Plan, data_end: dict[str, int], t: Thresholds
) -> None:
    """Replace the stored rows the plan recomputed; store or drop the checkpoints."""
    lo = [plan.trips_from[v][0] for v in order]
    hi = [plan.trips_from[v][1] for v in order]
    previous = dict(await connection.fetch(PREVIOUS_ODOMETER_SQL, order, lo))
    await connection.execute(DELETE_TRIPS_SQL, order, lo, hi)
    await _store_trips(
        connection, order=order, core_lo=lo, trips=plan.trips, previous=previous, t=t
    )
    replaced = sorted(plan.events_from)
    kept = [(vin, ev) for vin in replaced for ev in plan.events[vin]]
    await connection.execute(
        DELETE_EVENTS_SQL, replaced, [plan.events_from[v][0] for v in replaced],
        [plan.events_from[v][1] for v in replaced],
        [vin for vin, _ in kept], [ev.kind for _, ev in kept], [ev.start for _, ev in kept],
    )
    await connection.executemany(
        UPSERT_EVENT_SQL,
        [(vin, ev.kind, ev.start, ev.end, ev.peak, ev.threshold, ev.lat, ev.lon)
         for vin in order for ev in plan.events[vin]],
    )
    await connection.execute(COUNT_EVENTS_SQL, order, lo)
    ended = [vin for vin in order if data_end.get(vin) is not None]
    await connection.execute(CLOSE_TRIPS_SQL, ended, [data_end[v] for v in ended], t.merge_gap_s)
    states = []
    for vin, fold in plan.folds.items():
        state = fold.state(t)
        if state is not None:
            states.append((vin, *state))
    await connection.executemany(UPSERT_ACTIVITY_SQL, states)
    await connection.executemany(
        SAVE_CHECKPOINT_SQL,
        [(vin, fold.last_ts, fold) for vin, fold in sorted(plan.folds.items())
         if fold.last_ts is not None],
    )
    await connection.execute(DROP_CHECKPOINTS_SQL, plan.stale)


async def _widened(
    connection: Any, span: dict[str, tuple[int, int]], t: Thresholds
) -> dict[str, tuple[int, int]]:
    """Each span grown over the stored trips and events within reach, until none is left."""
    reach = reach_us(t)
    pending = sorted(span)
    while pending:
        found = await connection.fetch(
            HULL_SQL, pending, [span[v][0] - reach for v in pending],
            [span[v][1] + reach for v in pending],
        )
        pending = []
        for vin, start, end in found:
            wider = widen(*span[vin], [(start, end)])
            if wider != span[vin]:
                span[vin] = wider
                pending.append(vin)
    return span


async def _store_trips(
    connection: Any,
    *,
    order: list[str],
    core_lo: list[int],
    trips: dict[str, list[Trip]],
    previous: dict[str, float],
    t: Thresholds,
) -> None:
    """Insert the new trips, and the odometer history from the first of them on (the stored
    trips after them included: their odometer follows from the new ones)."""
    later: dict[str, list[Any]] = {}
    for vin, group in groupby(await connection.fetch(LATER_TRIPS_SQL, order, core_lo),
                              itemgetter(0)):
        later[vin] = list(group)
    history_rows: list[tuple[Any, ...]] = []
    trip_rows: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    for vin in order:
        new, after = trips[vin], later.get(vin, [])
        ends = [TripEnd(tr.end, tr.distance_km, tr.odometer_end) for tr in new]
        ends += [TripEnd(end, distance, reading) for _, end, distance, reading, _ in after]
        points = history(previous.get(vin), ends, t)
        history_rows += [
            (vin, p.ts, p.odometer_km, p.reading_km, p.source, p.anomaly, p.anomaly_km)
            for p in points
        ]
        starts = [_odometer_start(previous.get(vin), points, i, ends) for i in range(len(ends))]
        trip_rows += [
            _trip_row(vin, tr, starts[i], points[i]) for i, tr in enumerate(new)
        ]
        updates += [
            (vin, row[4], starts[len(new) + k], points[len(new) + k].odometer_km)
            for k, row in enumerate(after)
        ]
    await connection.execute(DELETE_HISTORY_SQL, order, core_lo)
    await connection.executemany(INSERT_HISTORY_SQL, history_rows)
    await connection.executemany(INSERT_TRIP_SQL, trip_rows)
    await connection.executemany(UPDATE_TRIP_ODOMETER_SQL, updates)


def _odometer_start(
    previous: float | None, points: Sequence[OdometerPoint], i: int, ends: Sequence[TripEnd]
) -> float:
    before = previous if i == 0 else points[i - 1].odometer_km
    start = points[i].odometer_km - ends[i].distance_km
    return max(start, before) if before is not None else max(start, 0.0)


def _trip_row(vin: str, trip: Trip, start_km: float, end: OdometerPoint) -> tuple[Any, ...]:
    return (
        vin, trip.start, trip.end, trip.start_lat, trip.start_lon, trip.end_lat, trip.end_lon,
        trip.duration_s, trip.moving_s, trip.distance_km, trip.distance_source, trip.avg_speed,
        trip.max_speed, trip.max_rpm, trip.max_coolant, trip.min_battery, trip.fuel_used_pct,
        trip.fuel_used_l, min(start_km, end.odometer_km), end.odometer_km, trip.samples,
        trip.gap_s, trip.completeness, 0, 0, trip.closed,  # event counts: COUNT_EVENTS_SQL
    )


class InsightMarks:
    """The in-write half alone (a :class:`revline.storage.derive.Derivation`): marks what to
    fold and stores trouble codes; the folding runs elsewhere (``revline insight fold``)."""

    name = "insight"

    async def prepare(self, connection: Any) -> None:
        """Nothing per connection: the statements are plain."""
        del connection

    async def apply(self, connection: Any, write: Staged) -> None:
        """Mark each vehicle's span dirty; store trouble-code reports and their events."""
        await mark(connection, write)


async def mark(connection: Any, write: Staged) -> None:
    """What a write records for insight, in its transaction: the dirty span of each vehicle
    and the trouble-code reports."""
    found = sorted(write.spans(), key=lambda s: s.vin)  # one lock order for every write
    await connection.execute(
        MARK_DIRTY_SQL,
        [s.vin for s in found],
        [s.ts_min for s in found],
        [s.ts_max for s in found],
    )
    # Reports are rare (a few a day per car): found at C speed, then built.
    rows = write.rows
    carrying = list(compress(rows, map(is_not, map(_DTC_OF, rows), repeat(None))))
    if carrying:
        reports = [(r[0], r[1], r[2], r[_DTC]) for r in carrying]
        await record_dtc(connection, reports)


async def setup_connection(connection: Any) -> None:
    """What a connection of a pool of its own needs for the fold: ``jsonb`` as msgspec JSON
    (the consumer's writer sets the same codec on its connections)."""
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + msgspec.json.encode(value),
        decoder=lambda data: msgspec.json.decode(data[1:]),
        format="binary",
    )


class Insight:
    """The insight derivation (:class:`revline.storage.derive.Derivation` and ``Background``)."""

    name = "insight"

    def __init__(
        self,
        thresholds: Thresholds = THRESHOLDS,
        *,
        poll_s: float = 1.0,
        claim: int = 2000,
        chunk: int = 250,
        workers: int = 2,
        share: float = 1.0,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.thresholds = thresholds
        self.poll_s = poll_s
        self.claim = claim
        self.chunk = chunk
        self.workers = workers
        self.share = share
        """At most this share of the time is spent folding: after a chunk that took d seconds
        :meth:`run` rests d x (1/share - 1). Below 1 where the fold shares a process and the
        database with ingest (the consumer): the writes' latency stays that of ingest alone
        and the fold takes the time left (:meth:`catch_up` alone never rests)."""
        self.recomputed = 0
        """Vehicles recomputed so far (for logs, tests and the benchmark)."""

    async def prepare(self, connection: Any) -> None:
        """Nothing per connection: the statements are plain."""
        del connection

    async def apply(self, connection: Any, write: Staged) -> None:
        """Mark each vehicle's span dirty; store trouble-code reports and their events."""
        await mark(connection, write)

    async def catch_up(
        self, pool: Any, *, settle_s: float | None = None, rest: bool = False
    ) -> int:
        """Recompute the vehicles whose dirty span has settled (one claim, in chunks of
        ``chunk`` vehicles per transaction); how many were. ``settle_s`` given: that settle
        time alone, no fraction of an open trip (everything due now)."""
        settle = self.thresholds.settle_s if settle_s is None else settle_s
        t = self.thresholds
        fraction = t.settle_fraction if settle_s is None else 0.0
        rows = await pool.fetch(CLAIM_SQL, settle, self.claim, t.live_s, fraction)
        vins = [row[0] for row in rows]
        chunks = [vins[k : k + self.chunk] for k in range(0, len(vins), self.chunk)]
        done = 0

        loop = asyncio.get_running_loop()

        async def worker() -> None:
            nonlocal done
            while chunks:
                began = loop.time()
                folded = await self._fold(pool, chunks.pop())
                done += folded  # not `done += await ...`: that reads done before the await
                if rest and self.share < 1:
                    await asyncio.sleep((loop.time() - began) * (1 / self.share - 1))

        async with asyncio.TaskGroup() as tg:
            for k in range(min(self.workers, len(chunks))):
                tg.create_task(worker(), name=f"insight-worker-{k}")
        self.recomputed += done
        return done

    async def _fold(self, pool: Any, vins: list[str]) -> int:
        """One chunk in one transaction; if it fails while the database answers, each vehicle
        alone, so that one vehicle's trouble (a bug, a value the tables refuse) holds up only
        itself: it is logged and retried a minute later."""
        try:
            async with pool.acquire() as connection, connection.transaction():
                return await recompute(connection, vins, self.thresholds)
        except Exception:
            await pool.fetchval("SELECT 1")  # an outage raises here: the caller waits it out
            if len(vins) == 1:
                raise
        done = 0
        for vin in vins:
            try:
                async with pool.acquire() as connection, connection.transaction():
                    done += await recompute(connection, [vin], self.thresholds)
            except Exception as exc:  # noqa: BLE001 - one vehicle: said, postponed, not fatal
                await pool.fetchval("SELECT 1")
                log.warning(
                    "insight recompute of one vehicle failed; retrying in a minute",
                    extra=kv(vin=vin, error=f"{type(exc).__name__}: {exc}"),
                )
                await pool.execute(POSTPONE_SQL, vin)
        return done

    async def run(self, pool: Any) -> None:
        """Recompute dirty vehicles until cancelled; a failure is logged and retried."""
        from revline.backoff import backoff_delay  # noqa: PLC0415 - tenacity only when run

        failures = 0
        while True:
            try:
                done = await self.catch_up(pool, rest=True)
            except Exception as exc:  # noqa: BLE001 - an outage or a bug: said, retried, never fatal
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "insight recompute failed; retrying",
                        extra=kv(error=f"{type(exc).__name__}: {exc}", failures=failures),
                    )
                await asyncio.sleep(backoff_delay(failures, initial=self.poll_s, maximum=30.0))
                continue
            if failures:
                log.info("insight recompute works again", extra=kv(after_failures=failures))
                failures = 0
            if done == 0:
                await asyncio.sleep(self.poll_s)
