"""``revline migrate``: create or update the database schema.

Imports only the standard library and revline at top level (see revline/cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from revline.cli import Commands

__all__ = ["register"]

_INTERVAL_FLAGS = (
    ("chunk_interval", "TimescaleDB chunk interval (default: 1 day)"),
    ("compress_after", "TimescaleDB: compress chunks older than this (default: 7 days)"),
    ("raw_retention", "drop raw samples older than this, or 'forever' (default: 12 months)"),
    ("rollup_1m_retention", "drop 1-minute rollups older than this (default: 2 years)"),
    ("rollup_1h_retention", "drop 1-hour rollups older than this (default: forever)"),
    ("rollup_refresh_window", "rollups pick up late samples this old (default: 7 days)"),
)


def register(commands: Commands) -> None:
    """Add ``revline migrate``."""
    parser = commands.add(
        commands.top, "migrate", "create or update the database schema (safe to re-run)", _run
    )
    parser.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")
    parser.add_argument(
        "--mode",
        choices=["auto", "timescaledb", "postgres"],
        help="storage mode (default: timescaledb if the extension is available)",
    )
    for name, help_text in _INTERVAL_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", help=help_text)
    parser.add_argument(
        "--partitions-ahead", type=int, help="plain PostgreSQL: daily partitions ahead (7)"
    )
    parser.add_argument("--migrations-dir", type=Path, help="directory of NNN_*.sql files")



def _flags(args: argparse.Namespace) -> dict[str, object]:
    names = ["database_url", "mode", "partitions_ahead", *(n for n, _ in _INTERVAL_FLAGS)]
    return {name: getattr(args, name, None) for name in names}


def _run(args: argparse.Namespace) -> int:
    from revline.storage.maintenance import maintain_dsn  # noqa: PLC0415 - needs asyncpg
    from revline.storage.migrate import MigrationError, load_settings, migrate_dsn  # noqa: PLC0415

    settings = load_settings(flags=_flags(args))
    try:
        report = asyncio.run(migrate_dsn(settings.database_url, settings, args.migrations_dir))
    except MigrationError as exc:
        print(f"revline migrate: {exc}", file=sys.stderr)
        return 1
    print(f"mode: {report.mode}")
    if report.applied:
        print(f"applied: {', '.join(report.applied)}")
    else:
        print(f"up to date ({report.already} migrations already applied)")
    if report.mode == "postgres":
        maintenance = asyncio.run(maintain_dsn(settings.database_url))
        print(
            f"partitions: {len(maintenance.created)} created"
            + (f" ({', '.join(maintenance.created)})" if maintenance.created else "")
            + f", {len(maintenance.dropped)} dropped by retention"
        )
    return 0
