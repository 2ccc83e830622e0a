"""Sequence accounting in every write, against a real PostgreSQL (the derivation seam)."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import asyncpg

from revline.audit.accounting import verify_vehicle
from revline.audit.service import Audit
from revline.consumer.writer import Writer
from revline.contract import Batch, Sample

T0_US: Final = 1_717_243_200_000_000


def _batch(vin: str, seqs: range | list[int], batch_id: int = 0) -> Batch:
    return Batch(
        v=1,
        vin=vin,
        batch=batch_id,
        samples=[Sample(ts=T0_US + s * 1000, seq=s, speed=1.0) for s in seqs],
    )


async def _figures(url: str, vin: str) -> tuple[list[tuple[int, int]], int, int]:
    connection = await asyncpg.connect(url)
    try:
        ranges = await connection.fetch(
            "SELECT lo, hi FROM audit_ranges WHERE vin = $1 ORDER BY lo", vin
        )
        row = await connection.fetchrow(
            "SELECT samples, duplicates FROM audit_vehicles WHERE vin = $1", vin
        )
    finally:
        await connection.close()
    return [(r[0], r[1]) for r in ranges], row[0], row[1]


def test_live_first_backlogs_and_redelivery_end_as_one_run_with_duplicates_counted(
    migrated_db: str, unique_vin: str
) -> None:
    """Live data first, the backlog behind it out of order, a redelivered batch: one run
    0..999, every sample counted once, the redelivered ones as duplicates."""
    vin = unique_vin

    async def scenario() -> list[Any]:
        async with Writer(migrated_db, pool_size=2, derivations=[Audit()]) as writer:
            await writer.write([_batch(vin, range(900, 1000), 9)])  # live
            seen = [await _figures(migrated_db, vin)]
            await writer.write([_batch(vin, range(500, 900), 5), _batch(vin, range(200), 1)])
            seen.append(await _figures(migrated_db, vin))
            # Two writes at once, both holding the vehicle: they merge one after the other.
            await asyncio.gather(
                writer.write([_batch(vin, range(200, 350), 2)]),
                writer.write([_batch(vin, range(350, 500), 3)]),
            )
            await writer.write([_batch(vin, range(500, 900), 5)])  # redelivered
            seen.append(await _figures(migrated_db, vin))
        return seen

    live, holey, done = asyncio.run(scenario())
    assert live == ([(900, 999)], 100, 0)
    assert holey == ([(0, 199), (500, 999)], 700, 0)
    assert done == ([(0, 999)], 1000, 400)


def test_a_batch_deleted_from_the_cold_table_becomes_a_hole_when_checked(
    migrated_db: str, unique_vin: str
) -> None:
    """verify_vehicle() finds samples gone from the cold table and turns them into a hole."""
    vin = unique_vin

    async def scenario() -> tuple[Any, Any, tuple[int, int]]:
        async with Writer(migrated_db, pool_size=1, derivations=[Audit()]) as writer:
            await writer.write([_batch(vin, range(300), 0)])
        connection = await asyncpg.connect(migrated_db)
        try:
            await connection.execute(
                "DELETE FROM samples WHERE vin = $1 AND seq BETWEEN 100 AND 149", vin
            )
            async with connection.transaction():
                result = await verify_vehicle(connection, vin, 0)
        finally:
            await connection.close()
        return await _figures(migrated_db, vin), None, result

    figures, _, result = asyncio.run(scenario())
    assert result == (1, 50)
    assert figures == ([(0, 99), (150, 299)], 250, 0)


def test_a_check_reads_only_the_recent_window_of_a_run(migrated_db: str, unique_vin: str) -> None:
    """Only samples newer than the window are checked: a hole inside it is found, one in the
    older part of the same run is not read at all (retention may own it)."""
    vin = unique_vin

    async def scenario() -> tuple[Any, tuple[int, int]]:
        async with Writer(migrated_db, pool_size=1, derivations=[Audit()]) as writer:
            await writer.write([_batch(vin, range(300), 0)])
        connection = await asyncpg.connect(migrated_db)
        try:
            await connection.execute(
                "DELETE FROM samples WHERE vin = $1 AND (seq BETWEEN 100 AND 109 "
                "OR seq BETWEEN 200 AND 209)",
                vin,
            )
            async with connection.transaction():
                result = await verify_vehicle(connection, vin, T0_US + 150 * 1000)
        finally:
            await connection.close()
        return await _figures(migrated_db, vin), result

    figures, result = asyncio.run(scenario())
    assert result == (1, 10)
    assert figures == ([(0, 199), (210, 299)], 290, 0)
