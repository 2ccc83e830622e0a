"""The database writer: one transaction per write, bulk COPY, idempotent, hot state moves forward.

:meth:`Writer.write` takes decoded batches and, in ONE transaction: binary-COPYs every sample into
a session-local staging table, inserts them into the cold table ``samples`` skipping those already
there (the unique key ``(vin, ts, seq)`` makes redelivery idempotent), and upserts the hot table
``vehicle_state`` with the newest value of each field per vehicle (an older sample never
overwrites a newer value). ``received_at`` is the transaction's time.

The newest values are reduced in Python (:func:`state_rows`, one row per vehicle, a few ms for
20k samples because batches arrive in order and the scan stops early) and COPYed into a second
staging table: aggregating every staged row in SQL cost more than the cold insert itself.

The SQL is in module constants so that the TimescaleDB check (revline/tools/pglite/) runs the very
same statements against TimescaleDB compiled to WASM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import compress, islice, repeat
from operator import is_not, itemgetter, le, lt
from typing import TYPE_CHECKING, Any, Final, Self

import asyncpg
import msgspec

from revline.contract import NUMERIC_FIELDS, Batch, Sample
from revline.fields import FIELD_BY_NAME, FIELDS
from revline.logs import kv
from revline.storage.derive import Derivation, Staged, Vehicle
from revline.storage.errors import UnusableDatabaseError, unusable_database
from revline.wire_v2 import AnyBatch, RowBatch

if TYPE_CHECKING:
    from types import TracebackType

    from revline.storage.maintenance import MaintenanceReport

__all__ = [
    "COLD_SCALES",
    "INSERT_SAMPLES_SQL",
    "STAGING_COLUMNS",
    "STAGING_DDL",
    "STAGING_TABLE",
    "STATE_COLUMNS",
    "STATE_DDL",
    "STATE_TABLE",
    "UPSERT_STATE_SQL",
    "Rejected",
    "WriteResult",
    "Writer",
    "cold_column",
    "records",
    "state_rows",
]

log = logging.getLogger(__name__)

STAGING_TABLE: Final = "revline_staging"
STAGING_COLUMNS: Final = ("vin", *Sample.__struct_fields__)
"""Staging columns: the VIN, then the sample's fields in contract order (``astuple`` order)."""


def _type(name: str) -> str:
    return FIELD_BY_NAME[name].value_type


# TEMP + ON COMMIT DELETE ROWS: created once per connection, emptied by every commit, never
# WAL-logged, no catalog churn per write. ts stays the contract's integer microseconds and is
# converted in SQL (exact; to_timestamp() would go through float seconds).
STAGING_DDL: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} (vin text, ts bigint, seq bigint, "
    + ", ".join(f"{name} {_type(name)}" for name in NUMERIC_FIELDS)
    + ", extra jsonb, flags integer, dtc text[]) ON COMMIT DELETE ROWS"
)

_TS: Final = "timestamptz 'epoch' + ts * interval '1 microsecond'"

COLD_SCALES: Final = {field.name: (field.db_digits, field.cold_type) for field in FIELDS}
"""Cold-table storage of each measurement (from :data:`revline.fields.FIELDS`): ``<field>_e<N>``
holds round(value * 10^N) in the given integer type. N is finer than any sensor's resolution (OBD
rpm is 0.25, GPS 1e-7 degree), and the type holds the contract's bounds, so overflow is
impossible. Integers compress by delta-of-delta to a few bits per smooth value; floats (Gorilla
XOR) take 2-5 bytes each: see docs/storage.md."""


def cold_column(name: str) -> str:
    """The cold-table column of a measurement, e.g. ``speed_e1``."""
    return FIELD_BY_NAME[name].cold_column


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


STATE_TABLE: Final = "revline_state_staging"
STATE_COLUMNS: Final = (
    "vin",
    "ts",
    "seq",
    "flags",
    *(column for name in NUMERIC_FIELDS for column in (name, f"{name}_ts")),
    "extra",
    "extra_ts",
)
"""Hot-state candidate columns, one row per vehicle of a write (:func:`state_rows`); times in µs."""

STATE_DDL: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STATE_TABLE} (vin text, ts bigint, seq bigint, "
    "flags integer, "
    + ", ".join(f"{name} {_type(name)}, {name}_ts bigint" for name in NUMERIC_FIELDS)
    + ", extra jsonb, extra_ts bigint) ON COMMIT DELETE ROWS"
)


def _at(column: str) -> str:
    return f"timestamptz 'epoch' + {column} * interval '1 microsecond'"


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
    f"INSERT INTO vehicle_state AS v (vin, ts, seq, flags, updated_at, {_STATE_COLS}, "
    "extra, extra_ts) "
    f"SELECT vin, {_at('ts')}, seq, flags, now(), "
    + ", ".join(f"{n}, {_at(n + '_ts')}" for n in NUMERIC_FIELDS)
    + f", extra, {_at('extra_ts')} FROM {STATE_TABLE} "
    # Rows are locked in this order: concurrent writes (write_concurrency, --workers, other
    # consumers) touching the same vehicles then wait for each other instead of deadlocking
    # (40P01 after deadlock_timeout, 1 s, seen with 1,000 cars in small messages).
    "ORDER BY vin "
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
"""Hot upsert from the state staging table (one row per vehicle), only ever forward."""

_FIELD_COLUMNS: Final = tuple(STAGING_COLUMNS.index(name) for name in NUMERIC_FIELDS)
_EXTRA_INDEX: Final = STAGING_COLUMNS.index("extra")
_EXTRA: Final = itemgetter(_EXTRA_INDEX)
_FLAGS: Final = STAGING_COLUMNS.index("flags")


def state_rows(rows: Sequence[tuple[Any, ...]] | Staged) -> list[tuple[Any, ...]]:
    """The hot-state candidate of each vehicle in staging ``rows`` (:func:`records`), as
    :data:`STATE_COLUMNS`: the newest sample's ts, seq and flags; per field the newest non-null
    value and its sample's ts; ``extra`` merged oldest to newest (newer keys win) and the ts of
    the newest sample carrying one. "Newest" is the largest ``(ts, seq)``; among samples with
    the same ``(ts, seq)`` the largest value (and flags) wins, so the result never depends on
    the order of ``rows``."""
    staged = rows if isinstance(rows, Staged) else Staged(rows)
    return [_state_row(vehicle) for vehicle in staged.vehicles]


def _state_row(vehicle: Vehicle) -> tuple[Any, ...]:
    vin, rows = vehicle.vin, vehicle.rows
    if len(rows) == 1:
        # One sample of this vehicle in the write (many cars sending single samples).
        row = rows[0]
        ts = row[1]
        one: list[Any] = [vin, ts, row[2], row[_FLAGS]]
        for column in _FIELD_COLUMNS:
            value = row[column]
            one += (value, None if value is None else ts)
        extra = row[_EXTRA_INDEX]
        one += (dict(extra), ts) if extra else (None, None)
        return tuple(one)
    keys = list(zip(vehicle.ts, vehicle.seq, strict=True))
    if all(map(lt, keys, islice(keys, 1, None))):
        return _in_order(vin, rows)
    return _any_order(vin, rows, keys)


def _in_order(vin: str, rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """:func:`_state_row` of rows in strictly increasing ``(ts, seq)`` (what a vehicle sends):
    no ties, so the newest non-null value of a field is its last. The rows are transposed at C
    speed; a field the last row carries (nearly all) or no row carries costs one C call."""
    columns = list(zip(*rows, strict=True))
    last = len(rows) - 1
    stamps = columns[1]
    state: list[Any] = [vin, stamps[last], columns[2][last], columns[_FLAGS][last]]
    for index in _FIELD_COLUMNS:
        column = columns[index]
        value = column[last]
        if value is not None:
            state += (value, stamps[last])
        elif column.count(None) == len(column):
            state += (None, None)
        else:
            j = last - 1
            while column[j] is None:
                j -= 1
            state += (column[j], stamps[j])
    extras = columns[_EXTRA_INDEX]
    carrying = list(filter(None, extras))  # empty maps carry nothing, as in SQL's jsonb_each
    if not carrying:
        return (*state, None, None)
    merged: dict[str, float] = {}
    for extra in carrying:
        merged.update(extra)
    j = last
    while not extras[j]:
        j -= 1
    return (*state, merged, stamps[j])


def _any_order(
    vin: str, rows: list[tuple[Any, ...]], keys: list[tuple[int, int]]
) -> tuple[Any, ...]:
    """:func:`_state_row` of rows in any order, the same ``(ts, seq)`` possibly twice."""
    if not all(map(le, keys, islice(keys, 1, None))):
        # Rare (a device resending out of order): sort once, then the in-order scan applies.
        order = sorted(range(len(rows)), key=keys.__getitem__)
        rows = [rows[k] for k in order]
        keys = [keys[k] for k in order]
    last = len(rows) - 1
    backwards = range(last, -1, -1)
    newest = keys[last]
    flags = rows[last][_FLAGS]
    k = last - 1
    while k >= 0 and keys[k] == newest:  # same sample twice in one write: identical in practice
        flags = max(flags, rows[k][_FLAGS])
        k -= 1
    state: list[Any] = [vin, newest[0], newest[1], flags]
    for column in _FIELD_COLUMNS:
        # The last non-null value, found from the end at C speed: usually the very last row.
        present = map(is_not, map(itemgetter(column), reversed(rows)), repeat(None))
        j = next(compress(backwards, present), None)
        if j is None:
            state += (None, None)
            continue
        value, key = rows[j][column], keys[j]
        k = j - 1
        while k >= 0 and keys[k] == key:
            other = rows[k][column]
            if other is not None and other > value:
                value = other
            k -= 1
        state += (value, key[0])
    # Empty maps carry nothing, as in SQL's jsonb_each: filter(None) drops them with the NULLs.
    extras = list(filter(None, map(_EXTRA, rows)))
    if not extras:
        state += (None, None)
    else:
        merged: dict[str, float] = {}
        for extra in extras:
            merged.update(extra)
        j = next(compress(backwards, map(_EXTRA, reversed(rows))))
        state += (merged, keys[j][0])
    return tuple(state)


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


_NOT_MIGRATED: Final = "database is not migrated: run `revline migrate` with the same database_url"


_json = msgspec.json.Encoder()


def _encode_jsonb(value: dict[str, float]) -> bytes:
    return b"\x01" + _json.encode(value)  # binary jsonb: version byte 1, then the JSON text


def _decode_jsonb(data: bytes) -> Any:
    return msgspec.json.decode(data[1:])


async def _setup_connection(connection: Any, derivations: Sequence[Derivation] = ()) -> None:
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )
    await connection.execute(STAGING_DDL)
    await connection.execute(STATE_DDL)
    for derivation in derivations:
        await derivation.prepare(connection)


async def _write_rows(
    connection: Any,
    staged: Staged,
    state: list[tuple[Any, ...]],
    derivations: Sequence[Derivation] = (),
) -> int:
    """Stage, insert cold, upsert hot, run the derivations, inside the caller's transaction;
    the new cold rows."""
    await connection.copy_records_to_table(
        STAGING_TABLE, records=staged.rows, columns=STAGING_COLUMNS
    )
    status = await connection.execute(INSERT_SAMPLES_SQL)
    await connection.copy_records_to_table(STATE_TABLE, records=state, columns=STATE_COLUMNS)
    await connection.execute(UPSERT_STATE_SQL)
    for derivation in derivations:
        await derivation.apply(connection, staged)
    return int(status.split()[-1])


_PROBE_VIN: Final = "REVLINEPROBE00000"
"""Not a VIN (ISO 3779 never uses I or O): the probe can never touch a real vehicle's rows."""


def _probe_sample() -> Sample:
    # Now, so that it lands where live data does (an existing chunk or partition), and no
    # measurement: NULLs pass every CHECK, the probe tests the deployment, not values.
    return Sample(ts=time.time_ns() // 1000, seq=0)


def _storable(text: str) -> str:
    """``text`` as PostgreSQL text can hold it: NUL and unpaired surrogates escaped."""
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def records(batches: Sequence[AnyBatch]) -> list[tuple[Any, ...]]:
    """Staging rows: the VIN prepended to each sample's fields, nothing computed per value (a
    v2 batch arrives as these rows already)."""
    astuple = msgspec.structs.astuple
    rows: list[tuple[Any, ...]] = []
    for batch in batches:
        if isinstance(batch, RowBatch):
            rows += batch.rows
        else:
            rows += [(batch.vin, *astuple(s)) for s in batch.samples]
    return rows


class Writer:
    """Writes batches to PostgreSQL/TimescaleDB through one asyncpg pool.

    An async context manager: entering opens the pool and learns the storage mode (the
    migrations must have run); leaving closes the pool.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        statement_timeout_s: float = 30.0,
        derivations: Sequence[Derivation] = (),
    ) -> None:
        self._dsn = dsn
        self.derivations = tuple(derivations)
        """Kept up to date inside every write's transaction (:mod:`revline.consumer.derive`)."""
        self._pool_size = pool_size
        self._statement_timeout_s = statement_timeout_s
        self._pool: Any = None
        self.mode = "unknown"

    async def __aenter__(self) -> Self:
        # min_size=0: with a floor of connections, asyncpg's pool reconnects in a background task
        # that logs a warning with a full traceback on every failed attempt, about once a second
        # for as long as the database is away. Without one, connections are opened by the calls
        # that need them, and a failure reaches the caller (the consumer's one rate-limited line).
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            init=functools.partial(_setup_connection, derivations=self.derivations),
            command_timeout=self._statement_timeout_s + 5,
            server_settings={
                "statement_timeout": str(int(self._statement_timeout_s * 1000)),
                "application_name": "revline-consumer",
            },
        )
        try:
            self.mode = await self._schema_mode()
        except BaseException as exc:
            await self._pool.close()
            self._pool = None
            unusable = unusable_database(exc)
            if unusable is not None:
                raise unusable from exc
            raise
        log.info("database writer ready", extra=kv(mode=self.mode, pool_size=self._pool_size))
        return self

    async def _schema_mode(self) -> str:
        """The storage mode recorded by ``revline migrate``; :class:`UnusableDatabaseError` if
        the database was never migrated or lacks a migration this code expects."""
        from revline.storage.migrate import (  # noqa: PLC0415
            AsyncpgSession,
            applied_migrations,
            default_sql_dir,
            discover,
        )

        applied = await applied_migrations(AsyncpgSession(self._pool))
        mode = applied.mode
        if mode is None:
            raise UnusableDatabaseError(_NOT_MIGRATED)
        missing = [
            m.key
            for m in discover(default_sql_dir(), mode)
            if m.version is not None and m.key not in applied.checksums
        ]
        if missing:
            raise UnusableDatabaseError(
                f"database schema is older than this consumer (missing {', '.join(missing)}): "
                "run `revline migrate` with the same database_url"
            )
        return mode

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

    @property
    def pool(self) -> Any:
        """The asyncpg pool (for derivations' background work); only inside ``async with``."""
        return self._require_pool()

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("Writer used outside 'async with'")
        return self._pool

    async def write(self, batches: Sequence[AnyBatch]) -> WriteResult:
        """Commit every sample of ``batches`` in one transaction; safe to repeat (idempotent)."""
        staged = Staged(records(batches))
        if not staged.rows:
            return WriteResult(batches=len(batches), samples=0, inserted=0)
        state = state_rows(staged)  # before the transaction: Python time holds no locks
        async with self._require_pool().acquire() as connection, connection.transaction():
            inserted = await _write_rows(connection, staged, state, self.derivations)
        return WriteResult(batches=len(batches), samples=len(staged), inserted=inserted)

    async def probe(self) -> None:
        """Write one plain sample of a made-up vehicle through the very statements of
        :meth:`write`, in a transaction that is rolled back; raise what any write would raise.

        This is the proof behind a dead letter: when one message's write fails with a data
        error (:func:`is_data_error`) and the probe succeeds, the deployment can write and the
        fault is that message's values; when the probe fails too, it is an outage.
        """
        staged = Staged(records([Batch(v=1, vin=_PROBE_VIN, batch=0, samples=[_probe_sample()])]))
        state = state_rows(staged)
        async with self._require_pool().acquire() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                await _write_rows(connection, staged, state, self.derivations)
            finally:
                await transaction.rollback()

    async def reject(self, rejected: Sequence[Rejected]) -> None:
        """Store refused messages, raw bytes included, in one statement.

        The text columns get what PostgreSQL can store whatever the message held: a NUL or a
        lone surrogate in a detail or topic is written as an escape, never a reason to fail.
        """
        if not rejected:
            return
        rows = [
            (r.received_at, _storable(r.topic), r.reason, _storable(r.detail), r.payload)
            for r in rejected
        ]
        async with self._require_pool().acquire() as connection:
            await connection.copy_records_to_table(
                "rejected", records=rows, columns=_REJECTED_COLUMNS
            )

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        await self._require_pool().fetchval("SELECT 1")

    async def maintain(self) -> MaintenanceReport:
        """One maintenance pass (plain mode: partitions, retention, rollups; TimescaleDB: none)."""
        from revline.storage.maintenance import maintain  # noqa: PLC0415 - avoids an import cycle

        async with self._require_pool().acquire() as connection:
            return await maintain(connection)
