"""The audit's tables (sql/009_audit.sql): what devices report, the broker's counters, the gaps.

Every function takes an asyncpg connection and runs a few statements; the decisions are made by
:mod:`revline.audit.policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from revline.audit.policy import Gap, GapChanges, Range, holes
from revline.contract import Status, printable

__all__ = [
    "MAX_DEAD_LETTER_BYTES",
    "dead_letter",
    "declared_losses",
    "durable_floors",
    "gaps_open",
    "now_holes",
    "record_broker",
    "record_requests",
    "record_status",
    "save_changes",
]

MAX_DEAD_LETTER_BYTES: Final = 64 * 1024
"""Raw bytes kept of a refused status (the rest is counted in the detail)."""

_STATUS_SQL: Final = """
INSERT INTO audit_status AS s (vin, online, received_at, backlog, oldest_unsent, next_seq,
    durable_below, clock, version, payload)
VALUES ($1, $9, now(), $2, timestamptz 'epoch' + $3 * interval '1 microsecond', $4, $5, $6,
    $7, $8)
ON CONFLICT (vin) DO UPDATE SET online = excluded.online, received_at = now(),
    backlog = excluded.backlog,
    oldest_unsent = excluded.oldest_unsent, next_seq = excluded.next_seq,
    durable_below = excluded.durable_below, clock = excluded.clock, version = excluded.version,
    payload = excluded.payload
"""

_OFFLINE_SQL: Final = """
INSERT INTO audit_status AS s (vin, online, received_at, payload) VALUES ($1, false, now(), $2)
ON CONFLICT (vin) DO UPDATE SET online = false, received_at = now()
"""

_LOSSES_SQL: Final = """
INSERT INTO audit_losses AS l (vin, cause, lo, hi, samples, at)
SELECT $1, q.cause, q.lo, q.hi, q.samples,
       CASE WHEN q.at IS NULL THEN NULL
            ELSE timestamptz 'epoch' + q.at * interval '1 microsecond' END
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
     AS q(cause, lo, hi, samples, at)
ON CONFLICT (vin, cause, lo) DO UPDATE SET hi = greatest(l.hi, excluded.hi),
    samples = greatest(l.samples, excluded.samples), reported_at = now()
"""


async def record_status(connection: Any, status: Status, payload: bytes) -> None:
    """Store a device's latest status and the losses it declares (idempotent).

    The last will says only ``online: false`` (no ``sent_at``): it keeps what the device said
    before. A clean stop sends a whole status with ``online: false``: its backlog is kept."""
    if not status.online and status.sent_at is None:
        await connection.execute(_OFFLINE_SQL, status.vin, payload)
        return
    await connection.execute(
        _STATUS_SQL,
        status.vin,
        status.backlog,
        status.oldest_unsent,
        status.next_seq,
        status.durable_below,
        status.clock,
        status.version,
        payload,
        status.online,
    )
    losses: list[tuple[str, int, int, int, int | None]] = [
        ("evicted", r.lo, r.hi, r.samples, None) for r in status.evicted
    ]
    losses += [("not_held", r.lo, r.hi, r.samples, None) for r in status.not_held]
    # A crash has no sequence range: it sits just before `seq`, the first one after it.
    losses += [("crash", c.seq, c.seq - 1, c.samples, c.at) for c in status.crashes]
    if losses:
        await connection.execute(_LOSSES_SQL, status.vin, *map(list, zip(*losses, strict=True)))


async def dead_letter(
    connection: Any, topic: str, reason: str, detail: str, payload: bytes
) -> None:
    """Keep a refused status in ``rejected`` with its raw bytes (the head of a long one)."""
    if len(payload) > MAX_DEAD_LETTER_BYTES:
        detail = f"{detail} (first {MAX_DEAD_LETTER_BYTES} of {len(payload)} bytes kept)"
    await connection.execute(
        "INSERT INTO rejected (topic, reason, detail, payload) VALUES ($1, $2, $3, $4)",
        printable(topic, 300).replace("\x00", "\\x00"),
        reason,
        printable(detail),
        payload[:MAX_DEAD_LETTER_BYTES],
    )


_BROKER_SQL: Final = """
INSERT INTO audit_broker AS b (broker, dropped, dropped_total, stored_messages, clients,
    updated_at, last_drop_at)
VALUES ($1, coalesce($2, 0), coalesce($2, 0), $3, $4, now(),
        CASE WHEN coalesce($2, 0) > 0 THEN now() END)
ON CONFLICT (broker) DO UPDATE SET
    dropped_total = b.dropped_total + CASE
        WHEN $2 IS NULL THEN 0
        WHEN $2 >= b.dropped THEN $2 - b.dropped
        ELSE $2 END,
    last_drop_at = CASE WHEN $2 IS NOT NULL AND $2 <> b.dropped THEN now()
                        ELSE b.last_drop_at END,
    dropped = coalesce($2, b.dropped),
    stored_messages = coalesce($3, b.stored_messages),
    clients = coalesce($4, b.clients),
    updated_at = now()
RETURNING dropped_total
"""


async def record_broker(
    connection: Any,
    broker: str,
    *,
    dropped: int | None = None,
    stored: int | None = None,
    clients: int | None = None,
) -> int:
    """Store the broker's counters; a drop counter below the last one means the broker restarted
    (its counters start at 0), and counts from 0. Returns the drops counted in total."""
    total = await connection.fetchval(_BROKER_SQL, broker, dropped, stored, clients)
    return int(total)


async def now_holes(connection: Any, vins: Sequence[str] | None = None) -> dict[str, list[Range]]:
    """The holes between each vehicle's stored runs (every vehicle with runs, or ``vins``)."""
    if vins is None:
        rows = await connection.fetch("SELECT vin, lo, hi FROM audit_ranges ORDER BY vin, lo")
    else:
        rows = await connection.fetch(
            "SELECT vin, lo, hi FROM audit_ranges WHERE vin = ANY($1::text[]) ORDER BY vin, lo",
            list(vins),
        )
    runs: dict[str, list[Range]] = {}
    for vin, lo, hi in rows:
        runs.setdefault(vin, []).append((lo, hi))
    return {vin: holes(ranges) for vin, ranges in runs.items()}


async def gaps_open(connection: Any) -> list[Gap]:
    """Every open gap, with its request count; times as epoch seconds."""
    rows = await connection.fetch(
        "SELECT vin, lo, hi, requests, extract(epoch FROM opened_at)::float8, "
        "extract(epoch FROM requested_at)::float8 FROM audit_gaps WHERE state = 'open'"
    )
    return [Gap(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


async def declared_losses(connection: Any) -> dict[str, list[tuple[int, int, str]]]:
    """What each device declared lost with a sequence range: ``(lo, hi, cause)``."""
    rows = await connection.fetch(
        "SELECT vin, lo, hi, cause FROM audit_losses WHERE cause <> 'crash' ORDER BY vin, lo"
    )
    out: dict[str, list[tuple[int, int, str]]] = {}
    for vin, lo, hi, cause in rows:
        out.setdefault(vin, []).append((lo, hi, cause))
    return out


async def durable_floors(connection: Any) -> dict[str, int | None]:
    """Each reporting device's ``durable_below`` (everything under it acked end to end)."""
    rows = await connection.fetch("SELECT vin, durable_below FROM audit_status")
    return dict(rows)


async def save_changes(connection: Any, changes: GapChanges) -> None:
    """Apply what :func:`revline.audit.policy.reconcile` decided, in the caller's transaction."""
    if changes.opened:
        await connection.execute(
            "INSERT INTO audit_gaps (vin, lo, hi, missing) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) "
            "ON CONFLICT (vin, lo) DO UPDATE SET hi = excluded.hi, missing = excluded.missing, "
            "state = 'open', cause = NULL, closed_at = NULL",
            *map(list, zip(*changes.opened, strict=True)),
        )
    if changes.missing:
        await connection.execute(
            "UPDATE audit_gaps g SET missing = q.missing FROM "
            "unnest($1::text[], $2::bigint[], $3::bigint[]) AS q(vin, lo, missing) "
            "WHERE g.vin = q.vin AND g.lo = q.lo AND g.state = 'open'",
            *map(list, zip(*changes.missing, strict=True)),
        )
    if changes.repaired:
        # `missing` keeps what was missing when it was found: what the repair brought back.
        await connection.execute(
            "UPDATE audit_gaps g SET state = 'repaired', closed_at = now() FROM "
            "unnest($1::text[], $2::bigint[]) AS q(vin, lo) "
            "WHERE g.vin = q.vin AND g.lo = q.lo AND g.state = 'open'",
            *map(list, zip(*changes.repaired, strict=True)),
        )
    if changes.late:
        await connection.execute(
            "DELETE FROM audit_gaps g USING unnest($1::text[], $2::bigint[]) AS q(vin, lo) "
            "WHERE g.vin = q.vin AND g.lo = q.lo AND g.state = 'open'",
            *map(list, zip(*changes.late, strict=True)),
        )
    if changes.lost:
        await connection.execute(
            "UPDATE audit_gaps g SET state = 'lost', cause = q.cause, missing = q.missing, "
            "closed_at = now() FROM "
            "unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[]) "
            "AS q(vin, lo, cause, missing) "
            "WHERE g.vin = q.vin AND g.lo = q.lo AND g.state = 'open'",
            *map(list, zip(*changes.lost, strict=True)),
        )


async def record_requests(connection: Any, asked: Mapping[str, Sequence[Range]]) -> None:
    """Count a repair request on every open gap overlapping the ranges asked for."""
    vins: list[str] = []
    los: list[int] = []
    his: list[int] = []
    for vin, ranges in asked.items():
        for lo, hi in ranges:
            vins.append(vin)
            los.append(lo)
            his.append(hi)
    if not vins:
        return
    await connection.execute(
        "UPDATE audit_gaps g SET requests = requests + 1, requested_at = now() "
        "WHERE g.state = 'open' AND EXISTS (SELECT 1 FROM "
        "unnest($1::text[], $2::bigint[], $3::bigint[]) AS q(vin, lo, hi) "
        "WHERE g.vin = q.vin AND g.lo <= q.hi AND g.hi >= q.lo)",
        vins,
        los,
        his,
    )
