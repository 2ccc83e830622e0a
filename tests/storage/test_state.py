"""The hot state reduced in Python (consumer.writer.state_rows) against the SQL it replaced."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revline.consumer import writer as writer_module
from revline.consumer.writer import (
    STAGING_COLUMNS,
    STAGING_DDL,
    STAGING_TABLE,
    STATE_COLUMNS,
    Writer,
    records,
    state_rows,
)
from revline.contract import NUMERIC_FIELDS, Batch, Sample
from revline.fields import FIELD_BY_NAME
from tests.fixtures.storage import batch, sample

BASE_US = 1_700_000_000_000_000
SECOND_US = 1_000_000

# The reference: UPSERT_STATE_SQL as it was before the reduction moved to Python, aggregating
# every staged row per vehicle in one hash pass. Kept verbatim so the equivalence test below
# compares the new writer with the old statement, not with a second reading of the rules.


def _type(name: str) -> str:
    return FIELD_BY_NAME[name].value_type  # the column types of the day, whatever they are


_TS = "timestamptz 'epoch' + ts * interval '1 microsecond'"


def _newest(name: str) -> str:
    newest = (
        f"max(ARRAY[ts::float8, seq::float8, {name}::float8]) FILTER (WHERE {name} IS NOT NULL)"
    )
    return (
        f"({newest})[3]::{_type(name)} AS {name}, "
        f"timestamptz 'epoch' + ({newest})[1] * interval '1 microsecond' AS {name}_ts"
    )


def _forward(name: str) -> str:
    return (
        f"{name} = CASE WHEN excluded.{name}_ts > coalesce(v.{name}_ts, '-infinity') "
        f"THEN excluded.{name} ELSE v.{name} END, "
        f"{name}_ts = greatest(v.{name}_ts, excluded.{name}_ts)"
    )


_STATE_COLS = ", ".join(f"{n}, {n}_ts" for n in NUMERIC_FIELDS)

OLD_UPSERT_STATE_SQL = (
    "WITH newest AS ("
    "SELECT vin, max(ts) AS ts_us, (max(ARRAY[ts, seq, flags]))[2] AS seq, "
    "(max(ARRAY[ts, seq, flags]))[3] AS flags, "
    + ", ".join(_newest(n) for n in NUMERIC_FIELDS)
    + f" FROM {STAGING_TABLE} GROUP BY vin), "
    "extras AS (SELECT s.vin, jsonb_object_agg(e.key, e.value ORDER BY s.ts, s.seq) AS extra, "
    f"{_TS.replace('ts *', 'max(s.ts) *')} AS extra_ts "
    f"FROM {STAGING_TABLE} s CROSS JOIN LATERAL jsonb_each(s.extra) e "
    "WHERE s.extra IS NOT NULL GROUP BY s.vin) "
    f"INSERT INTO vehicle_state AS v (vin, ts, seq, flags, updated_at, {_STATE_COLS}, "
    "extra, extra_ts) "
    f"SELECT n.vin, timestamptz 'epoch' + n.ts_us * interval '1 microsecond', n.seq, n.flags, "
    f"now(), {', '.join(f'n.{n}, n.{n}_ts' for n in NUMERIC_FIELDS)}, x.extra, x.extra_ts "
    "FROM newest n LEFT JOIN extras x ON x.vin = n.vin "
    "ON CONFLICT (vin) DO UPDATE SET "
    "seq = CASE WHEN (excluded.ts, excluded.seq) > (v.ts, v.seq) THEN excluded.seq ELSE v.seq END, "
    "flags = CASE WHEN (excluded.ts, excluded.seq) > (v.ts, v.seq) "
    "THEN excluded.flags ELSE v.flags END, "
    "ts = greatest(v.ts, excluded.ts), updated_at = now(), "
    + ", ".join(_forward(n) for n in NUMERIC_FIELDS)
    + ", extra = CASE WHEN excluded.extra IS NULL THEN v.extra "
    "WHEN excluded.extra_ts > coalesce(v.extra_ts, '-infinity') "
    "THEN coalesce(v.extra, '{}') || excluded.extra "
    "ELSE excluded.extra || coalesce(v.extra, '{}') END, "
    "extra_ts = greatest(v.extra_ts, excluded.extra_ts)"
)


def _state(rows: list[tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    return {row[0]: dict(zip(STATE_COLUMNS, row, strict=True)) for row in rows}


def test_state_rows_takes_each_fields_newest_value_per_vehicle() -> None:
    """Per vehicle: the newest sample's ts/seq/flags, each field's newest non-null value with
    its ts, and extra merged oldest to newest with the ts of the newest one carrying keys."""
    a, b = "1AAAAAAAAAAAAAAAA", "1BBBBBBBBBBBBBBBB"
    rows = records(
        [
            batch(
                a,
                [
                    sample(BASE_US, 1, speed=10.0, coolant=70.0, extra={"A": 1.0, "B": 1.0}),
                    sample(BASE_US + SECOND_US, 2, speed=20.0, extra={"A": 2.0}),
                    sample(BASE_US + SECOND_US, 3, rpm=900.0, flags=1, extra={}),
                ],
            ),
            batch(b, [sample(BASE_US, 7, lat=48.1234567)]),
            batch(a, [sample(BASE_US - SECOND_US, 9, fuel=40.0, speed=1.0)], 2),
        ]
    )
    state = _state(state_rows(rows))
    assert sorted(state) == [a, b]
    first = state[a]
    assert (first["ts"], first["seq"], first["flags"]) == (BASE_US + SECOND_US, 3, 1)
    assert (first["speed"], first["speed_ts"]) == (20.0, BASE_US + SECOND_US)
    assert (first["coolant"], first["coolant_ts"]) == (70.0, BASE_US)
    assert (first["fuel"], first["fuel_ts"]) == (40.0, BASE_US - SECOND_US)
    assert (first["rpm"], first["maf"], first["maf_ts"]) == (900.0, None, None)
    assert (first["extra"], first["extra_ts"]) == ({"A": 2.0, "B": 1.0}, BASE_US + SECOND_US)
    second = state[b]
    assert (second["seq"], second["lat"], second["extra"], second["extra_ts"]) == (
        7,
        48.1234567,
        None,
        None,
    )


def test_state_rows_does_not_depend_on_the_order_of_samples() -> None:
    """Shuffled or reversed staging rows give the same state as rows in (ts, seq) order."""
    generator = random.Random(7)
    samples = [
        sample(
            BASE_US + (i // 3) * SECOND_US,
            i,
            speed=float(i) if i % 4 else None,
            rpm=float(i) if i % 7 == 0 else None,
            extra={"K": float(i)} if i % 5 == 0 else None,
        )
        for i in range(60)
    ]
    ordered = records([batch("1AAAAAAAAAAAAAAAA", samples)])
    shuffled = ordered[:]
    generator.shuffle(shuffled)
    expected = state_rows(ordered)
    assert state_rows(shuffled) == expected
    assert state_rows(ordered[::-1]) == expected
    assert expected[0][STATE_COLUMNS.index("rpm")] == 56.0


# Random writes. Each vehicle owns a pool of samples with distinct (ts, seq), the contract's
# identity; a write draws from the pools in any order and may repeat a sample (redelivery).
# Few ts values and seqs make ties on ts, late backfills and unsorted batches common.

_value = st.none() | st.integers(0, 500).map(lambda x: x / 10)
_extra = st.none() | st.dictionaries(
    st.sampled_from("ABC"), st.integers(-5, 5).map(float), max_size=3
)


@st.composite
def _sample(draw: st.DrawFn, ts: int, seq: int) -> Sample:
    values = {name: draw(_value) for name in NUMERIC_FIELDS}
    return sample(
        BASE_US + ts * SECOND_US,
        seq,
        **values,
        extra=draw(_extra),
        flags=draw(st.integers(0, 3)),
    )


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[list[list[Sample]], list[list[tuple[int, list[int]]]]]:
    pools = []
    for _ in range(draw(st.integers(1, 3))):
        keys = draw(
            st.lists(
                st.tuples(st.integers(0, 5), st.integers(0, 4)),
                min_size=1,
                max_size=10,
                unique=True,
            )
        )
        pools.append([draw(_sample(ts, seq)) for ts, seq in keys])
    one_batch = st.integers(0, len(pools) - 1).flatmap(
        lambda v: st.tuples(
            st.just(v), st.lists(st.integers(0, len(pools[v]) - 1), min_size=1, max_size=8)
        )
    )
    writes = draw(st.lists(st.lists(one_batch, min_size=1, max_size=4), min_size=1, max_size=4))
    return pools, writes


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4)), min_size=2, max_size=12, unique=True)
    .map(sorted)
    .flatmap(lambda keys: st.tuples(*(_sample(ts, seq) for ts, seq in keys)))
)
def test_the_in_order_scan_equals_the_general_one(samples: tuple[Sample, ...]) -> None:
    """A vehicle's rows in strictly increasing (ts, seq), as vehicles send them, take the fast
    scan; it gives what the general scan (any order, ties) gives for the same rows."""
    rows = records([batch("1AAAAAAAAAAAAAAAA", list(samples))])
    keys = [(row[1], row[2]) for row in rows]
    assert writer_module._in_order(rows[0][0], rows) == writer_module._any_order(
        rows[0][0], rows, keys
    )
    assert state_rows(rows) == state_rows(rows[::-1])  # reversed: the general scan


async def _reference_connection(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    encode = msgspec.json.Encoder().encode
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + encode(value),
        decoder=lambda data: msgspec.json.decode(data[1:]),
        format="binary",
    )
    await connection.execute(STAGING_DDL)
    return connection


async def _reference_write(connection: asyncpg.Connection, batches: list[Batch]) -> None:
    async with connection.transaction():
        await connection.copy_records_to_table(
            STAGING_TABLE, records=records(batches), columns=STAGING_COLUMNS
        )
        await connection.execute(OLD_UPSERT_STATE_SQL)


async def _hot(connection: asyncpg.Connection, vins: list[str]) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        "SELECT * FROM vehicle_state WHERE vin = ANY($1::text[]) ORDER BY vin", vins
    )
    states = []
    for row in rows:
        state = dict(row)
        state.pop("updated_at")
        state["vin"] = vins.index(state["vin"])
        states.append(state)
    return states


def test_writer_hot_state_equals_the_old_sql_on_random_writes(migrated_db: str) -> None:
    """Random sequences of writes (sparse fields, ts ties, unsorted batches, backfills,
    redeliveries, overlapping extra keys) leave the same vehicle_state through the writer as
    through the aggregating SQL it replaced."""
    examples = iter(range(10**6))

    with asyncio.Runner() as runner:
        writer = runner.run(Writer(migrated_db, pool_size=1).__aenter__())
        reference = runner.run(_reference_connection(migrated_db))

        @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(_scenario())
        def check(scenario: tuple[list[list[Sample]], list[list[tuple[int, list[int]]]]]) -> None:
            pools, writes = scenario
            example = next(examples)
            new = [f"NEW{example:06d}{v:08d}" for v in range(len(pools))]
            old = [f"REF{example:06d}{v:08d}" for v in range(len(pools))]
            for k, write in enumerate(writes):
                picked = [(v, [pools[v][i] for i in picks]) for v, picks in write]
                runner.run(writer.write([Batch(1, new[v], k, samples) for v, samples in picked]))
                runner.run(
                    _reference_write(
                        reference, [Batch(1, old[v], k, samples) for v, samples in picked]
                    )
                )
            assert runner.run(_hot(reference, new)) == runner.run(_hot(reference, old))

        try:
            check()
        finally:
            runner.run(reference.close())
            runner.run(writer.__aexit__(None, None, None))
