"""The TimescaleDB path, on TimescaleDB compiled to WASM (revline/tools/pglite/, PGlite).

The same migration runner applies the same sql/ files; the writer's own SQL constants write the
rows. Node.js is required: without it these tests fail (they never skip).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest

from revline.contract import Batch
from revline.storage.migrate import (
    AsyncpgSession,
    MigrateSettings,
    MigrationError,
    Session,
    applied_migrations,
    default_sql_dir,
    migrate,
)
from tests.fixtures.storage import ROLLUP_COLUMNS, PGliteSession, batch, sample, write

pytestmark = pytest.mark.timescale

SETTINGS = MigrateSettings()
MINUTE_US = 60_000_000
T0_US: Final = 1_717_243_200_123_457
"""2024-06-01T12:00:00.123457Z: every engine gets the very same rows. Stamped from the wall clock,
each engine's data fell in a different second under load and the comparison failed."""


async def snapshot(session: Session) -> dict[str, Any]:
    """Cold and hot contents as JSON text, comparable across servers and versions."""
    await session.execute("SET TimeZone = 'UTC'")
    cold = await session.fetch(
        "SELECT (to_jsonb(s) - 'received_at')::text AS row FROM samples s ORDER BY vin, ts, seq"
    )
    hot = await session.fetch(
        "SELECT (to_jsonb(v) - 'updated_at')::text AS row FROM vehicle_state v ORDER BY vin"
    )
    return {"cold": [r["row"] for r in cold], "hot": [r["row"] for r in hot]}


def scenario_batches(vin: str) -> list[list[Batch]]:
    """Writes covering the rules: redelivery, backfill, fields missing from the newest sample."""
    ts = T0_US
    first = batch(
        vin,
        [
            sample(ts, 10, speed=50.0, rpm=2000.0, lat=48.123456789, lon=11.5, extra={"A": 1.0}),
            sample(ts + 1_000_000, 11, speed=52.5, coolant=88.0, extra={"B": 2.0}),
        ],
    )
    backfill = batch(vin, [sample(ts - 3_600_000_000, 1, speed=5.0, fuel=40.0, rpm=1.0)], 2)
    later = batch(vin, [sample(ts + 2_000_000, 12, rpm=2100.0, flags=1)], 3)
    return [[first], [first, first], [backfill], [later], [first]]


async def play(session: Session, vin: str) -> dict[str, Any]:
    """Migrate, play the scenario, return the resulting snapshot."""
    report = await migrate(session, SETTINGS)
    assert report.applied[-1] == "R_policies"
    for batches in scenario_batches(vin):
        await write(session, batches)
    return await snapshot(session)


def test_timescale_migrate_twice_creates_hypertable_and_policies() -> None:
    """On TimescaleDB the migrations make a compressed hypertable with its policies; run twice,
    the second run applies nothing."""

    async def scenario() -> None:
        async with PGliteSession() as db:
            first = await migrate(db, SETTINGS)
            second = await migrate(db, SETTINGS)
            assert first.mode == "timescaledb"
            assert second.applied == []
            assert second.already == len(first.applied)
            tables = await db.fetch(
                "SELECT hypertable_name, compression_enabled "
                "FROM timescaledb_information.hypertables WHERE hypertable_name = 'samples'"
            )
            assert tables == [{"hypertable_name": "samples", "compression_enabled": True}]
            settings = await db.fetch(
                "SELECT segmentby, orderby "
                "FROM timescaledb_information.hypertable_compression_settings "
                "WHERE hypertable = 'samples'::regclass"
            )
            assert settings[0]["segmentby"] == "vin"
            assert settings[0]["orderby"].startswith("ts DESC")
            jobs = await db.fetch(
                "SELECT proc_name, coalesce(h.hypertable_name, '') AS relation, config::text "
                "FROM timescaledb_information.jobs j "
                "LEFT JOIN timescaledb_information.hypertables h USING (hypertable_name) "
                "WHERE j.application_name NOT LIKE 'Job History%' ORDER BY job_id"
            )
            procs = [j["proc_name"] for j in jobs]
            assert procs.count("policy_compression") == 1
            assert procs.count("policy_refresh_continuous_aggregate") == 2
            assert procs.count("policy_retention") == 2  # raw and 1-minute; 1-hour is forever
            views = await db.fetch(
                "SELECT view_name FROM timescaledb_information.continuous_aggregates ORDER BY 1"
            )
            assert [v["view_name"] for v in views] == ["samples_1h", "samples_1m"]

    asyncio.run(scenario())


def test_writer_sql_behaves_the_same_on_timescaledb_and_postgres(
    database_url: str, unique_vin: str
) -> None:
    """The writer's insert/upsert statements leave identical cold and hot rows in both modes:
    redelivery stores nothing twice, backfill never moves the hot row back."""

    async def scenario() -> None:
        async with PGliteSession() as db:
            on_timescale = await play(db, unique_vin)
        connection = await asyncpg.connect(database_url)
        try:
            on_postgres = await play(AsyncpgSession(connection), unique_vin)
        finally:
            await connection.close()
        assert on_timescale == on_postgres
        assert len(on_postgres["cold"]) == 4
        hot = json.loads(on_postgres["hot"][0])
        assert (hot["seq"], hot["speed"], hot["coolant"], hot["rpm"], hot["flags"]) == (
            12,
            52.5,
            88.0,
            2100.0,
            1,
        )
        assert hot["fuel"] == 40.0  # only the backfill ever carried it
        assert hot["extra"] == {"A": 1.0, "B": 2.0}

    asyncio.run(scenario())


def test_timescale_chunks_compress_and_aggregates_return_rows(unique_vin: str) -> None:
    """Days of samples make chunks; a chunk compresses and still refuses duplicates; the
    continuous aggregates refresh and return per-minute and per-hour rows."""
    start = (T0_US // MINUTE_US - 4 * 24 * 60) * MINUTE_US
    samples = [
        sample(start + i * MINUTE_US, i, speed=float(i % 100), rpm=1000.0 + i) for i in range(4320)
    ]
    batches = [batch(unique_vin, samples[k : k + 1000], k) for k in range(0, len(samples), 1000)]

    async def scenario() -> None:
        async with PGliteSession() as db:
            await migrate(db, SETTINGS)
            await write(db, batches)
            chunks = await db.fetch(
                "SELECT chunk_schema || '.' || chunk_name AS chunk FROM "
                "timescaledb_information.chunks WHERE hypertable_name = 'samples' "
                "ORDER BY range_start"
            )
            assert len(chunks) >= 3
            await db.execute("SELECT compress_chunk($1::text::regclass)", chunks[0]["chunk"])
            status = await db.fetch(
                "SELECT compression_status FROM chunk_compression_stats('samples') "
                "WHERE chunk_schema || '.' || chunk_name = $1",
                chunks[0]["chunk"],
            )
            assert status == [{"compression_status": "Compressed"}]
            await write(db, batches[:1])  # a redelivery into the compressed chunk
            count = await db.fetch("SELECT count(*)::int AS n FROM samples")
            assert count == [{"n": len(samples)}]

            for view in ("samples_1m", "samples_1h"):
                await db.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")
                columns = await db.fetch(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = $1 ORDER BY ordinal_position",
                    view,
                )
                assert tuple(c["column_name"] for c in columns) == ROLLUP_COLUMNS
            minute = await db.fetch(
                "SELECT count(*)::int AS buckets, sum(sample_count)::int AS n, "
                "max(speed_max)::float AS top FROM samples_1m WHERE vin = $1",
                unique_vin,
            )
            assert minute == [{"buckets": len(samples), "n": len(samples), "top": 99.0}]
            hour = await db.fetch(
                "SELECT sum(sample_count)::int AS n, min(rpm_min)::float AS low "
                "FROM samples_1h WHERE vin = $1",
                unique_vin,
            )
            assert hour == [{"n": len(samples), "low": 1000.0}]

    asyncio.run(scenario())


def test_broken_timescaledb_statement_fails_and_rolls_back(tmp_path: Path) -> None:
    """A TimescaleDB-only statement that TimescaleDB refuses fails the migration, leaving
    nothing of it behind."""
    for path in default_sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    cold = tmp_path / "002_samples.timescaledb.sql"
    cold.write_text(
        cold.read_text().replace("compress_segmentby = 'vin'", "compress_segmentby = 'vim'")
    )

    async def scenario() -> None:
        async with PGliteSession() as db:
            with pytest.raises(MigrationError, match=r"002_samples\.timescaledb\.sql failed"):
                await migrate(db, SETTINGS, tmp_path)
            left = await db.fetch("SELECT to_regclass('samples')::text AS samples")
            assert left == [{"samples": None}]
            applied = await applied_migrations(db)
            assert list(applied.checksums) == ["001_settings"]

    asyncio.run(scenario())
