"""``revline trips VIN [--since]``, ``revline vehicle VIN`` and ``revline insight fold``.

Only the standard library and the core at top level (see revline/cli.py); asyncpg and rich are
imported when a command runs. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from revline.contract import is_valid_vin
from revline.logs import kv
from revline.settings import env_value

if TYPE_CHECKING:
    from revline.cli import Commands
    from revline.insight.query import VehicleReport

__all__ = ["parse_since", "register"]

_RELATIVE: Final = re.compile(r"^(\d+)([mhdw])$")
_UNITS: Final = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class CommandError(Exception):
    """What to tell the user, in one line."""


def parse_since(text: str, now: datetime) -> datetime:
    """``30d``, ``12h``, ``90m``, ``2w`` before ``now``, or an ISO date/time (UTC if no zone)."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise CommandError(
            f"--since: expected e.g. 7d, 12h or 2024-06-01T08:00, got {text!r}"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def register(commands: Commands) -> None:
    """Add ``revline trips`` and ``revline vehicle``."""
    parser = commands.add(commands.top, "trips", "a vehicle's trips, newest first", _trips)
    parser.add_argument("vin", help="the vehicle's VIN")
    parser.add_argument(
        "--since", default="30d", help="trips ending after this: 7d, 12h, or an ISO time (30d)"
    )
    parser.add_argument("--limit", type=int, default=200, help="at most this many trips (200)")
    parser.add_argument(
        "--database-url", help="postgresql://... (env REVLINE_DATABASE_URL, DATABASE_URL)"
    )
    parser = commands.add(
        commands.top,
        "vehicle",
        "a vehicle's latest state, active trouble codes, odometer and last trip",
        _vehicle,
    )
    parser.add_argument("vin", help="the vehicle's VIN")
    parser.add_argument(
        "--database-url", help="postgresql://... (env REVLINE_DATABASE_URL, DATABASE_URL)"
    )
    group = commands.group("insight", "trips, events and odometer kept up to date")
    parser = commands.add(
        group,
        "fold",
        "fold what the consumers' writes marked into trips, events and odometer, until stopped "
        "(for consumers run with --insight-fold false; any number of these may run)",
        _fold,
    )
    parser.add_argument(
        "--database-url", help="postgresql://... (env REVLINE_DATABASE_URL, DATABASE_URL)"
    )
    parser.add_argument("--pool-size", type=int, default=4, help="database connections (4)")


def _fold(args: argparse.Namespace) -> int:
    def body() -> int:
        url = _database_url(args)
        if args.pool_size < 2:
            raise CommandError(f"--pool-size: expected at least 2, got {args.pool_size}")
        asyncio.run(_folding(url, args.pool_size))
        return 0

    return _run("insight fold", body)


async def _folding(url: str, pool_size: int) -> None:
    import asyncpg  # noqa: PLC0415 - heavy imports only when the command runs

    from revline.insight.store import Insight, setup_connection  # noqa: PLC0415

    pool = await asyncpg.create_pool(
        url, min_size=0, max_size=pool_size, init=setup_connection,
        server_settings={"application_name": "revline-insight"},
    )
    try:
        if await pool.fetchval("SELECT to_regclass('insight_dirty')") is None:
            raise CommandError(
                "database is not migrated: run `revline migrate` with the same database_url"
            )
        logging.getLogger("revline.insight").info("folding", extra=kv(pool_size=pool_size))
        await Insight().run(pool)
    finally:
        await pool.close()


def _database_url(args: argparse.Namespace) -> str:
    url: str = (
        args.database_url
        or env_value("database_url")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    if not url.startswith(("postgres://", "postgresql://")):
        raise CommandError(f"--database-url: expected postgresql://..., got {url!r}")
    return url


def _vin(text: str) -> str:
    if not is_valid_vin(text):
        raise CommandError(f"not a VIN (17 of 0-9 A-Z without I, O, Q): {text!r}")
    return text


async def _fetch(url: str, work: Any) -> Any:
    import asyncpg  # noqa: PLC0415 - heavy imports only when the command runs

    connection = await asyncpg.connect(url, timeout=10)
    try:
        return await work(connection)
    finally:
        await connection.close()


def _run(name: str, body: Any) -> int:
    import asyncpg  # noqa: PLC0415

    from revline.storage.errors import describe, unusable_database  # noqa: PLC0415

    try:
        return int(body())
    except CommandError as exc:
        print(f"revline {name}: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        what = "database unreachable" if isinstance(exc, OSError) else "database error"
        line = unusable_database(exc) or f"{what}: {describe(exc)}"
        print(f"revline {name}: {line}", file=sys.stderr)
        return 1


def _trips(args: argparse.Namespace) -> int:
    def body() -> int:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        from revline.insight.query import trips  # noqa: PLC0415

        vin = _vin(args.vin)
        since = parse_since(args.since, datetime.now(tz=UTC))
        url = _database_url(args)
        rows = asyncio.run(_fetch(url, lambda c: trips(c, vin, since, args.limit)))
        console = Console()
        if not rows:
            console.print(f"no trips of {vin} ending after {since:%Y-%m-%d %H:%M} UTC")
            return 0
        table = Table(title=f"Trips of {vin} since {since:%Y-%m-%d %H:%M} UTC")
        for column in ("start (UTC)", "end", "min", "km", "avg km/h", "max km/h", "max rpm",
                       "max °C", "fuel l", "brakes", "complete"):
            left = column.startswith(("start", "end"))
            table.add_column(column, justify="left" if left else "right")
        for r in rows:
            table.add_row(
                f"{r['start_ts'].astimezone(UTC):%Y-%m-%d %H:%M:%S}",
                f"{r['end_ts'].astimezone(UTC):%H:%M:%S}" + ("" if r["closed"] else " …"),
                f"{r['duration_s'] / 60:.0f}",
                f"{r['distance_km']:.1f}" + ("" if r["distance_source"] == "gps" else "*"),
                _num(r["avg_speed"], 0),
                _num(r["max_speed"], 0),
                _num(r["max_rpm"], 0),
                _num(r["max_coolant"], 0),
                _num(r["fuel_used_l"], 2),
                str(r["hard_brakes"]),
                f"{r['completeness']:.0%}",
            )
        console.print(table)
        console.print("* distance from integrated speed (no GPS); … may still grow")
        return 0

    return _run("trips", body)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _vehicle(args: argparse.Namespace) -> int:
    def body() -> int:
        from revline.insight.query import vehicle  # noqa: PLC0415

        vin = _vin(args.vin)
        report = asyncio.run(_fetch(_database_url(args), lambda c: vehicle(c, vin)))
        if report.state is None:
            raise CommandError(f"no data for {vin} in this database")
        _print_vehicle(report)
        return 0

    return _run("vehicle", body)


def _print_vehicle(report: VehicleReport) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    s = report.state
    age = datetime.now(tz=UTC) - s["ts"]
    table = Table(title=f"{report.vin}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    when = f"{s['ts'].astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({_age(age)} ago)"
    table.add_row("last sample", when)
    if s["state"] is not None:
        table.add_row("state", f"{s['state']} since {s['state_since'].astimezone(UTC):%H:%M:%S}")
    for label, key, unit, digits in (
        ("speed", "speed", "km/h", 0), ("rpm", "rpm", "1/min", 0), ("coolant", "coolant", "°C", 0),
        ("battery", "battery", "V", 2), ("fuel", "fuel", "%", 0),
    ):
        if s[key] is not None:
            table.add_row(label, f"{s[key]:.{digits}f} {unit}")
    if s["lat"] is not None and s["lon"] is not None:
        table.add_row("position", f"{s['lat']:.5f}, {s['lon']:.5f}")
    codes = ", ".join(
        f"{c['code']} (since {c['first_seen'].astimezone(UTC):%Y-%m-%d %H:%M})"
        for c in report.codes
    )
    table.add_row("trouble codes", codes or "none active")
    if report.odometer is not None:
        o = report.odometer
        line = f"{o['odometer_km']:.1f} km ({'OBD' if o['source'] == 'obd' else 'distance'})"
        if report.anomaly is not None:
            a = report.anomaly
            line += (f"; last anomaly: {a['anomaly']} of {a['anomaly_km']:+.1f} km "
                     f"at {a['ts'].astimezone(UTC):%Y-%m-%d}")
        table.add_row("odometer", line)
    elif s["odometer"] is not None:
        table.add_row("odometer", f"{s['odometer']:.1f} km (OBD, no trip yet)")
    t = report.last_trip
    if t is None:
        table.add_row("last trip", "none")
    else:
        table.add_row(
            "last trip",
            f"{t['start_ts'].astimezone(UTC):%Y-%m-%d %H:%M} UTC, {t['duration_s'] / 60:.0f} min, "
            f"{t['distance_km']:.1f} km, max {_num(t['max_speed'], 0)} km/h"
            + ("" if t["closed"] else " (may still grow)"),
        )
    console.print(table)


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172_800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86_400} d"
