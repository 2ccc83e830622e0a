"""Insight through the real writer and database: live, late, shuffled and split give one result."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
import time
from typing import Any

import asyncpg
import pytest

from revline.consumer.writer import Writer, _write_rows, records, state_rows
from revline.contract import Batch, Sample
from revline.insight.segment import segment
from revline.insight.store import Insight
from revline.insight.thresholds import THRESHOLDS, Thresholds
from revline.storage.derive import Staged
from tests.fixtures.consumer import ConsumerFactory, PublisherFactory, query
from tests.fixtures.insight import KNOWN_STOPS, NOW, T0, US, as_samples, drive, move
from tests.fixtures.services import PostgresService, wait_until

TRIP_SQL = (
    "SELECT extract(epoch FROM start_ts - $2) AS start_s, extract(epoch FROM end_ts - $2) AS end_s,"
    " samples, round(distance_km::numeric, 6) AS km, distance_source, max_speed, gap_s, closed,"
    " round(odometer_end::numeric, 6) AS odo, hard_brakes "
    "FROM trips WHERE vin = $1 ORDER BY start_ts"
)


def _batches(vin: str, samples: list[Sample], size: int) -> list[Batch]:
    return [
        Batch(v=1, vin=vin, batch=k, samples=samples[i : i + size])
        for k, i in enumerate(range(0, len(samples), size))
    ]


async def _trips(connection: Any, vin: str) -> list[tuple[Any, ...]]:
    t0 = await connection.fetchval("SELECT timestamptz 'epoch' + $1 * interval '1 microsecond'", T0)
    return [tuple(r) for r in await connection.fetch(TRIP_SQL, vin, t0)]


def test_live_late_shuffled_and_split_uploads_store_the_same_trips(
    migrated_db: str, unique_vin: str
) -> None:
    """The drive with known stops written live (recomputed after every write), and again under
    another VIN shuffled, in seven pieces in random order, one resent: identical trip rows."""
    samples = as_samples(drive(KNOWN_STOPS))
    late_vin = unique_vin[:-1] + ("0" if unique_vin[-1] != "0" else "1")
    insight = Insight(NOW)
    rng = random.Random(15)

    async def scenario() -> tuple[list[Any], list[Any], int]:
        async with Writer(migrated_db, pool_size=2, derivations=[insight]) as writer:
            for live in _batches(unique_vin, samples, 50):
                await writer.write([live])
                await insight.catch_up(writer.pool)
            shuffled = list(samples)
            rng.shuffle(shuffled)
            pieces = _batches(late_vin, shuffled, len(shuffled) // 7 + 1)
            rng.shuffle(pieces)
            for piece in [*pieces, pieces[0]]:  # the first one is redelivered at the end
                await writer.write([piece])
                if rng.random() < 0.5:
                    await insight.catch_up(writer.pool)
            while await insight.catch_up(writer.pool):
                pass
            connection = await asyncpg.connect(migrated_db)
            try:
                dirty = await connection.fetchval("SELECT count(*) FROM insight_dirty")
                return (
                    await _trips(connection, unique_vin),
                    await _trips(connection, late_vin),
                    dirty,
                )
            finally:
                await connection.close()

    live, late, dirty = asyncio.run(scenario())
    assert [(r[0], r[1]) for r in live] == [(0, 1619), (2220, 2519), (6120, 6419)]
    assert late == live
    assert dirty == 0
    expected = segment(drive(KNOWN_STOPS), THRESHOLDS)
    assert [r[2] for r in live] == [t.samples for t in expected]
    assert [r[7] for r in live] == [True, True, True]
    odometer = [float(r[8]) for r in live]
    assert odometer == sorted(odometer)
    assert odometer[-1] == pytest.approx(sum(float(r[3]) for r in live))  # accumulated


DIRTY_SQL = (
    "SELECT d.ts_min > c.last_ts FROM insight_dirty d JOIN insight_checkpoints c USING (vin) "
    "WHERE vin = $1"
)


@pytest.mark.parametrize(
    ("held", "live_next"),
    [("after", True), ("late", False), ("between", False), ("after a window", True)],
)
def test_a_write_during_a_live_fold_leaves_only_what_the_fold_did_not_read_dirty(
    migrated_db: str, unique_vin: str, held: str, live_next: bool
) -> None:
    """A write that commits while a live fold runs: newer samples leave the vehicle live (its
    dirty span starts after the new checkpoint), a late one or one among the samples folded
    sends it to the window; newer samples during a first fold (by window) leave it live too;
    either way the trips are those of the whole drive at once."""
    points = drive(KNOWN_STOPS)
    samples = as_samples(points)
    first, second = samples[:1000], samples[1000:1400]
    held_samples = {
        "after": samples[1400:1450],  # what comes next
        "after a window": samples[1400:1450],
        "late": samples[100:110],  # inside what the first write's fold read: missing from it
        "between": samples[1001:1400:2],  # among the second write's, which skips them
    }[held]
    if held == "late":
        first = samples[:100] + samples[110:1000]
    if held == "between":
        second = samples[1000:1400:2]
    rest = [s for s in samples[1400:] if s not in held_samples]
    insight = Insight(NOW)

    async def scenario() -> tuple[bool, list[Any]]:
        async with Writer(migrated_db, pool_size=3, derivations=[insight]) as writer:
            await writer.write([Batch(v=1, vin=unique_vin, batch=1, samples=first)])
            if held != "after a window":
                assert await insight.catch_up(writer.pool) == 1  # by window: now a checkpoint
            await writer.write([Batch(v=1, vin=unique_vin, batch=2, samples=second)])
            rows = Staged(records([Batch(v=1, vin=unique_vin, batch=3, samples=held_samples)]))
            async with writer.pool.acquire() as connection, connection.transaction():
                await _write_rows(connection, rows, state_rows(rows), [insight])
                fold = asyncio.create_task(insight.catch_up(writer.pool))  # live: blocks
                await wait_until_async(lambda: _waiting_for_a_lock(writer.pool))
            assert await fold == 1
            live = await writer.pool.fetchval(DIRTY_SQL, unique_vin)
            await writer.write([Batch(v=1, vin=unique_vin, batch=4, samples=rest)])
            while await insight.catch_up(writer.pool):
                pass
            connection = await asyncpg.connect(migrated_db)
            try:
                return live, await _trips(connection, unique_vin)
            finally:
                await connection.close()

    live, trips = asyncio.run(scenario())
    assert live is live_next
    expected = segment(points, THRESHOLDS)
    assert [(r[0], r[1]) for r in trips] == [(0, 1619), (2220, 2519), (6120, 6419)]
    assert [r[2] for r in trips] == [t.samples for t in expected]


async def _waiting_for_a_lock(pool: Any) -> bool:
    waiting: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    return waiting > 0


async def wait_until_async(check: Any, timeout_s: float = 30.0) -> None:
    """Poll an async condition (the database: nothing here can signal it)."""
    for _ in range(int(timeout_s * 20)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_trouble_code_reports_become_events_and_a_resend_changes_nothing(
    migrated_db: str, unique_vin: str
) -> None:
    """P0300 set then cleared is one dtc_events row with both times, and the active set is empty;
    a code still set is active. Reports arriving late and twice give the same rows."""
    reports = [
        Sample(ts=T0, seq=1, speed=0.0, dtc=[]),
        Sample(ts=T0 + 10 * US, seq=2, speed=0.0, dtc=["P0300"]),
        Sample(ts=T0 + 20 * US, seq=3, speed=0.0, dtc=["P0300", "P0420"]),
        Sample(ts=T0 + 30 * US, seq=4, speed=0.0, dtc=["P0420"]),
    ]

    async def scenario() -> None:
        insight = Insight(NOW)
        async with Writer(migrated_db, pool_size=1, derivations=[insight]) as writer:
            await writer.write([Batch(v=1, vin=unique_vin, batch=2, samples=reports[2:])])
            await writer.write([Batch(v=1, vin=unique_vin, batch=1, samples=reports[:2])])
            await writer.write([Batch(v=1, vin=unique_vin, batch=2, samples=reports[2:])])

    asyncio.run(scenario())
    events = [
        tuple(r)
        for r in query(
            migrated_db,
            "SELECT code, extract(epoch FROM first_seen - to_timestamp($2))::float8,"
            " extract(epoch FROM cleared - to_timestamp($2))::float8"
            " FROM dtc_events WHERE vin = $1 ORDER BY first_seen",
            unique_vin,
            T0 / US,
        )
    ]
    active = [r[0] for r in query(migrated_db, "SELECT code FROM dtc_active WHERE vin = $1",
                                  unique_vin)]
    assert events == [("P0300", 10, 30), ("P0420", 20, None)]
    assert active == ["P0420"]


def test_the_real_consumer_derives_trips_from_a_backlog_sent_in_halves_out_of_order(
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
    migrated_db: str,
    unique_vin: str,
) -> None:
    """Through Mosquitto and `revline consumer`: the second half of the drive first (live),
    then the first half shuffled in pieces: the trips are the expected three."""
    make_consumer(args=["--max-age-s", str(10 * 365 * 86_400)])
    samples = as_samples(drive(KNOWN_STOPS))
    half = len(samples) // 2
    first, second = samples[:half], samples[half:]
    rng = random.Random(7)
    rng.shuffle(first)
    publisher = make_publisher()
    publisher.publish_batches(_batches(unique_vin, second, 200))
    pieces = [
        Batch(v=1, vin=unique_vin, batch=1000 + b.batch, samples=b.samples)
        for b in _batches(unique_vin, first, 300)
    ]
    rng.shuffle(pieces)
    publisher.publish_batches(pieces)

    def bounds() -> list[tuple[float, float]]:
        rows = query(
            migrated_db,
            "SELECT extract(epoch FROM start_ts - to_timestamp($2))::float8,"
            " extract(epoch FROM end_ts - to_timestamp($2))::float8"
            " FROM trips WHERE vin = $1 ORDER BY start_ts",
            unique_vin,
            T0 / US,
        )
        return [(r[0], r[1]) for r in rows]

    expected = [(0.0, 1619.0), (2220.0, 2519.0), (6120.0, 6419.0)]

    def settled() -> bool:
        dirty = query(migrated_db, "SELECT count(*) FROM insight_dirty WHERE vin = $1", unique_vin)
        return bounds() == expected and dirty[0][0] == 0

    wait_until(settled, what="the consumer to derive the three trips", timeout=90)


def test_a_live_open_trip_is_refolded_only_after_a_fraction_of_its_length(
    migrated_db: str, unique_vin: str
) -> None:
    """Live data extending a 20-minute open trip waits a quarter of it (5 min) before the next
    fold, which re-reads the trip; the same drive uploaded late is folded at once."""
    t = Thresholds(settle_s=0, settle_fraction=0.25)
    late_vin = unique_vin[:-1] + ("0" if unique_vin[-1] != "0" else "1")
    # What is tested is "live": the drive ends now (and the late one in 2024).
    now = time.time_ns() // 1000
    live = as_samples(drive([move(1200)], start=now - 1205 * US))
    late = as_samples(drive([move(1200)]))

    async def scenario() -> list[int]:
        insight = Insight(t)
        folded = []
        async with Writer(migrated_db, derivations=[insight]) as writer:
            for vin, samples in ((unique_vin, live), (late_vin, late)):
                await writer.write([Batch(v=1, vin=vin, batch=1, samples=samples[:-5])])
                folded.append(await insight.catch_up(writer.pool))  # no trip yet: at once
                await writer.write([Batch(v=1, vin=vin, batch=2, samples=samples[-5:])])
                folded.append(await insight.catch_up(writer.pool))
        return folded

    assert asyncio.run(scenario()) == [1, 0, 1, 1]


def test_the_background_task_waits_out_a_database_outage_and_catches_up(
    fresh_postgres: PostgresService,
    migrated_db: str,
    unique_vin: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dirty spans committed before the database stops are folded once it is back: the task
    says so once, retries, and never ends."""
    samples = as_samples(drive(KNOWN_STOPS))

    async def scenario() -> int:
        insight = Insight(NOW, poll_s=0.05)
        async with Writer(migrated_db, derivations=[insight]) as writer:
            await writer.write([Batch(v=1, vin=unique_vin, batch=1, samples=samples)])
            await asyncio.to_thread(fresh_postgres.stop)
            task = asyncio.create_task(insight.run(writer.pool))
            await asyncio.sleep(1.5)
            assert not task.done()
            await asyncio.to_thread(fresh_postgres.start)
            try:
                async with asyncio.timeout(60):
                    while True:
                        try:
                            found = await writer.pool.fetchval(
                                "SELECT count(*) FROM trips WHERE vin = $1", unique_vin
                            )
                        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                            found = 0
                        if found == 3 or task.done():
                            break
                        await asyncio.sleep(0.1)
                assert not task.done()
            finally:
                task.cancel()
            return int(found)

    with caplog.at_level(logging.INFO, logger="revline.insight"):
        assert asyncio.run(scenario()) == 3
    said = [r.getMessage() for r in caplog.records if r.name == "revline.insight"]
    assert said.count("insight recompute failed; retrying") == 1
    assert "insight recompute works again" in said


def test_consumers_that_only_mark_leave_the_folding_to_revline_insight_fold(
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
    migrated_db: str,
    postgres: PostgresService,
    unique_vin: str,
) -> None:
    """`revline consumer --insight-fold false` stores and marks but derives no trip; a separate
    `revline insight fold` derives the three trips; on a database never migrated it stops with
    one line."""
    make_consumer(args=["--max-age-s", str(10 * 365 * 86_400), "--insight-fold", "false"])
    samples = as_samples(drive(KNOWN_STOPS))
    make_publisher().publish_batches(_batches(unique_vin, samples, 500))

    def marked() -> bool:
        stored = query(migrated_db, "SELECT count(*) FROM samples WHERE vin = $1", unique_vin)
        dirty = query(migrated_db, "SELECT count(*) FROM insight_dirty WHERE vin = $1", unique_vin)
        return bool(stored[0][0] == len(samples) and dirty[0][0] == 1)

    wait_until(marked, what="every sample stored and its vehicle marked", timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    empty = postgres.create_database(f"t_unmigrated_{unique_vin.lower()}")
    try:
        unmigrated = subprocess.run(
            [sys.executable, "-m", "revline.cli", "insight", "fold", "--database-url", empty],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
    finally:
        postgres.drop_database(f"t_unmigrated_{unique_vin.lower()}")
    folder = subprocess.Popen(
        [sys.executable, "-m", "revline.cli", "insight", "fold", "--database-url", migrated_db],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        trips = query(migrated_db, "SELECT count(*) FROM trips WHERE vin = $1", unique_vin)
        assert trips[0][0] == 0  # the consumer marked, folded nothing

        def folded() -> bool:
            assert folder.poll() is None, folder.stderr.read() if folder.stderr else ""
            rows = query(migrated_db, "SELECT count(*) FROM trips WHERE vin = $1", unique_vin)
            return bool(rows[0][0] == 3)

        wait_until(folded, what="revline insight fold to derive the three trips", timeout=120)
    finally:
        folder.terminate()
        folder.communicate(timeout=30)  # waits, and closes the pipe
    assert unmigrated.returncode == 2
    assert unmigrated.stderr.strip() == (
        "revline insight fold: database is not migrated: run `revline migrate` with the same "
        "database_url"
    )
