"""The SQL migrations against the field table (revline/fields.py), on a real PostgreSQL and on
TimescaleDB in WASM: every table and view has exactly the table's columns with its types, a value
of every field reads back the same through each of them, and the newest migration upgrades a
database holding data without losing a row (rollup history older than the raw data included) or
a policy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest

from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.fields import FIELDS, Field
from revline.storage.migrate import (
    AsyncpgSession,
    MigrateSettings,
    Session,
    default_sql_dir,
    discover,
    migrate,
)
from tests.fixtures.storage import PGliteSession
from tests.fixtures.storage import write as stage_and_write

SETTINGS: Final = MigrateSettings()
T0_US: Final = 1_717_243_200_000_000  # 2024-06-01T12:00:00Z
DAY_US: Final = 86_400 * 1_000_000
OTHER_VIN: Final = "1HGCM82633A004352"
"""A second vehicle in a test's own database, whose first one holds the upgrade's rows."""
CUTOFF: Final = "timestamptz '2024-06-01T00:00:00Z'"
"""Between the two days of the upgrade's raw rows: the older day's are dropped."""
TS: Final = "timestamptz 'epoch' + $2::bigint * interval '1 microsecond'"

FIXED: Final = {
    "samples": {"vin", "ts", "seq", "received_at", "flags", "extra"},
    "vehicle_state": {"vin", "ts", "seq", "flags", "updated_at", "extra", "extra_ts"},
    "samples_decoded": {"vin", "ts", "seq", "received_at", "flags", "extra"},
    "samples_1m": {"vin", "bucket", "sample_count"},
    "samples_1h": {"vin", "bucket", "sample_count"},
}
"""The columns of each relation that are not a measurement's."""

TIMESTAMPTZ: Final = "timestamp with time zone"
Write = Callable[[Session, list[Batch]], Awaitable[None]]


def expected_columns() -> dict[str, dict[str, str]]:
    """Each relation's measurement columns and their types, from the field table alone."""
    rollup = {
        f"{f.name}_{agg}": "double precision" if agg == "avg" else f.value_type
        for f in FIELDS
        for agg in ("avg", "min", "max")
    }
    return {
        "samples": {f.cold_column: f.cold_type for f in FIELDS},
        "vehicle_state": {
            column: kind
            for f in FIELDS
            for column, kind in ((f.name, f.value_type), (f"{f.name}_ts", TIMESTAMPTZ))
        },
        "samples_decoded": {f.name: f.value_type for f in FIELDS},
        "samples_1m": rollup,
        "samples_1h": rollup,
    }


def typical(field: Field) -> float:
    """A value inside the field's bounds, at the device's resolution, neither 0 nor a bound."""
    raw = field.lo + (field.hi - field.lo) * 0.6180339887
    return round(raw * field.device_scale) / field.device_scale


async def measurement_columns(session: Session) -> dict[str, dict[str, str]]:
    """What the database has, in the shape of :func:`expected_columns`."""
    found: dict[str, dict[str, str]] = {}
    for relation, fixed in FIXED.items():
        rows = await session.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            relation,
        )
        names = {str(r["column_name"]) for r in rows}
        assert fixed <= names, f"{relation} lacks {fixed - names}"
        found[relation] = {
            str(r["column_name"]): str(r["data_type"])
            for r in rows
            if r["column_name"] not in fixed
        }
    return found


async def refresh_rollups(session: Session, mode: str) -> None:
    """Bring samples_1m and samples_1h up to date, as the policies or maintenance would."""
    for view, width in (("samples_1m", "1 minute"), ("samples_1h", "1 hour")):
        if mode == "timescaledb":
            await session.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")
        else:
            await session.execute(
                f"SELECT revline_refresh_rollup('{view}', interval '{width}', interval '1 hour')"
            )


async def rows(session: Session, relation: str, vin: str) -> list[dict[str, Any]]:
    """A vehicle's rows of ``relation`` as JSON objects (the same from asyncpg and PGlite)."""
    found = await session.fetch(
        f"SELECT to_jsonb(r)::text AS row FROM {relation} r WHERE vin = $1 ORDER BY 1", vin
    )
    return [json.loads(r["row"]) for r in found]


async def check_every_field_reads_back(
    session: Session, mode: str, write: Write, vin: str
) -> None:
    """One sample carrying every field, written by the writer's SQL, reads back the same from
    the decoded view, the hot table and both rollups."""
    values: dict[str, Any] = {f.name: typical(f) for f in FIELDS}
    sample = Sample(ts=T0_US, seq=7, **values)
    await write(session, [Batch(v=1, vin=vin, batch=1, samples=[sample])])
    await refresh_rollups(session, mode)
    [decoded] = await rows(session, "samples_decoded", vin)
    [hot] = await rows(session, "vehicle_state", vin)
    [minute] = await rows(session, "samples_1m", vin)
    [hour] = await rows(session, "samples_1h", vin)
    for field in FIELDS:
        value = values[field.name]
        got = {
            "decoded": decoded[field.name],
            "hot": hot[field.name],
            **{f"{view}_{agg}": row[f"{field.name}_{agg}"]
               for view, row in (("1m", minute), ("1h", hour)) for agg in ("avg", "min", "max")},
        }
        assert got == {key: pytest.approx(value, rel=1e-6) for key in got}, field.name


def older_migrations(tmp_path: Path, mode: str) -> tuple[Path, list[str]]:
    """A copy of sql/ without the newest numbered migration of ``mode``, and that one's keys."""
    for path in default_sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    found = discover(tmp_path, mode)
    newest = max(m.version for m in found if m.version is not None)
    for migration in found:
        if migration.version == newest:
            migration.path.unlink()
    return tmp_path, [m.key for m in found if m.version == newest]


async def jobs(session: Session) -> list[tuple[str, str, str, str]]:
    """TimescaleDB's policies on samples and the rollups, without their internal ids."""
    found = await session.fetch(
        "SELECT proc_name, hypertable_name, schedule_interval::text AS every, "
        "(config - 'mat_hypertable_id' - 'hypertable_id')::text AS config "
        "FROM timescaledb_information.jobs WHERE hypertable_name LIKE 'samples%'"
    )
    return sorted((r["proc_name"], r["hypertable_name"], r["every"], r["config"]) for r in found)


async def check_upgrade_keeps_everything(
    session: Session, tmp_path: Path, mode: str, vin: str
) -> None:
    """Migrate to the schema before the newest migration; store raw rows on two days, a hot row
    and their rollups; drop the older day's raw rows as retention would (TimescaleDB: compress
    the other day's chunk, grant a reader the rollups); then apply the newest migration. Every
    rollup row keeps its values (new columns empty), the policies and grants are as before, the
    raw and hot rows are readable, and the schema matches the field table."""
    directory, newest = older_migrations(tmp_path, mode)
    assert (await migrate(session, SETTINGS, directory)).mode == mode
    first = FIELDS[0]
    for seq, ts in ((1, T0_US - DAY_US), (2, T0_US)):
        await session.execute(
            f"INSERT INTO samples (vin, ts, seq, {first.cold_column}) VALUES ($1, {TS}, $3, $4)",
            vin, ts, seq, round(typical(first) * 10**first.db_digits),
        )
    await session.execute(
        f"INSERT INTO vehicle_state (vin, ts, seq, {first.name}, {first.name}_ts) "
        f"VALUES ($1, {TS}, 2, $3, {TS})",
        vin, T0_US, typical(first),
    )
    await refresh_rollups(session, mode)
    if mode == "timescaledb":
        await session.execute(f"SELECT drop_chunks('samples', older_than => {CUTOFF})")
        await session.execute("SELECT compress_chunk(c) FROM show_chunks('samples') c")
        await session.execute("CREATE ROLE revline_reader")
        await session.execute("GRANT SELECT ON samples_1m, samples_1h TO revline_reader")
    else:
        await session.execute(f"DELETE FROM samples WHERE ts < {CUTOFF}")
    rollups = {view: await rows(session, view, vin) for view in ("samples_1m", "samples_1h")}
    assert [len(r) for r in rollups.values()] == [2, 2]
    policies = await jobs(session) if mode == "timescaledb" else []

    assert (await migrate(session, SETTINGS)).applied == newest

    for view, before in rollups.items():
        after = await rows(session, view, vin)
        assert [{k: row[k] for k in old} for row, old in zip(after, before, strict=True)] == before
        assert all(v is None for row in after for k, v in row.items() if k not in before[0])
    if mode == "timescaledb":
        assert await jobs(session) == policies
        granted = await session.fetch(
            "SELECT has_table_privilege('revline_reader', 'samples_1m', 'SELECT') AS m, "
            "has_table_privilege('revline_reader', 'samples_1h', 'SELECT') AS h"
        )
        assert granted == [{"m": True, "h": True}]
    [raw] = await rows(session, "samples_decoded", vin)
    [hot] = await rows(session, "vehicle_state", vin)
    assert raw[first.name] == hot[first.name] == pytest.approx(typical(first))
    assert await measurement_columns(session) == expected_columns()


async def writer_write(url: str) -> Write:
    """The consumer's own Writer (binary COPY), as a :data:`Write`."""

    async def write(_session: Session, batches: list[Batch]) -> None:
        async with Writer(url, pool_size=1) as writer:
            await writer.write(batches)

    return write


def test_postgres_schema_matches_the_field_table(database_url: str, unique_vin: str) -> None:
    """Plain PostgreSQL, freshly migrated: the columns of every table and view are the field
    table's, and a value of every field reads back the same through each."""

    async def scenario() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            session = AsyncpgSession(connection)
            await migrate(session, SETTINGS)
            assert await measurement_columns(session) == expected_columns()
            write = await writer_write(database_url)
            await check_every_field_reads_back(session, "postgres", write, unique_vin)
        finally:
            await connection.close()

    asyncio.run(scenario())


def test_postgres_upgrade_to_the_newest_migration_keeps_every_row(
    database_url: str, unique_vin: str, tmp_path: Path
) -> None:
    """Plain PostgreSQL holding data before the newest migration: see
    :func:`check_upgrade_keeps_everything`; then every field reads back."""

    async def scenario() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            session = AsyncpgSession(connection)
            await check_upgrade_keeps_everything(session, tmp_path, "postgres", unique_vin)
            write = await writer_write(database_url)
            await check_every_field_reads_back(session, "postgres", write, OTHER_VIN)
        finally:
            await connection.close()

    asyncio.run(scenario())


@pytest.mark.timescale
def test_timescale_upgrade_to_the_newest_migration_keeps_rows_policies_and_grants(
    unique_vin: str, tmp_path: Path
) -> None:
    """TimescaleDB (WASM) holding data before the newest migration, a compressed chunk and rollup
    rows whose raw rows are gone: see :func:`check_upgrade_keeps_everything`; then every field
    reads back through the writer's SQL and the refreshed continuous aggregates."""

    async def scenario() -> None:
        async with PGliteSession() as db:
            await check_upgrade_keeps_everything(db, tmp_path, "timescaledb", unique_vin)
            await check_every_field_reads_back(db, "timescaledb", stage_and_write, OTHER_VIN)

    asyncio.run(scenario())
