"""Sequence accounting: which sequence numbers of each vehicle are stored, kept per committed write.

:class:`Accounting` is a :class:`revline.storage.derive.Derivation`: inside each write's
transaction it reduces the staging rows to runs of contiguous sequence numbers per vehicle in
Python (:func:`revline.audit.policy.runs`), reads the vehicle's stored runs that they touch,
merges them (:func:`revline.audit.policy.merge`) and writes back only what changed. A handful of
statements per write, whatever its size and however many vehicles it holds; never a statement
per sample. Redelivery is idempotent (a sequence number already stored counts as a duplicate,
nothing else changes); late and out-of-order backlogs merge wherever they fall.

Two writes holding the same vehicle (``write_concurrency``, or several consumers) merge one after
the other: each first takes a transaction advisory lock per vehicle (no row is written for it),
in VIN order so that two writes never wait for each other in a circle; :func:`verify_vehicle`
takes the same lock.

:func:`verify` checks stored runs against the cold table (a batch deleted by hand, a disk that lost
a page) and turns what is no longer there back into holes.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final

from revline.audit.policy import Run, merge, runs, runs_of

if TYPE_CHECKING:
    from revline.storage.derive import Staged

__all__ = ["Accounting", "VerifyResult", "verify", "verify_vehicle"]

_LOCK_KEY: Final = 0x7265  # advisory locks (this key, hashtext(vin)): one vehicle's runs

_LOCK_SQL: Final = f"""
SELECT count(pg_advisory_xact_lock({_LOCK_KEY}, hashtext(v)))
FROM (SELECT v FROM unnest($1::text[]) AS v ORDER BY v) AS q
"""

_VEHICLES_SQL: Final = """
INSERT INTO audit_vehicles AS v (vin, seq_min, seq_max, last_seen, last_write, samples, duplicates)
SELECT q.vin, q.lo, q.hi, timestamptz 'epoch' + q.ts * interval '1 microsecond', now(), q.new,
       q.dup
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
     AS q(vin, lo, hi, ts, new, dup)
ON CONFLICT (vin) DO UPDATE SET
    seq_min = least(v.seq_min, excluded.seq_min),
    seq_max = greatest(v.seq_max, excluded.seq_max),
    last_seen = greatest(v.last_seen, excluded.last_seen),
    last_write = excluded.last_write,
    samples = v.samples + excluded.samples,
    duplicates = v.duplicates + excluded.duplicates
"""

_TOUCHED_SQL: Final = """
SELECT r.vin, r.lo, r.hi, r.ts_min, r.ts_max
FROM audit_ranges r
JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS q(vin, lo, hi)
  ON r.vin = q.vin AND r.lo <= q.hi + 1 AND r.hi >= q.lo - 1
ORDER BY r.vin, r.lo
"""

_DELETE_SQL: Final = """
DELETE FROM audit_ranges r
USING unnest($1::text[], $2::bigint[]) AS d(vin, lo)
WHERE r.vin = d.vin AND r.lo = d.lo
"""

_UPSERT_SQL: Final = """
INSERT INTO audit_ranges AS r (vin, lo, hi, ts_min, ts_max)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
ON CONFLICT (vin, lo) DO UPDATE SET hi = excluded.hi, ts_min = excluded.ts_min,
    ts_max = excluded.ts_max
"""


class Accounting:
    """Per-vehicle coverage kept inside every write's transaction (the derivation seam)."""

    name = "audit"

    async def prepare(self, connection: Any) -> None:
        """Nothing per connection: the statements take arrays, no temp table is needed."""

    async def apply(self, connection: Any, write: Staged) -> None:
        """Merge the write's runs into ``audit_ranges`` and count new and duplicate samples."""
        if not write.vehicles:
            return
        vehicles = sorted(write.vehicles, key=attrgetter("vin"))
        vins = [vehicle.vin for vehicle in vehicles]
        new_runs = {vehicle.vin: runs_of(vehicle.seq, vehicle.ts) for vehicle in vehicles}
        firsts = [new_runs[v][0][0].lo for v in vins]
        lasts = [new_runs[v][0][-1].hi for v in vins]
        newest = [max(r.ts_max for r in new_runs[v][0]) for v in vins]
        await connection.fetchval(_LOCK_SQL, vins)
        touched: dict[str, list[Run]] = {}
        for record in await connection.fetch(_TOUCHED_SQL, vins, firsts, lasts):
            touched.setdefault(record[0], []).append(Run(*record[1:]))
        gone_vins: list[str] = []
        gone_los: list[int] = []
        put: list[tuple[str, int, int, int, int]] = []
        new_counts: list[int] = []
        dup_counts: list[int] = []
        for vin in vins:
            fresh, repeats = new_runs[vin]
            existing = touched.get(vin, [])
            merged, overlap = merge(existing, fresh)
            new_counts.append(sum(r.hi - r.lo + 1 for r in fresh) - overlap)
            dup_counts.append(overlap + repeats)
            kept_los = {r.lo for r in merged}
            for run in existing:
                if run.lo not in kept_los:
                    gone_vins.append(vin)
                    gone_los.append(run.lo)
            before = set(existing)
            put.extend((vin, r.lo, r.hi, r.ts_min, r.ts_max) for r in merged if r not in before)
        if gone_vins:
            await connection.execute(_DELETE_SQL, gone_vins, gone_los)
        if put:
            await connection.execute(_UPSERT_SQL, *map(list, zip(*put, strict=True)))
        await connection.execute(_VEHICLES_SQL, vins, firsts, lasts, newest, new_counts, dup_counts)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What a check of stored runs against the cold table found."""

    vehicles: int
    ranges: int
    missing: int
    """Sequence numbers the runs said were stored and the cold table no longer has."""


_RANGES_TO_CHECK_SQL: Final = """
SELECT lo, hi, ts_min, ts_max FROM audit_ranges
WHERE vin = $1 AND ts_max >= $2 ORDER BY lo
"""

_COLD_SLICE_SQL: Final = """
SELECT count(*), min(seq), max(seq) FROM samples
WHERE vin = $1 AND seq BETWEEN $2 AND $3
  AND ts BETWEEN timestamptz 'epoch' + $4 * interval '1 microsecond'
             AND timestamptz 'epoch' + $5 * interval '1 microsecond'
"""

_COLD_SEQS_SQL: Final = """
SELECT seq, ((extract(epoch FROM ts) * 1000000)::bigint) AS ts_us FROM samples
WHERE vin = $1 AND seq BETWEEN $2 AND $3
  AND ts BETWEEN timestamptz 'epoch' + $4 * interval '1 microsecond'
             AND timestamptz 'epoch' + $5 * interval '1 microsecond'
"""


async def verify_vehicle(connection: Any, vin: str, since_us: int) -> tuple[int, int]:
    """Check the vehicle's runs against the cold table's samples newer than ``since_us`` (an
    index range of the cold table per run), in the caller's transaction; what is gone becomes a
    hole. Returns ``(runs checked, sequence numbers found missing)``.

    A run older than ``since_us`` in part is checked between the first and the last sequence
    number found in the window (samples are not read beyond it: retention may have taken them).
    """
    # The vehicle's lock first: no write merges into its runs while they are rewritten.
    await connection.fetchval(_LOCK_SQL, [vin])
    await connection.execute("UPDATE audit_vehicles SET verified_at = now() WHERE vin = $1", vin)
    checked = missing = 0
    for lo, hi, ts_min, ts_max in await connection.fetch(_RANGES_TO_CHECK_SQL, vin, since_us):
        checked += 1
        start = max(ts_min, since_us)
        count, first, last = await connection.fetchrow(_COLD_SLICE_SQL, vin, lo, hi, start, ts_max)
        whole = ts_min >= since_us
        if not whole and not count:
            continue  # its recent samples are gone or it has none: which seqs, cannot tell
        a, b = (lo, hi) if whole else (first, last)
        if count >= b - a + 1:
            continue
        rows = await connection.fetch(_COLD_SEQS_SQL, vin, a, b, start, ts_max)
        left, _ = runs((int(r[0]), int(r[1])) for r in rows)
        kept = [Run(lo, a - 1, ts_min, ts_max)] if a > lo else []
        if b < hi:
            kept.append(Run(b + 1, hi, ts_min, ts_max))
        left, _ = merge(kept, left)  # the parts not checked join what is left of the rest
        missing += (b - a + 1) - count
        await connection.execute("DELETE FROM audit_ranges WHERE vin = $1 AND lo = $2", vin, lo)
        if left:
            await connection.execute(
                _UPSERT_SQL,
                [vin] * len(left),
                [r.lo for r in left],
                [r.hi for r in left],
                [r.ts_min for r in left],
                [r.ts_max for r in left],
            )
    if missing:
        await connection.execute(
            "UPDATE audit_vehicles SET samples = samples - $2 WHERE vin = $1", vin, missing
        )
    return checked, missing


async def verify(pool: Any, *, since_us: int, vehicles: int) -> VerifyResult:
    """Check the ``vehicles`` least recently checked vehicles (one transaction each)."""
    checked = ranges = missing = 0
    async with pool.acquire() as connection:
        vins = await connection.fetch(
            "SELECT vin FROM audit_vehicles ORDER BY verified_at NULLS FIRST, vin LIMIT $1",
            vehicles,
        )
        for (vin,) in vins:
            async with connection.transaction():
                n, gone = await verify_vehicle(connection, vin, since_us)
            checked += 1
            ranges += n
            missing += gone
    return VerifyResult(vehicles=checked, ranges=ranges, missing=missing)
