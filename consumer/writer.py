"""The database writer: one transaction per write, bulk COPY, idempotent, hot state moves forward.

:meth:`Writer.write` takes decoded batches and, in ONE transaction: binary-COPYs every sample into
a session-local staging table, inserts them into the cold table ``samples`` skipping those already
there (the unique key ``(vin, ts, seq)`` makes redelivery idempotent), and upserts the hot table
``vehicle_state`` with the newest value of each field per vehicle (reduced in SQL; an older sample
never overwrites a newer value). ``received_at`` is the transaction's time.

The SQL is in module constants so that the TimescaleDB check (tests/timescale/) runs the very
same statements against TimescaleDB compiled to WASM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Self

import asyncpg
import msgspec

from revline.contract import NUMERIC_FIELDS, Batch, Sample
from revline.logs import kv

if TYPE_CHECKING:
    from types import TracebackType

    from consumer.maintenance import MaintenanceReport

__all__ = [
    "COLD_SCALES",
    "INSERT_SAMPLES_SQL",
    "STAGING_COLUMNS",
    "STAGING_DDL",
    "STAGING_TABLE",
    "UPSERT_STATE_SQL",
    "Rejected",
    "WriteResult",
    "Writer",
    "bench_write",
    "cold_column",
    "is_transient",
    "records",
]

log = logging.getLogger(__name__)

_DOUBLE: Final = frozenset({"lat", "lon"})

STAGING_TABLE: Final = "revline_staging"
STAGING_COLUMNS: Final = ("vin", *Sample.__struct_fields__)
"""Staging columns: the VIN, then the sample's fields in contract order (``astuple`` order)."""


def _type(name: str) -> str:
    return "double precision" if name in _DOUBLE else "real"


# TEMP + ON COMMIT DELETE ROWS: created once per connection, emptied by every commit, never
# WAL-logged, no catalog churn per write. ts stays the contract's integer microseconds and is
# converted in SQL (exact; to_timestamp() would go through float seconds).
STAGING_DDL: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} (vin text, ts bigint, seq bigint, "
    + ", ".join(f"{name} {_type(name)}" for name in NUMERIC_FIELDS)
    + ", extra jsonb, flags integer) ON COMMIT DELETE ROWS"
)

_TS: Final = "timestamptz 'epoch' + ts * interval '1 microsecond'"

COLD_SCALES: Final = {
    "speed": (1, "smallint"),
    "rpm": (2, "integer"),
    "coolant": (1, "smallint"),
    "intake": (1, "smallint"),
    "throttle": (2, "smallint"),
    "load": (2, "smallint"),
    "maf": (2, "integer"),
    "fuel": (2, "smallint"),
    "battery": (3, "integer"),
    "lat": (7, "integer"),
    "lon": (7, "integer"),
    "alt": (1, "integer"),
    "heading": (1, "smallint"),
    "gps_speed": (1, "smallint"),
}
"""Cold-table storage of each measurement: ``<field>_e<N>`` holds round(value * 10^N) in the
given integer type. N is finer than any sensor's resolution (OBD rpm is 0.25, GPS 1e-7 degree),
and the contract's bounds make overflow impossible. Integers compress by delta-of-delta to a few
bits per smooth value; floats (Gorilla XOR) take 2-5 bytes each: see docs/storage.md."""


def cold_column(name: str) -> str:
    """The cold-table column of a measurement, e.g. ``speed_e1``."""
    return f"{name}_e{COLD_SCALES[name][0]}"


def _scaled(name: str) -> str:
    digits, kind = COLD_SCALES[name]
    return f"round({name}::float8 * 1e{digits})::{kind}"


_COLD: Final = ("vin", "ts", "seq", *(cold_column(n) for n in NUMERIC_FIELDS), "extra", "flags")

INSERT_SAMPLES_SQL: Final = (
    f"INSERT INTO samples ({', '.join(_COLD)}) "
    f"SELECT vin, {_TS}, seq, {', '.join(_scaled(n) for n in NUMERIC_FIELDS)}, extra, flags "
    f"FROM {STAGING_TABLE} ON CONFLICT (vin, ts, seq) DO NOTHING"
)
"""Cold insert; the command tag's count is the number of new rows (duplicates are skipped)."""


def _newest(name: str) -> str:
    # Newest non-null value of one field in this write, per vehicle, in one hash-aggregate pass:
    # arrays compare element by element, so max() of [ts, seq, value] is the newest sample's
    # (array_agg(... ORDER BY) would sort once per field). float8 holds ts (µs) exactly up to
    # year 2255, and real/double values exactly; seq as float8 only breaks ties of equal ts.
    newest = (
        f"max(ARRAY[ts::float8, seq::float8, {name}::float8]) FILTER (WHERE {name} IS NOT NULL)"
    )
    return (
        f"({newest})[3]::{_type(name)} AS {name}, "
        f"timestamptz 'epoch' + ({newest})[1] * interval '1 microsecond' AS {name}_ts"
    )


def _forward(name: str) -> str:
    # A value replaces the stored one only if it was seen later; a NULL (field absent from this
    # write) keeps the last known value because its _ts is NULL and never compares greater.
    return (
        f"{name} = CASE WHEN excluded.{name}_ts > coalesce(v.{name}_ts, '-infinity') "
        f"THEN excluded.{name} ELSE v.{name} END, "
        f"{name}_ts = greatest(v.{name}_ts, excluded.{name}_ts)"
    )


_STATE_COLS: Final = ", ".join(f"{n}, {n}_ts" for n in NUMERIC_FIELDS)

UPSERT_STATE_SQL: Final = (
    "WITH newest AS ("
    "SELECT vin, max(ts) AS ts_us, (max(ARRAY[ts, seq, flags]))[2] AS seq, "
    "(max(ARRAY[ts, seq, flags]))[3] AS flags, "
    + ", ".join(_newest(n) for n in NUMERIC_FIELDS)
    + f" FROM {STAGING_TABLE} GROUP BY vin), "
    # jsonb keeps the last of duplicate keys: extra keys merge oldest to newest.
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
    # Newer keys win over stored ones; a backfill only adds keys never seen.
    "WHEN excluded.extra_ts > coalesce(v.extra_ts, '-infinity') "
    "THEN coalesce(v.extra, '{}') || excluded.extra "
    "ELSE excluded.extra || coalesce(v.extra, '{}') END, "
    "extra_ts = greatest(v.extra_ts, excluded.extra_ts)"
)
"""Hot upsert from the staging table: newest value per vehicle per field, only ever forward."""

_REJECTED_COLUMNS: Final = ("received_at", "topic", "reason", "detail", "payload")


@dataclass(frozen=True)
class WriteResult:
    """What one :meth:`Writer.write` committed."""

    batches: int
    samples: int
    inserted: int
    """New cold rows; ``samples - inserted`` were already stored (redelivery)."""


@dataclass(frozen=True)
class Rejected:
    """A message refused by the consumer, kept with its raw bytes in the ``rejected`` table."""

    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: bytes


_TRANSIENT_SQLSTATES: Final = frozenset(
    {
        "08000",  # connection_exception
        "08001",  # sqlclient_unable_to_establish_sqlconnection
        "08003",  # connection_does_not_exist
        "08004",  # sqlserver_rejected_establishment_of_sqlconnection
        "08006",  # connection_failure
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "55P03",  # lock_not_available
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down, recovery)
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying with backoff: the database or the link is down, busy or
    restarting, or a transaction lost a race. False for bugs and bad data."""
    if isinstance(exc, (OSError, TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return True
    if isinstance(exc, asyncpg.exceptions.InterfaceError):
        # "connection is closed", "pool is closing": the link, not the statement.
        return "closed" in str(exc) or "closing" in str(exc)
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return getattr(exc, "sqlstate", None) in _TRANSIENT_SQLSTATES
    return False


_json = msgspec.json.Encoder()


def _encode_jsonb(value: dict[str, float]) -> bytes:
    return b"\x01" + _json.encode(value)  # binary jsonb: version byte 1, then the JSON text


def _decode_jsonb(data: bytes) -> Any:
    return msgspec.json.decode(data[1:])


async def _setup_connection(connection: Any) -> None:
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )
    await connection.execute(STAGING_DDL)


def records(batches: Sequence[Batch]) -> list[tuple[Any, ...]]:
    """Staging rows: the VIN prepended to each sample's fields, nothing computed per value."""
    astuple = msgspec.structs.astuple
    return [(batch.vin, *astuple(s)) for batch in batches for s in batch.samples]


class Writer:
    """Writes batches to PostgreSQL/TimescaleDB through one asyncpg pool.

    An async context manager: entering opens the pool and learns the storage mode (the
    migrations must have run); leaving closes the pool.
    """

    def __init__(self, dsn: str, *, pool_size: int = 4, statement_timeout_s: float = 30.0) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._statement_timeout_s = statement_timeout_s
        self._pool: Any = None
        self.mode = "unknown"

    async def __aenter__(self) -> Self:
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            init=_setup_connection,
            command_timeout=self._statement_timeout_s + 5,
            server_settings={
                "statement_timeout": str(int(self._statement_timeout_s * 1000)),
                "application_name": "revline-consumer",
            },
        )
        try:
            mode = await self._pool.fetchval(
                "SELECT mode FROM revline_migrations ORDER BY applied_at LIMIT 1"
            )
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self.mode = str(mode)
        log.info("database writer ready", extra=kv(mode=self.mode, pool_size=self._pool_size))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=self._statement_timeout_s)
            except TimeoutError:
                pool.terminate()

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("Writer used outside 'async with'")
        return self._pool

    async def write(self, batches: Sequence[Batch]) -> WriteResult:
        """Commit every sample of ``batches`` in one transaction; safe to repeat (idempotent)."""
        rows = records(batches)
        if not rows:
            return WriteResult(batches=len(batches), samples=0, inserted=0)
        async with self._require_pool().acquire() as connection, connection.transaction():
            await connection.copy_records_to_table(
                STAGING_TABLE, records=rows, columns=STAGING_COLUMNS
            )
            status = await connection.execute(INSERT_SAMPLES_SQL)
            await connection.execute(UPSERT_STATE_SQL)
        return WriteResult(
            batches=len(batches), samples=len(rows), inserted=int(status.split()[-1])
        )

    async def reject(self, rejected: Sequence[Rejected]) -> None:
        """Store refused messages, raw bytes included, in one statement."""
        if not rejected:
            return
        rows = [(r.received_at, r.topic, r.reason, r.detail, r.payload) for r in rejected]
        async with self._require_pool().acquire() as connection:
            await connection.copy_records_to_table(
                "rejected", records=rows, columns=_REJECTED_COLUMNS
            )

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        await self._require_pool().fetchval("SELECT 1")

    async def maintain(self) -> MaintenanceReport:
        """One maintenance pass (plain mode: partitions, retention, rollups; TimescaleDB: none)."""
        from consumer.maintenance import maintain  # noqa: PLC0415 - avoids an import cycle

        async with self._require_pool().acquire() as connection:
            return await maintain(connection)


def _simulated(vins: int, per_vin: int, start_us: int) -> list[Batch]:
    batches = []
    for v in range(vins):
        vin = f"1BENCH{v:011d}"
        samples = [
            Sample(
                ts=start_us + i * 1_000_000,
                seq=i,
                speed=50.0 + (i % 60),
                rpm=2000.0 + (i % 300),
                coolant=90.0,
                throttle=20.0,
                battery=13.8,
                lat=48.1 + i * 1e-5,
                lon=11.5 + i * 1e-5,
            )
            for i in range(per_vin)
        ]
        batches.append(Batch(v=1, vin=vin, batch=v, samples=samples))
    return batches


async def bench_write(dsn: str, n: int = 200_000, *, per_write: int = 20_000) -> dict[str, float]:
    """Print and return samples/s of :meth:`Writer.write` against a bare staged COPY of the same
    rows into the same tables (the baseline), on an already migrated database. Writes rows for
    ``1BENCH...`` VINs one year back."""
    start_us = int((time.time() - 365 * 86400) * 1_000_000)
    vins = max(1, per_write // 500)
    writes = max(1, n // per_write)
    async with Writer(dsn, pool_size=1) as writer:
        plan = [_simulated(vins, per_write // vins, start_us + k * 10**12) for k in range(writes)]
        baseline_plan = [
            _simulated(vins, per_write // vins, start_us + (k + writes) * 10**12)
            for k in range(writes)
        ]
        began = time.perf_counter()
        for batches in plan:
            await writer.write(batches)
        writer_s = time.perf_counter() - began

        began = time.perf_counter()
        async with writer._require_pool().acquire() as connection:
            for batches in baseline_plan:
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        STAGING_TABLE, records=records(batches), columns=STAGING_COLUMNS
                    )
                    await connection.execute(INSERT_SAMPLES_SQL)
        baseline_s = time.perf_counter() - began
    total = writes * per_write
    result = {
        "samples": float(total),
        "writer_per_s": total / writer_s,
        "staged_copy_per_s": total / baseline_s,
        "ratio": baseline_s / writer_s,
    }
    print(
        f"writer: {result['writer_per_s']:,.0f} samples/s; staged COPY + cold insert only: "
        f"{result['staged_copy_per_s']:,.0f} samples/s; writer/baseline = {result['ratio']:.0%} "
        f"({total:,} samples, {per_write:,} per transaction)"
    )
    return result
