"""What ``revline audit`` says: per vehicle, what is stored, what is missing and why.

:func:`read_report` reads the audit's tables (a few queries, no scan of the cold table);
:func:`format_report` turns it into lines; :meth:`Report.overdue` decides the exit status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["BrokerFigures", "Report", "VehicleFigures", "format_report", "read_report"]


@dataclass
class VehicleFigures:
    """One vehicle's accounting."""

    vin: str
    samples: int = 0
    duplicates: int = 0
    seq_min: int | None = None
    seq_max: int | None = None
    last_seen: datetime | None = None
    gaps: dict[str, tuple[int, int]] = field(default_factory=dict)
    """state -> (gaps, samples): ``open``, ``repaired``, ``lost``."""
    open_gaps: list[tuple[int, int, int, datetime, bool]] = field(default_factory=list)
    """``(lo, hi, missing, opened_at, in_flight)``: in flight when the device has not acked it
    end to end yet (its backlog is still draining)."""
    lost: dict[str, tuple[int, int]] = field(default_factory=dict)
    """cause -> (events or ranges, samples), from the device's reports and the lost gaps."""
    online: bool | None = None
    status_at: datetime | None = None
    backlog: int | None = None
    oldest_unsent: datetime | None = None


@dataclass
class BrokerFigures:
    """The broker's drop counter as the audit counted it."""

    broker: str
    dropped_total: int
    last_drop_at: datetime | None
    clients: int | None
    stored: int | None


@dataclass
class Report:
    """The whole audit at one instant."""

    now: datetime
    vehicles: list[VehicleFigures]
    brokers: list[BrokerFigures]

    def overdue(self, grace: timedelta) -> list[tuple[str, int, int, int]]:
        """``(vin, lo, hi, missing)`` of undeclared gaps open longer than ``grace`` that the
        device says it has delivered (not in flight)."""
        return [
            (v.vin, lo, hi, missing)
            for v in self.vehicles
            for lo, hi, missing, opened, in_flight in v.open_gaps
            if not in_flight and self.now - opened > grace
        ]


async def read_report(connection: Any, vin: str | None, since: datetime | None) -> Report:
    """The audit of one vehicle (``vin``) or all, of what happened since ``since`` (vehicles
    written since then; gaps and losses found since then)."""
    now: datetime = await connection.fetchval("SELECT now()")
    floor = since or datetime(1970, 1, 1, tzinfo=UTC)
    vehicles: dict[str, VehicleFigures] = {}
    for r in await connection.fetch(
        "SELECT vin, samples, duplicates, seq_min, seq_max, last_seen FROM audit_vehicles "
        "WHERE ($1::text IS NULL OR vin = $1) AND last_write >= $2 ORDER BY vin",
        vin,
        floor,
    ):
        vehicles[r[0]] = VehicleFigures(r[0], r[1], r[2], r[3], r[4], r[5])

    def figures(v: str) -> VehicleFigures:
        return vehicles.setdefault(v, VehicleFigures(v))

    for v, state, count, samples in await connection.fetch(
        "SELECT vin, state, count(*), coalesce(sum(missing), 0) FROM audit_gaps "
        "WHERE ($1::text IS NULL OR vin = $1) AND (state = 'open' OR closed_at >= $2) "
        "GROUP BY vin, state",
        vin,
        floor,
    ):
        figures(v).gaps[state] = (count, samples)
    for v, lo, hi, missing, opened, floor_seq in await connection.fetch(
        "SELECT g.vin, g.lo, g.hi, g.missing, g.opened_at, s.durable_below FROM audit_gaps g "
        "LEFT JOIN audit_status s USING (vin) "
        "WHERE ($1::text IS NULL OR g.vin = $1) AND g.state = 'open' ORDER BY g.vin, g.lo",
        vin,
    ):
        in_flight = floor_seq is not None and lo >= floor_seq
        figures(v).open_gaps.append((lo, hi, missing, opened, in_flight))
    for v, cause, count, samples in await connection.fetch(
        "SELECT vin, cause, count(*), sum(samples) FROM audit_losses "
        "WHERE ($1::text IS NULL OR vin = $1) AND reported_at >= $2 GROUP BY vin, cause",
        vin,
        floor,
    ):
        figures(v).lost[cause] = (count, int(samples))
    for v, online, at, backlog, oldest in await connection.fetch(
        "SELECT vin, online, received_at, backlog, oldest_unsent FROM audit_status "
        "WHERE ($1::text IS NULL OR vin = $1)",
        vin,
    ):
        if v in vehicles or vin is not None:
            f = figures(v)
            f.online, f.status_at, f.backlog, f.oldest_unsent = online, at, backlog, oldest
    brokers = [
        BrokerFigures(r[0], r[1], r[2], r[3], r[4])
        for r in await connection.fetch(
            "SELECT broker, dropped_total, last_drop_at, clients, stored_messages "
            "FROM audit_broker WHERE dropped_total > 0 AND (last_drop_at IS NULL "
            "OR last_drop_at >= $1) ORDER BY broker",
            floor,
        )
    ]
    return Report(now=now, vehicles=sorted(vehicles.values(), key=lambda f: f.vin), brokers=brokers)


def _when(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "never"
    seconds = max((now - at).total_seconds(), 0.0)
    if seconds < 120:
        ago = f"{seconds:.0f} s ago"
    elif seconds < 7200:
        ago = f"{seconds / 60:.0f} min ago"
    else:
        ago = f"{seconds / 3600:.1f} h ago"
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z ({ago})"


_CAUSES = {
    "evicted": "evicted by the device's full spool",
    "crash": "lost to a device crash before they reached its spool (estimate)",
    "not_held": "asked for again, no longer in the device's spool",
}


def format_report(report: Report, grace: timedelta) -> list[str]:
    """Lines for a terminal; the last one is the verdict."""
    lines: list[str] = []
    now = report.now
    lost_total = 0
    for v in report.vehicles:
        span = "" if v.seq_min is None else f" (seq {v.seq_min}..{v.seq_max})"
        lines.append(f"{v.vin}  last seen {_when(v.last_seen, now)}")
        lines.append(f"  stored      {v.samples} samples{span}, {v.duplicates} duplicates absorbed")
        gaps = ", ".join(
            f"{v.gaps.get(state, (0, 0))[0]} {state} ({v.gaps.get(state, (0, 0))[1]} samples)"
            for state in ("open", "repaired", "lost")
        )
        lines.append(f"  gaps        {gaps}")
        for lo, hi, missing, opened, in_flight in v.open_gaps[:10]:
            what = "in flight: the device has not delivered it yet" if in_flight else "undeclared"
            since = _when(opened, now)
            lines.append(f"    open      seq {lo}..{hi}: {missing} missing since {since}, {what}")
        for cause, (count, samples) in sorted(v.lost.items()):
            lost_total += samples
            label = _CAUSES.get(cause, cause)
            unit = "restarts" if cause == "crash" else "ranges"
            lines.append(f"  lost        {samples} samples {label} ({count} {unit})")
        if v.status_at is not None:
            state = "online" if v.online else "offline"
            oldest = (
                "" if v.oldest_unsent is None else f", oldest unsent {_when(v.oldest_unsent, now)}"
            )
            lines.append(
                f"  device      {state}, backlog {v.backlog} samples{oldest} "
                f"(status {_when(v.status_at, now)})"
            )
    for b in report.brokers:
        lines.append(
            f"broker {b.broker}: {b.dropped_total} messages dropped past its queue limit, last "
            f"{_when(b.last_drop_at, now)} (devices resend what they do not see acked)"
        )
    overdue = report.overdue(grace)
    open_samples = sum(m for v in report.vehicles for _, _, m, _, _ in v.open_gaps)
    if overdue:
        missing = sum(m for *_, m in overdue)
        lines.append(
            f"LOSS: {len(overdue)} undeclared gaps ({missing} samples) open longer than "
            f"{grace.total_seconds():.0f} s"
        )
    elif lost_total or report.brokers:
        drops = sum(b.dropped_total for b in report.brokers)
        lines.append(
            f"losses named above: {lost_total} samples declared lost by devices, "
            f"{drops} messages dropped by the broker; no undeclared gap past the grace period"
        )
    elif open_samples:
        lines.append(f"no loss yet: {open_samples} samples missing in gaps still within grace")
    else:
        vehicles = len(report.vehicles)
        stored = sum(v.samples for v in report.vehicles)
        lines.append(f"nothing lost: {stored} samples of {vehicles} vehicles stored, no gap open")
    return lines
