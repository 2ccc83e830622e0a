"""Storage housekeeping for plain PostgreSQL mode (TimescaleDB does all of it with its own jobs).

One pass (:func:`maintain`): create the daily partitions ahead (moving any rows waiting in the
DEFAULT partition into them), drop partitions older than the raw retention, refresh the 1-minute
and 1-hour rollups incrementally, and apply rollup retention. The periods come from the
``revline_settings`` table that ``revline migrate`` writes. The work is done by SQL functions
(sql/002_samples.postgres.sql, sql/005_rollups.postgres.sql), so it can equally be scheduled by
pg_cron; this module calls them, logs and reports.

A transaction-level advisory lock makes a pass exclusive: with several consumers, one does the
work and the others skip it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from revline.logs import kv
from revline.storage.migrate import AsyncpgSession, applied_migrations

__all__ = ["MaintenanceReport", "maintain", "maintain_dsn", "maintain_forever"]

log = logging.getLogger(__name__)

MAINTENANCE_LOCK: Final = 0x7265766C696E66  # next to the migration lock id
ROLLUPS: Final = (
    ("samples_1m", "1 minute", "rollup_1m_retention"),
    ("samples_1h", "1 hour", "rollup_1h_retention"),
)
REFRESH_OVERLAP: Final = "5 minutes"
"""Received-at margin re-read by each rollup refresh: longer than any write transaction."""


@dataclass(frozen=True)
class MaintenanceReport:
    """What one pass did. ``skipped`` says why nothing was done, if so."""

    mode: str
    skipped: str = ""
    created: list[str] = field(default_factory=list)
    moved_rows: int = 0
    """Rows moved out of the DEFAULT partition into their new daily partition."""
    dropped: list[str] = field(default_factory=list)
    default_rows: int = 0
    """Rows still in the DEFAULT partition (beyond the partitioned window): worth a look."""
    rollup_buckets: dict[str, int] = field(default_factory=dict)
    rollup_rows_deleted: int = 0


async def maintain(connection: Any) -> MaintenanceReport:
    """One pass on an asyncpg connection; a no-op in TimescaleDB mode."""
    from revline.storage.errors import UnusableDatabaseError  # noqa: PLC0415 - needs asyncpg

    mode = (await applied_migrations(AsyncpgSession(connection))).mode
    if mode is None:
        raise UnusableDatabaseError("database is not migrated: run `revline migrate`")
    if mode != "postgres":
        return MaintenanceReport(mode=str(mode), skipped="timescaledb jobs do it")
    async with connection.transaction():
        if not await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK):
            return MaintenanceReport(mode=mode, skipped="another maintenance pass is running")
        settings = {
            r["key"]: r["value"]
            for r in await connection.fetch("SELECT key, value FROM revline_settings")
        }
        ahead = int(settings.get("partitions_ahead") or 7)
        created = await connection.fetch("SELECT * FROM revline_ensure_partitions(1, $1)", ahead)
        dropped = []
        if settings.get("raw_retention"):
            dropped = await connection.fetch(
                "SELECT * FROM revline_drop_partitions($1::text::interval)",
                settings["raw_retention"],
            )
        buckets: dict[str, int] = {}
        deleted = 0
        for table, width, retention_key in ROLLUPS:
            buckets[table] = await connection.fetchval(
                "SELECT revline_refresh_rollup($1, $2::text::interval, $3::text::interval)",
                table,
                width,
                REFRESH_OVERLAP,
            )
            retention = settings.get(retention_key)
            if retention:
                status = await connection.execute(
                    f"DELETE FROM {table} WHERE bucket < now() - $1::text::interval", retention
                )
                deleted += int(status.split()[-1])
        default_rows = await connection.fetchval("SELECT count(*) FROM samples_default")
    report = MaintenanceReport(
        mode=mode,
        created=[r["partition"] for r in created],
        moved_rows=sum(r["moved_rows"] for r in created),
        dropped=[r["partition"] for r in dropped],
        default_rows=default_rows,
        rollup_buckets=buckets,
        rollup_rows_deleted=deleted,
    )
    log.info(
        "storage maintenance",
        extra=kv(
            created=len(report.created),
            moved_rows=report.moved_rows,
            dropped=len(report.dropped),
            default_rows=report.default_rows,
            **{f"{k}_buckets": v for k, v in buckets.items()},
        ),
    )
    if default_rows:
        log.warning(
            "rows outside the daily partitions (far-future or expired timestamps)",
            extra=kv(default_rows=default_rows),
        )
    return report


async def maintain_dsn(dsn: str) -> MaintenanceReport:
    """Connect to ``dsn``, run one :func:`maintain` pass, close."""
    import asyncpg  # noqa: PLC0415 - keep this module importable without asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return await maintain(connection)
    finally:
        await connection.close()


async def maintain_forever(dsn: str, every_s: float = 60.0) -> None:
    """Run a pass every ``every_s`` seconds until cancelled; errors are logged, not raised, so a
    database outage only delays housekeeping (the writer's retries report the outage)."""
    while True:
        try:
            await maintain_dsn(dsn)
        except Exception:
            log.exception("storage maintenance failed; retrying next round")
        await asyncio.sleep(every_s)


if __name__ == "__main__":
    import sys

    from revline.storage.migrate import load_settings

    # Standalone: `python -m revline.storage.maintenance` (DATABASE_URL) or with the URL as
    # argument, e.g. from cron when no consumer runs. A failure is one line and exit code 1.
    url = sys.argv[1] if len(sys.argv) > 1 else load_settings().database_url
    try:
        print(asyncio.run(maintain_dsn(url)))
    except Exception as exc:  # noqa: BLE001 - cron mails this line; a traceback adds nothing
        from revline.storage.errors import describe, unusable_database

        print(f"maintenance: {unusable_database(exc) or describe(exc)}", file=sys.stderr)
        sys.exit(1)
