"""``revline migrate``: create or update the database schema.

Imports only the standard library and revline at top level (see revline/cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from revline.settings import add_flags, flag_values
from revline.storage.migrate import MigrateSettings

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

# A flag for every MigrateSettings key (revline.settings.add_flags), with this help.
_HELP: dict[str, str] = {
    "database_url": "postgresql://...",
    "mode": "storage mode; auto: timescaledb if the extension is available",
    "chunk_interval": "TimescaleDB chunk interval",
    "compress_after": "TimescaleDB: compress chunks older than this",
    "raw_retention": "drop raw samples older than this, or 'forever'",
    "rollup_1m_retention": "drop 1-minute rollups older than this",
    "rollup_1h_retention": "drop 1-hour rollups older than this",
    "rollup_refresh_window": "rollups pick up late samples this old",
    "partitions_ahead": "plain PostgreSQL: daily partitions created ahead of today",
}


def register(commands: Commands) -> None:
    """Add ``revline migrate``."""
    parser = commands.add(
        commands.top, "migrate", "create or update the database schema (safe to re-run)", _run
    )
    add_flags(parser, MigrateSettings, help_text=_HELP)
    parser.add_argument("--migrations-dir", type=Path, help="directory of NNN_*.sql files")



def _run(args: argparse.Namespace) -> int:
    import asyncpg  # noqa: PLC0415 - heavy imports only when the command runs

    from revline.storage.errors import describe, unusable_database  # noqa: PLC0415
    from revline.storage.migrate import MigrationError, load_settings  # noqa: PLC0415

    settings = load_settings(flags=flag_values(args, MigrateSettings))
    try:
        _migrate(settings, args.migrations_dir)
    except MigrationError as exc:
        print(f"revline migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Missing database, refused login, server down, no privilege: one line, no traceback.
        what = "database unreachable" if isinstance(exc, OSError) else "cannot migrate"
        line = unusable_database(exc) or f"{what}: {describe(exc)}"
        print(f"revline migrate: {line}", file=sys.stderr)
        return 1
    return 0


def _migrate(settings: MigrateSettings, migrations_dir: Path | None) -> None:
    from revline.storage.maintenance import maintain_dsn  # noqa: PLC0415 - needs asyncpg
    from revline.storage.migrate import migrate_dsn  # noqa: PLC0415

    report = asyncio.run(migrate_dsn(settings.database_url, settings, migrations_dir))
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
