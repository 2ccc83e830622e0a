"""Insight kept up to date from every committed write: the derivation and its background task.

Inside each write's transaction (:meth:`Insight.apply`) only cheap facts are recorded: one
``insight_dirty`` row per vehicle of the write (its time span, merged with what is already
there) and the trouble-code reports the samples carry, from which that vehicle's ``dtc_events``
are re-derived at once (reports are rare: a few a day).

After commit, :meth:`Insight.run` recomputes each dirty vehicle once its first unfolded write is
``settle_s`` old, in one transaction per vehicle:

1. widen the span to the stored trips and events within reach of it (repeated until stable);
2. read the cold samples of the widened span plus a margin, run the pure policies
   (:mod:`revline.insight.segment`, :mod:`revline.insight.episodes`);
3. replace the trips and events that meet the span by those computed, re-derive the odometer
   history from there on, and the vehicle's activity when the span reaches its newest sample;
4. delete the dirty row if no write touched it meanwhile (its ``generation`` is unchanged).

Why that is exact: trips and events are functions of the set of samples, where samples further
apart than a reach (:attr:`Thresholds.reach_s`) never interact; the widened span holds every
stored item they could merge with, and the margin every unstored piece (shorter than its
minimum). So a backlog uploaded late, shuffled or in halves gives the rows the same samples give
live, and a redelivered write changes nothing. A per-vehicle advisory lock keeps two consumers
from recomputing the same vehicle at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

from revline.contract import FLAG_CLOCK_UNSYNCED, Sample
from revline.fields import FIELD_BY_NAME
from revline.insight.dtc import dtc_events
from revline.insight.episodes import Event, events
from revline.insight.odometer import OdometerPoint, TripEnd, history
from revline.insight.segment import Point, Trip, activity, segment
from revline.insight.thresholds import THRESHOLDS, Thresholds
from revline.insight.window import meets, reach_us, widen, window
from revline.logs import kv
from revline.storage.derive import spans

__all__ = ["Insight", "recompute_vehicle"]

log = logging.getLogger("revline.insight")

_US: Final = 1_000_000
_LOCK_CLASS: Final = 0x1E51  # advisory lock class of insight's per-vehicle recompute
_DTC: Final = 1 + Sample.__struct_fields__.index("dtc")
"""Position of ``dtc`` in a staging row (the VIN, then the sample's fields)."""


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
    "SELECT vin FROM insight_dirty WHERE dirty_since <= now() - $1 * interval '1 second' "
    "ORDER BY dirty_since LIMIT $2"
)
LOCK_SQL: Final = "SELECT pg_try_advisory_xact_lock($1, hashtext($2))"
DIRTY_SQL: Final = (
    f"SELECT {_us('ts_min')}, {_us('ts_max')}, generation FROM insight_dirty WHERE vin = $1"
)
HULL_SQL: Final = (
    "SELECT min(s), max(e) FROM ("
    f"SELECT {_us('start_ts')} AS s, {_us('end_ts')} AS e FROM trips "
    f"WHERE vin = $1 AND end_ts >= {_at('$2')} AND start_ts <= {_at('$3')} "
    f"UNION ALL SELECT {_us('start_ts')}, {_us('end_ts')} FROM vehicle_events "
    f"WHERE vin = $1 AND end_ts >= {_at('$2')} AND start_ts <= {_at('$3')}) AS x"
)
POINTS_SQL: Final = (
    f"SELECT {_us('ts')}, coalesce({_value('speed')}, {_value('gps_speed')}), "
    + ", ".join(
        _value(name)
        for name in ("rpm", "coolant", "battery", "fuel", "maf", "lat", "lon", "odometer")
    )
    + f" FROM samples WHERE vin = $1 AND ts >= {_at('$2')} AND ts <= {_at('$3')} "
    f"AND flags & {FLAG_CLOCK_UNSYNCED} = 0 ORDER BY ts, seq"
)
"""What :class:`Point` holds, from the cold table (samples of an unsynced clock left out)."""
DATA_END_SQL: Final = f"SELECT {_us('ts')} FROM vehicle_state WHERE vin = $1"
PREVIOUS_ODOMETER_SQL: Final = (
    f"SELECT odometer_km FROM odometer_history WHERE vin = $1 AND ts < {_at('$2')} "
    "ORDER BY ts DESC LIMIT 1"
)
DELETE_TRIPS_SQL: Final = (
    f"DELETE FROM trips WHERE vin = $1 AND end_ts >= {_at('$2')} AND start_ts <= {_at('$3')}"
)
LATER_TRIPS_SQL: Final = (
    f"SELECT {_us('t.end_ts')}, t.distance_km, h.reading_km, {_us('t.start_ts')} FROM trips t "
    "LEFT JOIN odometer_history h ON h.vin = t.vin AND h.ts = t.end_ts "
    f"WHERE t.vin = $1 AND t.end_ts >= {_at('$2')} ORDER BY t.end_ts"
)
DELETE_HISTORY_SQL: Final = f"DELETE FROM odometer_history WHERE vin = $1 AND ts >= {_at('$2')}"
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
    f"DELETE FROM vehicle_events e WHERE e.vin = $1 AND e.end_ts >= {_at('$2')} "
    f"AND e.start_ts <= {_at('$3')} AND NOT EXISTS ("
    "SELECT 1 FROM unnest($4::text[], $5::bigint[]) AS u (kind, start) "
    f"WHERE u.kind = e.kind AND {_at('u.start')} = e.start_ts)"
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
    "UPDATE trips SET closed = true WHERE vin = $1 AND NOT closed "
    f"AND end_ts < {_at('$2')} - $3 * interval '1 second'"
)
"""Trips the newest data has left behind by more than the merge gap can no longer grow."""
DONE_SQL: Final = "DELETE FROM insight_dirty WHERE vin = $1 AND generation = $2"
AGAIN_SQL: Final = "UPDATE insight_dirty SET dirty_since = now() WHERE vin = $1"


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


async def recompute_vehicle(connection: Any, vin: str, t: Thresholds = THRESHOLDS) -> bool:
    """Fold one vehicle's dirty span into its trips, events, odometer and activity, in the
    caller's transaction; False if another recompute holds the vehicle or nothing is dirty."""
    if not await connection.fetchval(LOCK_SQL, _LOCK_CLASS, vin):
        return False
    dirty = await connection.fetchrow(DIRTY_SQL, vin)
    if dirty is None:
        return False
    lo, hi, generation = dirty
    await recompute_span(connection, vin, lo, hi, t)
    if await connection.execute(DONE_SQL, vin, generation) == "DELETE 0":
        # Written to meanwhile: its samples may have come after ours were read. Again, later.
        await connection.execute(AGAIN_SQL, vin)
    return True


async def recompute_span(connection: Any, vin: str, lo: int, hi: int, t: Thresholds) -> None:
    """Recompute what the samples of ``vin`` between ``lo`` and ``hi`` (µs) can change."""
    reach = reach_us(t)
    while True:
        found = await connection.fetchrow(HULL_SQL, vin, lo - reach, hi + reach)
        wider = widen(lo, hi, [tuple(found)])
        if wider == (lo, hi):
            break
        lo, hi = wider
    w = window(lo, hi, t)
    core = (w.core_lo, w.core_hi)
    rows = await connection.fetch(POINTS_SQL, vin, w.read_lo, w.read_hi)
    points = [Point(*row) for row in rows]
    data_end = await connection.fetchval(DATA_END_SQL, vin)
    trips = [tr for tr in segment(points, t, data_end=data_end) if meets(*core, tr.start, tr.end)]
    found = [ev for ev in events(points, t) if meets(*core, ev.start, ev.end)]
    previous = await connection.fetchval(PREVIOUS_ODOMETER_SQL, vin, core[0])
    await connection.execute(DELETE_TRIPS_SQL, vin, *core)
    later = await connection.fetch(LATER_TRIPS_SQL, vin, core[0])
    ends = [TripEnd(tr.end, tr.distance_km, tr.odometer_end) for tr in trips]
    ends += [TripEnd(end, distance, reading) for end, distance, reading, _ in later]
    points_h = history(previous, ends, t)
    await connection.execute(DELETE_HISTORY_SQL, vin, core[0])
    await connection.executemany(
        INSERT_HISTORY_SQL,
        [(vin, p.ts, p.odometer_km, p.reading_km, p.source, p.anomaly, p.anomaly_km)
         for p in points_h],
    )
    starts = [_odometer_start(previous, points_h, i, ends) for i in range(len(ends))]
    await connection.executemany(
        INSERT_TRIP_SQL,
        [_trip_row(vin, tr, found, starts[i], points_h[i]) for i, tr in enumerate(trips)],
    )
    await connection.executemany(
        UPDATE_TRIP_ODOMETER_SQL,
        [
            (vin, start_us, starts[len(trips) + k], points_h[len(trips) + k].odometer_km)
            for k, (*_, start_us) in enumerate(later)
        ],
    )
    await connection.execute(
        DELETE_EVENTS_SQL, vin, *core, [ev.kind for ev in found], [ev.start for ev in found]
    )
    await connection.executemany(
        UPSERT_EVENT_SQL,
        [(vin, ev.kind, ev.start, ev.end, ev.peak, ev.threshold, ev.lat, ev.lon) for ev in found],
    )
    if data_end is not None:
        await connection.execute(CLOSE_TRIPS_SQL, vin, data_end, t.merge_gap_s)
    if points and (data_end is None or w.read_hi >= data_end):
        state = activity(points, t)
        if state is not None:
            await connection.execute(
                UPSERT_ACTIVITY_SQL, vin, state.state, state.since, state.last_ts
            )


def _odometer_start(
    previous: float | None, points: Sequence[OdometerPoint], i: int, ends: Sequence[TripEnd]
) -> float:
    before = previous if i == 0 else points[i - 1].odometer_km
    start = points[i].odometer_km - ends[i].distance_km
    return max(start, before) if before is not None else max(start, 0.0)


def _trip_row(
    vin: str, trip: Trip, found: Sequence[Event], start_km: float, end: OdometerPoint
) -> tuple[Any, ...]:
    inside = [ev for ev in found if trip.start <= ev.start <= trip.end]
    return (
        vin, trip.start, trip.end, trip.start_lat, trip.start_lon, trip.end_lat, trip.end_lon,
        trip.duration_s, trip.moving_s, trip.distance_km, trip.distance_source, trip.avg_speed,
        trip.max_speed, trip.max_rpm, trip.max_coolant, trip.min_battery, trip.fuel_used_pct,
        trip.fuel_used_l, min(start_km, end.odometer_km), end.odometer_km, trip.samples,
        trip.gap_s, trip.completeness,
        sum(1 for ev in inside if ev.kind == "hard_brake"),
        sum(1 for ev in inside if ev.kind == "hard_accel"),
        trip.closed,
    )


class Insight:
    """The insight derivation (:class:`revline.storage.derive.Derivation` and ``Background``)."""

    name = "insight"

    def __init__(
        self,
        thresholds: Thresholds = THRESHOLDS,
        *,
        poll_s: float = 1.0,
        claim: int = 500,
        workers: int = 2,
    ) -> None:
        self.thresholds = thresholds
        self.poll_s = poll_s
        self.claim = claim
        self.workers = workers
        self.recomputed = 0
        """Vehicles recomputed so far (for logs, tests and the benchmark)."""

    async def prepare(self, connection: Any) -> None:
        """Nothing per connection: the statements are plain."""
        del connection

    async def apply(self, connection: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """Mark each vehicle's span dirty; store trouble-code reports and their events."""
        found = sorted(spans(rows), key=lambda s: s.vin)  # one lock order for every write
        await connection.execute(
            MARK_DIRTY_SQL,
            [s.vin for s in found],
            [s.ts_min for s in found],
            [s.ts_max for s in found],
        )
        reports = [(r[0], r[1], r[2], r[_DTC]) for r in rows if r[_DTC] is not None]
        if reports:
            await record_dtc(connection, reports)

    async def catch_up(self, pool: Any, *, settle_s: float | None = None) -> int:
        """Recompute the vehicles whose dirty span has settled (one claim); how many were."""
        settle = self.thresholds.settle_s if settle_s is None else settle_s
        vins = [row[0] for row in await pool.fetch(CLAIM_SQL, settle, self.claim)]
        done = 0
        queue = list(vins)

        async def worker() -> None:
            nonlocal done
            while queue:
                vin = queue.pop()
                async with pool.acquire() as connection, connection.transaction():
                    if await recompute_vehicle(connection, vin, self.thresholds):
                        done += 1

        async with asyncio.TaskGroup() as tg:
            for k in range(min(self.workers, len(vins))):
                tg.create_task(worker(), name=f"insight-worker-{k}")
        self.recomputed += done
        return done

    async def run(self, pool: Any) -> None:
        """Recompute dirty vehicles until cancelled; a failure is logged and retried."""
        from revline.backoff import backoff_delay  # noqa: PLC0415 - tenacity only when run

        failures = 0
        while True:
            try:
                done = await self.catch_up(pool)
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
