"""``revline audit [VIN] [--since]``: every loss with its cause and count; exit 1 on an undeclared
gap open past the grace period (for cron and monitoring).

Only the standard library and the core at top level (see revline/cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from revline.contract import is_valid_vin
from revline.settings import ConfigError

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["parse_since", "register"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|min|h|d)$")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: a duration back from now (``90s``, ``15m``, ``6h``, ``2d``) or an ISO 8601
    time (UTC unless it says otherwise); ConfigError naming ``since`` otherwise."""
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            "since", "", f"expected a duration like 6h or 2d, or an ISO time, got {text!r}"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def register(commands: Commands) -> None:
    """Add ``revline audit``."""
    parser = commands.add(
        commands.top,
        "audit",
        "per vehicle: samples stored, gaps open/repaired/lost with causes, broker drops",
        _run,
    )
    parser.add_argument("vin", nargs="?", help="one vehicle (default: every vehicle)")
    parser.add_argument("--since", help="only what happened since: 6h, 2d, or an ISO time")
    parser.add_argument(
        "--grace",
        type=float,
        default=900.0,
        help="exit 1 when an undeclared gap is open longer than this many seconds (900)",
    )
    parser.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")


def _run(args: argparse.Namespace) -> int:
    import asyncpg  # noqa: PLC0415 - heavy imports only when the command runs

    from revline.audit.report import format_report, read_report  # noqa: PLC0415
    from revline.storage.errors import describe  # noqa: PLC0415

    if args.vin is not None and not is_valid_vin(args.vin):
        raise ConfigError(
            "vin", "", f"expected a VIN (17 of 0-9 A-Z without I, O, Q), got {args.vin!r}"
        )
    if args.grace < 0:
        raise ConfigError("grace", "", f"expected seconds >= 0, got {args.grace}")
    url = (
        args.database_url
        or os.environ.get("DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    if not url.startswith(("postgres://", "postgresql://")):
        raise ConfigError("database_url", "", f"expected postgresql://..., got {url!r}")
    since = None if args.since is None else parse_since(args.since, datetime.now(UTC))
    grace = timedelta(seconds=args.grace)

    async def main() -> int:
        connection = await asyncpg.connect(url, timeout=10)
        try:
            report = await read_report(connection, args.vin, since)
        finally:
            await connection.close()
        for line in format_report(report, grace):
            print(line)
        return 1 if report.overdue(grace) else 0

    try:
        return asyncio.run(main())
    except asyncpg.UndefinedTableError:
        print("revline audit: database has no audit tables: run `revline migrate`", file=sys.stderr)
        return 3
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        print(f"revline audit: database unreachable: {describe(exc)}", file=sys.stderr)
        return 3
