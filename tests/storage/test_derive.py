"""The derivation seam: work kept up to date inside every write's transaction."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import asyncpg
import pytest

from revline.consumer.writer import Writer, records
from revline.storage.derive import Span, Staged, spans
from tests.fixtures.storage import batch, sample

T0_US: Final = 1_717_243_200_000_000


def test_spans_summarise_each_vehicle_of_a_write() -> None:
    """spans() gives each vehicle's time and sequence extent and count, whatever the order."""
    rows = records(
        [
            batch("1HGCM82633A004352", [sample(T0_US + 5, 7), sample(T0_US, 3)]),
            batch("WDB1240221J123456", [sample(T0_US + 9, 1)]),
            batch("1HGCM82633A004352", [sample(T0_US + 2, 9)], batch_id=2),
        ]
    )
    assert spans(rows) == [
        Span("1HGCM82633A004352", T0_US, T0_US + 5, 3, 9, 3),
        Span("WDB1240221J123456", T0_US + 9, T0_US + 9, 1, 1, 1),
    ]


class _Journal:
    """A derivation that records each write's spans in a table, and can be told to fail."""

    name = "journal"

    def __init__(self) -> None:
        self.prepared = 0
        self.fail = False

    async def prepare(self, connection: Any) -> None:
        self.prepared += 1
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS test_journal (vin text, samples int, seq_max bigint)"
        )

    async def apply(self, connection: Any, write: Staged) -> None:
        await connection.executemany(
            "INSERT INTO test_journal VALUES ($1, $2, $3)",
            [(s.vin, s.samples, s.seq_max) for s in write.spans()],
        )
        if self.fail:
            raise ConnectionResetError("lost in the middle")


def test_derivation_commits_and_rolls_back_with_the_samples(
    migrated_db: str, unique_vin: str
) -> None:
    """A derivation's writes commit with the samples, and a failing one rolls the samples back."""
    journal = _Journal()

    async def scenario() -> list[Any]:
        async with Writer(migrated_db, pool_size=1, derivations=[journal]) as writer:
            await writer.write([batch(unique_vin, [sample(T0_US, 1), sample(T0_US + 1, 2)])])
            journal.fail = True
            with pytest.raises(ConnectionResetError):
                await writer.write([batch(unique_vin, [sample(T0_US + 2, 3)], batch_id=2)])
            journal.fail = False
            await writer.probe()  # the probe runs it too, and rolls back whatever it did
        connection = await asyncpg.connect(migrated_db)
        try:
            journal_rows = await connection.fetch("SELECT vin, samples, seq_max FROM test_journal")
            stored = await connection.fetchval(
                "SELECT count(*) FROM samples WHERE vin = $1", unique_vin
            )
        finally:
            await connection.close()
        return [*map(tuple, journal_rows), stored]

    assert asyncio.run(scenario()) == [(unique_vin, 2, 2), 2]
    assert journal.prepared == 1
