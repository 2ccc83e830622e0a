"""Storage on a real PostgreSQL (plain mode): migrations, the writer, maintenance."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg
import pytest

from revline.cli import main
from revline.consumer.writer import Rejected, Writer
from revline.storage.errors import UnusableDatabaseError, is_data_error
from revline.storage.maintenance import maintain
from revline.storage.migrate import (
    AppliedMigrations,
    AsyncpgSession,
    MigrateSettings,
    MigrationError,
    applied_migrations,
    default_sql_dir,
    discover,
    migrate_dsn,
)
from tests.fixtures.services import PostgresService, free_port
from tests.fixtures.storage import ROLLUP_COLUMNS, batch, now_us, sample

SETTINGS = MigrateSettings()
DAY_US = 86_400 * 1_000_000
T0_US: Final = 1_717_243_200_123_457
"""2024-06-01T12:00:00.123457Z: the instant test data is stamped from, never the wall clock
(only the partition test, whose subject is "today", reads the clock)."""
ROOT = Path(__file__).resolve().parents[2]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


async def _applied(url: str) -> AppliedMigrations:
    connection = await asyncpg.connect(url)
    try:
        return await applied_migrations(AsyncpgSession(connection))
    finally:
        await connection.close()


async def _schema(url: str) -> list[tuple[str, str, str]]:
    rows = await _fetch(
        url,
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    return [(r["table_name"], r["column_name"], r["data_type"]) for r in rows]


def test_migrate_twice_is_a_no_op(database_url: str) -> None:
    """A second run applies nothing and leaves the schema exactly as the first one made it."""

    async def scenario() -> None:
        first = await migrate_dsn(database_url, SETTINGS)
        schema = await _schema(database_url)
        second = await migrate_dsn(database_url, SETTINGS)
        assert first.mode == "postgres"
        assert first.applied[0] == "001_settings"
        assert first.applied[-1] == "R_policies"
        assert second.applied == []
        assert second.already == len(first.applied)
        assert await _schema(database_url) == schema

    _run(scenario())


def test_concurrent_migrators_apply_each_migration_once(database_url: str) -> None:
    """Two migrators started together both succeed and between them apply every file once."""

    async def scenario() -> None:
        reports = await asyncio.gather(*(migrate_dsn(database_url, SETTINGS) for _ in range(3)))
        applied = [key for report in reports for key in report.applied]
        assert sorted(applied) == sorted(set(applied))
        assert len(applied) == len(discover(default_sql_dir(), "postgres"))
        recorded = await _applied(database_url)
        assert sorted(recorded.checksums) == sorted(applied)

    _run(scenario())


def test_failing_migration_leaves_the_database_as_it_was(database_url: str, tmp_path: Path) -> None:
    """A migration failing halfway is rolled back entirely and not recorded; fixed, it applies."""
    for path in default_sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / "099_broken.sql"
    broken.write_text(
        "CREATE TABLE half_done (id int);\nALTER TABLE samples ADD COLUMN x int;\nSELECT 1/0;\n"
    )

    async def scenario() -> None:
        await migrate_dsn(database_url, SETTINGS)
        before = await _schema(database_url)
        with pytest.raises(MigrationError, match=r"099_broken\.sql failed"):
            await migrate_dsn(database_url, SETTINGS, tmp_path)
        assert await _schema(database_url) == before
        assert "099_broken" not in (await _applied(database_url)).checksums
        broken.write_text("CREATE TABLE half_done (id int);\n")
        report = await migrate_dsn(database_url, SETTINGS, tmp_path)
        assert report.applied == ["099_broken"]

    _run(scenario())


def test_changed_applied_migration_is_refused(database_url: str, tmp_path: Path) -> None:
    """Editing a migration after it was applied stops the runner instead of drifting silently."""
    for path in default_sql_dir().glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)

    async def scenario() -> None:
        await migrate_dsn(database_url, SETTINGS, tmp_path)
        edited = tmp_path / "004_rejected.sql"
        edited.write_text(edited.read_text() + "\n-- edited\n")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate_dsn(database_url, SETTINGS, tmp_path)

    _run(scenario())


def test_changed_setting_reapplies_only_the_policies(database_url: str) -> None:
    """A new retention period re-applies R_policies and is stored for the maintenance task."""

    async def scenario() -> None:
        await migrate_dsn(database_url, SETTINGS)
        report = await migrate_dsn(database_url, MigrateSettings(raw_retention="90 days"))
        assert report.applied == ["R_policies"]
        rows = await _fetch(
            database_url, "SELECT value FROM revline_settings WHERE key = 'raw_retention'"
        )
        assert rows[0]["value"] == "90 days"

    _run(scenario())


def test_migrate_command_prints_mode_and_is_idempotent(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`revline migrate` names the mode, applies, creates partitions; run again it is up to date."""
    assert main(["migrate", "--database-url", database_url]) == 0
    first = capsys.readouterr().out
    assert "mode: postgres" in first
    assert "applied: 001_settings" in first
    assert "partitions: 9 created" in first  # yesterday, today and 7 ahead
    assert main(["migrate", "--database-url", database_url]) == 0
    second = capsys.readouterr().out
    assert "up to date" in second
    assert "partitions: 0 created" in second


def test_migrate_command_rejects_a_bad_interval(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed interval stops `revline migrate` with one line naming the key."""
    code = main(["migrate", "--database-url", database_url, "--raw-retention", "lots"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "raw_retention" in err
    assert "'lots'" in err
    rows = _run(
        _fetch(database_url, "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'samples'")
    )
    assert rows[0]["n"] == 0


def test_a_database_never_migrated_reads_as_such_and_is_not_maintained(database_url: str) -> None:
    """Without the migrations table the database has no recorded migration and no mode, and a
    maintenance pass says it is not migrated instead of failing on a missing table."""

    async def scenario() -> None:
        recorded = await _applied(database_url)
        assert (recorded.mode, recorded.checksums) == (None, {})
        connection = await asyncpg.connect(database_url)
        try:
            with pytest.raises(UnusableDatabaseError, match="not migrated"):
                await maintain(connection)
        finally:
            await connection.close()
        await migrate_dsn(database_url, SETTINGS)
        recorded = await _applied(database_url)
        assert recorded.mode == "postgres"
        assert list(recorded.checksums) == [m.key for m in discover(default_sql_dir(), "postgres")]

    _run(scenario())


def _revline(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``revline`` command; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "revline.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing database", "does not exist (SQLSTATE 3D000): check database_url"),
        ("unknown login", "login refused: role"),
        ("server down", "database unreachable: ConnectionRefusedError"),
    ],
)
def test_migrate_says_in_one_line_why_it_cannot_reach_the_database(
    postgres: PostgresService, case: str, expected: str
) -> None:
    """`revline migrate` against a missing database, a refused login or a stopped server exits
    1 with one line on stderr naming the cause, not a traceback."""
    url = urlsplit(postgres.url)
    urls = {
        "missing database": postgres.database_url("t_never_created"),
        "unknown login": url._replace(netloc=f"t_nobody@{url.netloc.split('@')[-1]}").geturl(),
        "server down": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
    }
    result = _revline("migrate", "--database-url", urls[case])
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("revline migrate: ")
    assert expected in result.stderr


def test_same_batch_twice_stores_each_sample_once(migrated_db: str, unique_vin: str) -> None:
    """Writing a batch again (a redelivery) inserts nothing new; timestamps keep every µs and
    values read back exactly at sensor resolution."""
    ts = T0_US - 10_000_001
    samples = [
        sample(
            ts + i * 100_001,
            i,
            speed=i + 0.5,
            lat=round(48.1234567 + i * 1e-7, 7),
            extra={"X": 1.5},
        )
        for i in range(50)
    ]

    async def scenario() -> None:
        async with Writer(migrated_db) as writer:
            assert writer.mode == "postgres"
            first = await writer.write([batch(unique_vin, samples)])
            again = await writer.write([batch(unique_vin, samples), batch(unique_vin, samples)])
        assert (first.samples, first.inserted) == (50, 50)
        assert (again.batches, again.samples, again.inserted) == (2, 100, 0)
        rows = await _fetch(
            migrated_db,
            "SELECT (extract(epoch FROM ts) * 1000000)::bigint AS us, seq, speed, lat, extra "
            "FROM samples_decoded WHERE vin = $1 ORDER BY seq",
            unique_vin,
        )
        assert [(r["us"], r["seq"], r["speed"], r["lat"]) for r in rows] == [
            (s.ts, s.seq, s.speed, s.lat) for s in samples
        ]
        assert rows[0]["extra"] == '{"X": 1.5}'

    _run(scenario())


def _state(rows: list[asyncpg.Record]) -> dict[str, Any]:
    state = dict(rows[0])
    state.pop("updated_at")
    return state


def test_older_sample_after_newer_leaves_hot_row_unchanged(
    migrated_db: str, unique_vin: str
) -> None:
    """A backfilled sample older than the stored state changes nothing in vehicle_state."""
    ts = T0_US
    newer = sample(ts, 100, speed=80.0, rpm=3000.0, lat=48.1234567, lon=11.5, extra={"A": 1.0})
    older = sample(ts - 60_000_000, 40, speed=10.0, rpm=900.0, lat=1.0, lon=2.0, extra={"A": 9.0})

    async def scenario() -> None:
        query = "SELECT * FROM vehicle_state WHERE vin = $1"
        async with Writer(migrated_db) as writer:
            await writer.write([batch(unique_vin, [newer])])
            before = _state(await _fetch(migrated_db, query, unique_vin))
            result = await writer.write([batch(unique_vin, [older], batch_id=2)])
            after = _state(await _fetch(migrated_db, query, unique_vin))
        assert result.inserted == 1  # history keeps the old sample
        assert after == before
        assert (after["seq"], after["speed"], after["lat"]) == (100, 80.0, 48.1234567)

    _run(scenario())


def test_field_missing_from_newest_sample_keeps_last_value(
    migrated_db: str, unique_vin: str
) -> None:
    """Hot state takes each field's newest non-null value, within one write and across writes."""
    ts = T0_US

    async def scenario() -> None:
        async with Writer(migrated_db) as writer:
            await writer.write(
                [
                    batch(
                        unique_vin,
                        [
                            sample(ts, 1, speed=10.0, coolant=70.0, extra={"A": 1.0, "B": 1.0}),
                            sample(ts + 1_000_000, 2, speed=20.0, extra={"A": 2.0}),
                        ],
                    )
                ]
            )
            await writer.write([batch(unique_vin, [sample(ts + 2_000_000, 3, rpm=900.0)], 2)])
        rows = await _fetch(migrated_db, "SELECT * FROM vehicle_state WHERE vin = $1", unique_vin)
        state = rows[0]
        assert state["seq"] == 3
        assert (state["speed"], state["coolant"], state["rpm"]) == (20.0, 70.0, 900.0)
        assert state["coolant_ts"] == datetime.fromtimestamp(ts / 1e6, UTC)
        assert state["speed_ts"] == datetime.fromtimestamp((ts + 1_000_000) / 1e6, UTC)
        assert state["extra"] == '{"A": 2.0, "B": 1.0}'

    _run(scenario())


def test_reject_stores_raw_bytes(migrated_db: str, unique_vin: str) -> None:
    """A refused message is kept with topic, reason, detail and its exact bytes."""
    payload = bytes(range(256)) + b"\x00\xff not msgpack"
    received = datetime(2031, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)

    async def scenario() -> None:
        async with Writer(migrated_db) as writer:
            await writer.reject(
                [Rejected(received, f"telemetry/{unique_vin}", "undecodable", "bad", payload)]
            )
        rows = await _fetch(migrated_db, "SELECT * FROM rejected")
        assert len(rows) == 1
        row = rows[0]
        assert (row["received_at"], row["topic"], row["reason"], row["detail"]) == (
            received,
            f"telemetry/{unique_vin}",
            "undecodable",
            "bad",
        )
        assert bytes(row["payload"]) == payload

    _run(scenario())


async def _partitions(url: str) -> list[str]:
    rows = await _fetch(
        url,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'samples'::regclass ORDER BY 1",
    )
    return [r["relname"] for r in rows]


def _day_name(day: datetime) -> str:
    return f"samples_p{day:%Y%m%d}"


def test_plain_mode_partitions_ahead_default_and_retention(
    database_url: str, unique_vin: str
) -> None:
    """Daily partitions exist ahead; far-off rows land in DEFAULT; backfill gets its own
    partition; retention drops partitions older than the raw retention period."""
    today = datetime.now(UTC)
    far_future = int(datetime(2150, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
    backfill = now_us() - 20 * DAY_US

    async def scenario() -> None:
        await migrate_dsn(database_url, MigrateSettings(raw_retention="30 days"))
        connection = await asyncpg.connect(database_url)
        try:
            await maintain(connection)
            parts = await _partitions(database_url)
            for ahead in range(8):
                assert _day_name(today + timedelta(days=ahead)) in parts
            assert "samples_default" in parts

            async with Writer(database_url) as writer:
                await writer.write(
                    [batch(unique_vin, [sample(far_future, 1), sample(backfill, 2)])]
                )
            where = await _fetch(
                database_url, "SELECT seq, tableoid::regclass::text AS part FROM samples"
            )
            assert {r["seq"]: r["part"] for r in where} == {
                1: "samples_default",
                2: "samples_default",
            }

            report = await maintain(connection)
            backfill_part = _day_name(datetime.fromtimestamp(backfill / 1e6, UTC))
            assert report.created == [backfill_part]
            assert report.moved_rows == 1
            assert report.default_rows == 1  # 2150 stays in DEFAULT, reported
            where = await _fetch(
                database_url, "SELECT seq, tableoid::regclass::text AS part FROM samples"
            )
            assert {r["seq"]: r["part"] for r in where} == {
                1: "samples_default",
                2: backfill_part,
            }

            await migrate_dsn(database_url, MigrateSettings(raw_retention="10 days"))
            report = await maintain(connection)
            assert backfill_part in report.dropped
            assert backfill_part not in await _partitions(database_url)
            assert _day_name(today) in await _partitions(database_url)
            rows = await _fetch(database_url, "SELECT seq FROM samples")
            assert [r["seq"] for r in rows] == [1]
        finally:
            await connection.close()

    _run(scenario())


def test_plain_mode_rollups_refresh_with_dashboard_columns(
    database_url: str, unique_vin: str
) -> None:
    """Maintenance fills samples_1m/samples_1h (same columns as the TimescaleDB aggregates),
    including samples that arrive late for an already refreshed minute."""
    minute = (T0_US // 60_000_000) * 60_000_000
    # No retention: it counts back from today, and these rows are from a fixed day.
    keep = MigrateSettings(raw_retention="forever", rollup_1m_retention="forever")

    async def scenario() -> None:
        await migrate_dsn(database_url, keep)
        connection = await asyncpg.connect(database_url)
        try:
            async with Writer(database_url) as writer:
                await writer.write(
                    [
                        batch(
                            unique_vin,
                            [
                                sample(minute + i * 1_000_000, i, speed=10.0 * i)
                                for i in range(1, 4)
                            ],
                        )
                    ]
                )
                await maintain(connection)
                late = sample(minute + 30_000_000, 30, speed=100.0, rpm=800.0)
                await writer.write([batch(unique_vin, [late], 2)])
            report = await maintain(connection)
            assert report.rollup_buckets["samples_1m"] >= 1
            for table in ("samples_1m", "samples_1h"):
                columns = await _fetch(
                    database_url,
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = $1 ORDER BY ordinal_position",
                    table,
                )
                assert tuple(r["column_name"] for r in columns) == ROLLUP_COLUMNS
            rows = await _fetch(
                database_url,
                "SELECT sample_count, speed_avg, speed_min, speed_max, rpm_max "
                "FROM samples_1m WHERE vin = $1",
                unique_vin,
            )
            assert [tuple(r) for r in rows] == [(4, 40.0, 10.0, 100.0, 800.0)]
            hourly = await _fetch(
                database_url,
                "SELECT sum(sample_count) AS n FROM samples_1h WHERE vin = $1",
                unique_vin,
            )
            assert hourly[0]["n"] == 4
        finally:
            await connection.close()

    _run(scenario())


def test_only_errors_about_values_are_data_errors(database_url: str) -> None:
    """Errors about a value (class 22, a CHECK, a value the codec refuses) may dead-letter; a
    missing object or privilege, a read-only server, a timeout, a refused connection, a NOT
    NULL a column added without default, and any unknown error are outages."""

    async def error(connection: asyncpg.Connection, sql: str, *args: object) -> BaseException:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - each is judged below
            await connection.execute(sql, *args)
        return caught.value

    async def scenario() -> None:
        with pytest.raises(ConnectionRefusedError) as refused:
            await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
        assert not is_data_error(refused.value)
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(
                "CREATE TABLE t (n int CHECK (n < 10), s text, m int NOT NULL DEFAULT 0)"
            )
            data = [
                await error(connection, "SELECT 1/0"),  # 22012
                await error(connection, "SELECT 'x'::int"),  # 22P02
                await error(connection, "SELECT convert_from('\\x00'::bytea, 'UTF8')"),  # 22021
                await error(connection, "INSERT INTO t (n) VALUES (11)"),  # 23514
                await error(connection, "INSERT INTO t (n) VALUES ($1)", 2**40),  # client-side
            ]
            await connection.execute("ALTER TABLE t ALTER COLUMN m DROP DEFAULT")
            outages = [
                await error(connection, "SELECT nope FROM nowhere"),  # 42P01
                await error(connection, "INSERT INTO t (n) VALUES (1)"),  # 23502
                await error(connection, "SET statement_timeout = 50; SELECT pg_sleep(5)"),
                await error(
                    connection,
                    "BEGIN READ ONLY; INSERT INTO t (n, m) VALUES (1, 1)",  # 25006
                ),
            ]
            await connection.execute("ROLLBACK")
        finally:
            await connection.close()
        assert [is_data_error(e) for e in data] == [True] * len(data), data
        assert [is_data_error(e) for e in outages] == [False] * len(outages), outages
        assert [getattr(e, "sqlstate", None) for e in outages] == [
            "42P01",
            "23502",
            "57014",
            "25006",
        ]
        assert not is_data_error(asyncpg.exceptions.InsufficientPrivilegeError("denied"))
        assert not is_data_error(asyncpg.exceptions.DiskFullError("no space"))
        assert not is_data_error(asyncpg.exceptions.AdminShutdownError("terminating"))
        assert not is_data_error(ValueError("a bug"))

    _run(scenario())


def test_writer_survives_a_killed_database(
    fresh_postgres: PostgresService, migrated_db: str, unique_vin: str
) -> None:
    """A database killed with SIGKILL makes write() raise an outage error; after a restart the
    same writer commits again, and a retried batch is stored exactly once."""
    ts = T0_US
    before = batch(unique_vin, [sample(ts + i, i, speed=1.0) for i in range(10)], 1)
    during = batch(unique_vin, [sample(ts + 100 + i, 100 + i, speed=2.0) for i in range(10)], 2)

    async def retried(writer: Writer) -> int:
        for _ in range(60):
            try:
                return (await writer.write([during])).inserted
            except Exception as exc:
                if is_data_error(exc):
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("database did not come back")

    async def scenario() -> None:
        async with Writer(migrated_db, statement_timeout_s=5) as writer:
            await writer.write([before])
            await asyncio.to_thread(fresh_postgres.kill)
            with pytest.raises(Exception) as failed:  # noqa: PT011 - any error, judged below
                await writer.write([during])
            assert not is_data_error(failed.value), failed.value
            await asyncio.to_thread(fresh_postgres.start)
            inserted = await retried(writer)
            again = await writer.write([before, during])
        assert inserted == 10
        assert again.inserted == 0
        rows = await _fetch(migrated_db, "SELECT seq FROM samples WHERE vin = $1", unique_vin)
        assert sorted(r["seq"] for r in rows) == [*range(10), *range(100, 110)]

    _run(scenario())
