"""The device's single source of truth: every sample is committed here before anything else.

SQLite in WAL mode with ``synchronous=NORMAL``: a commit survives a crash or ``kill -9`` of the
process; a power loss can lose the last commits since the last WAL checkpoint-sync (SQLite's
documented trade-off), never corrupt the file. Samples are written in small transactions (one per
flush interval) to spare the SD card.

Layout, chosen for <= 100 bytes per sample on disk:

* ``samples(seq INTEGER PRIMARY KEY, ts, data, mono, boot)``: the rowid *is* the sequence number,
  so there is no second index. ``data`` is a MessagePack array ``[mask, q1, q2, ...]``: the present
  fields as integers quantised to the sensor's resolution (:data:`FIELD_SCALES`), then ``extra``.
  ``mono``/``boot`` are set only while the timestamp waits for a trusted clock.
* ``batches(id, lo, hi, n, state, sent_at, acked_at)``: a batch is a contiguous ``seq`` range. Rows
  of a batch never change, so a resend rebuilds the *same bytes* from them (:func:`encode_batch`).
  ``state``: 0 created, 1 published (PUBACK), 2 durable (end-to-end ack).
* ``rejected(id, received_at, topic, reason, detail, size, payload)``: dead letters, the bad
  messages that arrived on ``ack/<vin>`` with their raw bytes, bounded to the newest
  :data:`DEAD_LETTER_MAX_ROWS` rows and :data:`DEAD_LETTER_MAX_BYTES` of payload; the older ones
  are counted in ``meta.rejected_evicted``. Read them with :func:`edge.status.read_dead_letters`.

Only this module reads or writes these tables: :class:`Spool` for the service,
:class:`SpoolReader` (read-only) for ``revline edge status`` and tests.

Size cap: durable batches are evicted first (oldest first); only then the oldest unsent rows, as
a last resort, counted in ``meta.evicted_unsent`` and logged.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import msgspec

from revline.contract import FLAG_CLOCK_UNSYNCED, SCHEMA_VERSION, Batch, Sample
from revline.edge.index import SpoolIndex
from revline.fields import FIELDS
from revline.logs import kv
from revline.wire_v2 import WIRE_VERSION, Columns, encode_v2

__all__ = [
    "CREATED",
    "DEAD_LETTER_MAX_BYTES",
    "DEAD_LETTER_MAX_ROWS",
    "DURABLE",
    "FIELD_SCALES",
    "PUBLISHED",
    "DeadLetter",
    "Spool",
    "SpoolBatch",
    "SpoolReader",
    "SpoolRow",
    "batch_columns",
    "encode_batch",
    "pack_values",
    "row_to_sample",
]

log = logging.getLogger("revline.edge.spool")

CREATED: Final = 0
PUBLISHED: Final = 1
DURABLE: Final = 2

FIELD_SCALES: Final[tuple[tuple[str, int], ...]] = tuple(
    (field.name, field.device_scale) for field in FIELDS
)
"""Integer units the spool stores each measurement in, in contract field order: a row holds the
present fields by their position here, so revline.fields only ever appends (old rows stay
readable: a field added later is simply absent from them)."""

_EXTRA_BIT: Final = 1 << 15
_DTC_BIT: Final = 1 << 48
"""Presence of a trouble-code set (after ``extra``): far above any field's bit."""


def _field_bit(position: int) -> int:
    """The presence bit of the field at ``position``: bit 15 is ``extra``'s since the first spool
    rows were written, so the 16th field and later ones take bits 16, 17..."""
    return 1 << (position if position < 15 else position + 1)


_FIELD_BITS: Final = tuple(_field_bit(i) for i in range(len(FIELD_SCALES)))
_DB_FACTORS: Final = tuple(10**field.db_digits // field.device_scale for field in FIELDS)
"""Spool integer to cold-table integer, per field (exact: revline.fields holds the rule)."""
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, data BLOB NOT NULL, mono INTEGER, boot INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, lo INTEGER NOT NULL, hi INTEGER NOT NULL, n INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0, sent_at REAL, acked_at REAL
);
CREATE TABLE IF NOT EXISTS boots (id INTEGER PRIMARY KEY, boot_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY, received_at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL
);
"""

DEAD_LETTER_MAX_ROWS: Final = 1000
"""Dead letters kept in the spool, newest first; older ones are only counted."""
DEAD_LETTER_MAX_BYTES: Final = 4_000_000
"""Payload bytes the dead letters may hold together (at most 1/20 of a smaller spool cap): a
flood of bad acks must never make the size cap evict samples. A longer payload is kept cut."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message refused on arrival, kept for an operator: why, and its raw bytes."""

    received_at: float
    """Wall-clock time of arrival, seconds since the epoch."""
    topic: str
    reason: str
    """A stable short code: the contract's (``undecodable``, ``invalid``, ...) or the edge's
    (``vin_mismatch``, ``unknown_batch``, ``internal_error``)."""
    detail: str
    payload: bytes
    """The raw bytes, cut to the byte budget if longer than it."""
    size: int
    """The full length of the payload as received."""


def pack_values(
    values: dict[str, float],
    extra: dict[str, float] | None = None,
    dtc: list[str] | None = None,
) -> bytes:
    """The compact ``data`` blob of one sample: quantised integers behind a presence mask, then
    ``extra`` and the trouble-code set if any (``[]``, cleared, is kept too)."""
    mask = 0
    out: list[Any] = [0]
    for bit, (name, scale) in zip(_FIELD_BITS, FIELD_SCALES, strict=True):
        value = values.get(name)
        if value is not None:
            mask |= bit
            out.append(round(value * scale))
    if extra:
        mask |= _EXTRA_BIT
        out.append(extra)
    if dtc is not None:
        mask |= _DTC_BIT
        out.append(dtc)
    out[0] = mask
    return _encoder.encode(out)


def row_to_sample(seq: int, ts: int, data: bytes, *, flagged: bool) -> Sample:
    """Rebuild the contract sample of a spool row; deterministic, so resends are identical."""
    items = _decoder.decode(data)
    mask: int = items[0]
    fields: dict[str, Any] = {}
    j = 1
    for bit, (name, scale) in zip(_FIELD_BITS, FIELD_SCALES, strict=True):
        if mask & bit:
            q: int = items[j]
            j += 1
            # Whole values go on the wire as MessagePack ints (1-3 bytes instead of 9).
            fields[name] = q // scale if q % scale == 0 else q / scale
    if mask & _EXTRA_BIT:
        fields["extra"] = items[j]
        j += 1
    if mask & _DTC_BIT:
        fields["dtc"] = items[j]
    return Sample(ts=ts, seq=seq, flags=FLAG_CLOCK_UNSYNCED if flagged else 0, **fields)


SpoolRow = tuple[int, bytes, int | None]
"""What the sampler writes: ``(ts_us, data, mono_us)``; ``mono_us`` only while untrusted."""


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """A batch as stored: its id and rows ``(seq, ts, data, boot)`` in ``seq`` order."""

    id: int
    rows: list[tuple[int, int, bytes, int | None]]

    @property
    def lo(self) -> int:
        """First sequence number."""
        return self.rows[0][0]

    @property
    def hi(self) -> int:
        """Last sequence number."""
        return self.rows[-1][0]


def batch_columns(batch: SpoolBatch) -> Columns:
    """The v2 columns of a stored batch: the spool's integers brought to the database's
    resolution exactly (``10 ** db_digits`` is a multiple of ``device_scale``), no float."""
    n = len(batch.rows)
    values: dict[int, list[int | None]] = {}
    flags = [0] * n
    extras: list[dict[str, float] | None] = [None] * n
    dtcs: list[list[str] | None] = [None] * n
    for i, (_, _, data, boot) in enumerate(batch.rows):
        items = _decoder.decode(data)
        mask: int = items[0]
        j = 1
        for position, (bit, factor) in enumerate(zip(_FIELD_BITS, _DB_FACTORS, strict=True)):
            if mask & bit:
                values.setdefault(position, [None] * n)[i] = items[j] * factor
                j += 1
        if mask & _EXTRA_BIT:
            extras[i] = items[j]
            j += 1
        if mask & _DTC_BIT:
            dtcs[i] = items[j]
        if boot is not None:
            flags[i] = FLAG_CLOCK_UNSYNCED
    return Columns(
        ts=[row[1] for row in batch.rows],
        seq=[row[0] for row in batch.rows],
        values=values,
        flags=flags,
        extra=extras,
        dtc=dtcs,
    )


def encode_batch(vin: str, batch: SpoolBatch, wire_version: int = 1) -> bytes:
    """The exact wire bytes of a stored batch (the same every time it is called), in contract
    v1 (MessagePack samples) or v2 (columns, :mod:`revline.wire_v2`)."""
    if wire_version == WIRE_VERSION:
        return encode_v2(vin, batch.id, batch_columns(batch))
    samples = [
        row_to_sample(seq, ts, data, flagged=boot is not None) for seq, ts, data, boot in batch.rows
    ]
    return msgspec.msgpack.encode(Batch(v=SCHEMA_VERSION, vin=vin, batch=batch.id, samples=samples))


class Spool:
    """The SQLite spool, a context manager; thread-safe (the publisher runs in its own thread)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int | None = None,
        boot_id: str = "unknown",
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.boot_id = boot_id
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.next_batch = 0
        self._index = SpoolIndex()
        self._rows = 0
        self._boot_key = 0
        self.dropped_batches: set[int] = set()
        """Batches evicted before they were durable; the publisher forgets them."""

    # --- lifecycle ---

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: durable across a process crash; a power cut may roll back the
            # last transactions, never corrupt. FULL would fsync every flush on an SD card.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            self._db = db
            self._load()
        except BaseException:
            db.close()
            self._db = None
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def next_seq(self) -> int:
        """The seq the next written sample gets."""
        return self._index.next_seq

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection; a bug to use it outside the context manager."""
        if self._db is None:
            raise RuntimeError("spool is not open")
        return self._db

    def _meta(self, key: str, default: Any = 0) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, key: str, value: object) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _load(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR IGNORE INTO boots(boot_id) VALUES (?)", (self.boot_id,))
            (self._boot_key,) = db.execute(
                "SELECT id FROM boots WHERE boot_id = ?", (self.boot_id,)
            ).fetchone()
            max_seq, self._rows = db.execute("SELECT max(seq), count(*) FROM samples").fetchone()
            (max_batch,) = db.execute("SELECT max(id) FROM batches").fetchone()
            next_seq = max(int(self._meta("next_seq")), (max_seq or -1) + 1)
            self.next_batch = max(int(self._meta("next_batch")), (max_batch or -1) + 1)
            # Rows of an earlier boot that never got a trusted clock: their monotonic time is
            # meaningless now. Give them a best-effort ts (never before the last trusted one) and
            # keep `boot` set, which flags them FLAG_CLOCK_UNSYNCED on the wire.
            floor = int(self._meta("last_trusted_us"))
            cursor = db.execute(
                "UPDATE samples SET ts = max(ts, ?), mono = NULL "
                "WHERE mono IS NOT NULL AND boot != ?",
                (floor, self._boot_key),
            )
            if cursor.rowcount:
                log.warning(
                    "samples from an earlier boot never got a trusted clock; sent flagged",
                    extra=kv(samples=cursor.rowcount),
                )
            (hold_from,) = db.execute(
                "SELECT min(seq) FROM samples WHERE boot = ? AND mono IS NOT NULL",
                (self._boot_key,),
            ).fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        (min_seq,) = db.execute("SELECT min(seq) FROM samples").fetchone()
        ranges = db.execute("SELECT lo, hi FROM batches ORDER BY lo").fetchall()
        self._index = SpoolIndex.rebuild(
            first_seq=min_seq,
            next_seq=next_seq,
            batches=ranges,
            hold_from=hold_from,
            now=time.monotonic(),
        )

    # --- writing (sampler) ---

    def write(self, rows: Sequence[SpoolRow]) -> int:
        """Commit samples in one transaction; returns the first seq given to them."""
        if not rows:
            return self.next_seq
        with self._lock:
            db = self.db
            first = self.next_seq
            boot = self._boot_key
            params = [
                (first + i, ts, data, mono, None if mono is None else boot)
                for i, (ts, data, mono) in enumerate(rows)
            ]
            last = first + len(rows) - 1
            last_trusted = max((ts for ts, _, mono in rows if mono is None), default=None)
            db.execute("BEGIN")
            try:
                db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)", params)
                self._set_meta("next_seq", last + 1)
                if last_trusted is not None:
                    self._set_meta("last_trusted_us", last_trusted)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._rows += len(rows)
            held = next((first + i for i, row in enumerate(rows) if row[2] is not None), None)
            self._index.written(first, len(rows), held=held, now=time.monotonic())
        if self.max_bytes is not None:
            self.enforce_cap()
        return first

    def fix_clock(self, offset_us: int) -> int:
        """The clock became trusted: give this boot's waiting rows their exact ts; returns count."""
        with self._lock:
            db = self.db
            db.execute("BEGIN")
            try:
                cursor = db.execute(
                    "UPDATE samples SET ts = mono + ?, mono = NULL, boot = NULL "
                    "WHERE boot = ? AND mono IS NOT NULL",
                    (offset_us, self._boot_key),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._index.clock_fixed()
            return cursor.rowcount

    # --- batching (publisher) ---

    def _create(self, rows: list[tuple[int, int, bytes, int | None]]) -> SpoolBatch:
        batch = SpoolBatch(id=self.next_batch, rows=rows)
        db = self.db
        db.execute("BEGIN")
        try:
            db.execute(
                "INSERT INTO batches(id, lo, hi, n) VALUES (?, ?, ?, ?)",
                (batch.id, batch.lo, batch.hi, len(rows)),
            )
            self._set_meta("next_batch", batch.id + 1)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.next_batch += 1
        return batch

    def _select(self, lo: int, hi: int, limit: int, *, newest: bool) -> list[Any]:
        order = "DESC" if newest else "ASC"
        rows = self.db.execute(
            f"SELECT seq, ts, data, boot FROM samples WHERE seq BETWEEN ? AND ? "
            f"ORDER BY seq {order} LIMIT ?",
            (lo, hi, limit),
        ).fetchall()
        if newest:
            rows.reverse()
        return rows

    def take_live(self, max_samples: int, max_age_s: float) -> SpoolBatch | None:
        """The newest unbatched samples as a new batch, once there are enough or they are old."""
        with self._lock:
            now = time.monotonic()
            span = self._index.live(max_samples, max_age_s, now)
            if span is None:
                return None
            rows = self._select(span[0], span[1], max_samples, newest=True)
            if not rows:
                self._index.gone(*span)
                return None
            batch = self._create(rows)
            self._index.took_live(batch.lo, batch.hi, now)
            return batch

    def take_backlog(self, max_samples: int) -> SpoolBatch | None:
        """The oldest unbatched samples (not the live tail) as a new batch."""
        with self._lock:
            while (span := self._index.backlog()) is not None:
                rows = self._select(span[0], span[1], max_samples, newest=False)
                if rows:
                    batch = self._create(rows)
                    self._index.took_backlog(batch.lo, batch.hi)
                    return batch
                self._index.gone(*span)  # evicted: nothing left there
            return None

    def backlog_start(self) -> int | None:
        """The oldest unbatched seq outside the live tail (for ordering against resends)."""
        with self._lock:
            return self._index.backlog_start()

    def load_batch(self, batch_id: int) -> SpoolBatch | None:
        """A stored batch with its rows, to resend it; None if evicted."""
        with self._lock:
            found = self.db.execute(
                "SELECT lo, hi FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            if found is None:
                return None
            rows = self._select(found[0], found[1], found[1] - found[0] + 1, newest=False)
            return SpoolBatch(id=batch_id, rows=rows) if rows else None

    def pending_batches_info(self) -> list[tuple[int, int, int, int]]:
        """``(id, lo, samples, state)`` of batches not yet durable, oldest first."""
        with self._lock:
            return self.db.execute(
                "SELECT id, lo, n, state FROM batches WHERE state < ? ORDER BY lo", (DURABLE,)
            ).fetchall()

    def open_batches(self) -> int:
        """Batches not yet durable."""
        with self._lock:
            (count,) = self.db.execute(
                "SELECT count(*) FROM batches WHERE state < ?", (DURABLE,)
            ).fetchone()
            return int(count)

    def take_dropped(self) -> list[int]:
        """Batches evicted before they were durable since the last call."""
        with self._lock:
            dropped = list(self.dropped_batches)
            self.dropped_batches.clear()
            return dropped

    def mark(self, ids: Sequence[int], state: int) -> None:
        """Record PUBACKs (``PUBLISHED``) or end-to-end acks (``DURABLE``) in one transaction."""
        if not ids:
            return
        now = time.time()
        with self._lock:
            db = self.db
            db.execute("BEGIN")
            try:
                if state == PUBLISHED:
                    db.executemany(
                        "UPDATE batches SET state = max(state, 1), sent_at = coalesce(sent_at, ?) "
                        "WHERE id = ?",
                        [(now, i) for i in ids],
                    )
                else:
                    db.executemany(
                        "UPDATE batches SET state = 2, acked_at = ? WHERE id = ?",
                        [(now, i) for i in ids],
                    )
                    self._set_meta("last_ack_wall", now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # --- what came in wrong on ack/<vin> ---

    def dead_letter_budget(self) -> int:
        """Payload bytes the dead letters may hold: a small share of the cap, never the samples'."""
        if self.max_bytes is None:
            return DEAD_LETTER_MAX_BYTES
        return max(min(DEAD_LETTER_MAX_BYTES, self.max_bytes // 20), 1024)

    def dead_letter(self, letters: Sequence[DeadLetter], *, unkept: int = 0) -> None:
        """Keep refused messages in one transaction; trim to the newest rows within the budget.

        ``unkept``: more refused messages that were not kept (a flood); counted all the same.
        """
        if not letters and not unkept:
            return
        budget = self.dead_letter_budget()
        with self._lock:
            db = self.db
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT INTO rejected(received_at, topic, reason, detail, size, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (d.received_at, d.topic, d.reason, d.detail, d.size, d.payload[:budget])
                        for d in letters
                    ],
                )
                evicted = _trim_dead_letters(db, DEAD_LETTER_MAX_ROWS, budget) + unkept
                total = int(self._meta("rejected")) + len(letters) + unkept
                self._set_meta("rejected", total)
                self._set_meta("rejected_evicted", int(self._meta("rejected_evicted")) + evicted)
                if letters:
                    self._set_meta("last_rejected_reason", letters[-1].reason)
                    self._set_meta("last_rejected_wall", letters[-1].received_at)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def count_ignored_acks(self, batch_ids: int, reason: str) -> None:
        """Count batch ids named by acks that were not trusted (see ``docs/edge.md``)."""
        if batch_ids <= 0:
            return
        with self._lock:
            db = self.db
            db.execute("BEGIN")
            try:
                self._set_meta("acks_ignored", int(self._meta("acks_ignored")) + batch_ids)
                self._set_meta("last_ignored_reason", reason)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def set_meta(self, key: str, value: object) -> None:
        """Store a status value (clock state...) for ``revline edge status``."""
        with self._lock:
            self._set_meta(key, value)

    # --- size cap ---

    def used_bytes(self) -> int:
        """Bytes in use in the database file (free pages excluded)."""
        db = self.db
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * size)

    def enforce_cap(self) -> tuple[int, int]:
        """Evict down to 90 % of the cap: durable rows first, then oldest unsent. Returns counts."""
        if self.max_bytes is None:
            return 0, 0
        with self._lock:
            used = self.used_bytes()
            if used <= self.max_bytes or self._rows == 0:
                return 0, 0
            per_row = used / self._rows
            target = int((used - 0.9 * self.max_bytes) / per_row) + 1
            db = self.db
            db.execute("BEGIN")
            try:
                durable = self._evict_durable(target)
                unsent = self._evict_unsent(target - durable) if durable < target else 0
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._rows -= durable + unsent
        if unsent:
            log.warning("spool full: evicted unsent samples", extra=kv(evicted_unsent=unsent))
        return durable, unsent

    def _evict_durable(self, target: int) -> int:
        db = self.db
        removed = 0
        batches = db.execute(
            "SELECT id, lo, hi FROM batches WHERE state = ? ORDER BY lo", (DURABLE,)
        ).fetchall()
        for batch_id, lo, hi in batches:
            if removed >= target:
                break
            removed += _delete_rows(db, lo, hi)
            db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        if removed:
            self._set_meta("evicted_durable", int(self._meta("evicted_durable")) + removed)
        return removed

    def _evict_unsent(self, target: int) -> int:
        db = self.db
        removed = 0
        while removed < target:
            row = db.execute("SELECT min(seq) FROM samples").fetchone()
            if row[0] is None:
                break
            seq = int(row[0])
            batch = db.execute(
                "SELECT id, lo, hi FROM batches WHERE lo <= ? AND hi >= ?", (seq, seq)
            ).fetchone()
            if batch is not None:
                # A batch goes whole or not at all: a partial one could not be resent identically.
                lo, hi = batch[1], batch[2]
                db.execute("DELETE FROM batches WHERE id = ?", (batch[0],))
                self.dropped_batches.add(batch[0])
            else:
                nxt = db.execute("SELECT min(lo) FROM batches WHERE lo > ?", (seq,)).fetchone()[0]
                lo = seq
                hi = seq + (target - removed) - 1
                if nxt is not None:
                    hi = min(hi, nxt - 1)
                if self._index.evicted(lo, hi):
                    (hold_from,) = db.execute(
                        "SELECT min(seq) FROM samples WHERE boot = ? AND mono IS NOT NULL "
                        "AND seq > ?",
                        (self._boot_key, hi),
                    ).fetchone()
                    self._index.hold(hold_from)
            removed += _delete_rows(db, lo, hi)
        self._set_meta("evicted_unsent", int(self._meta("evicted_unsent")) + removed)
        return removed

    def unbatched(self) -> int:
        """Samples not yet in any batch (upper bound: evicted holes count)."""
        with self._lock:
            return self._index.unbatched


class SpoolReader:
    """A read-only look at a spool file, safe while the service writes it (SQLite read-only URI).

    What ``revline edge status`` and the tests need to know about a spool; no module but this
    one reads its tables. A context manager; :class:`FileNotFoundError` if there is no file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def __enter__(self) -> Self:
        if not self.path.exists():
            raise FileNotFoundError(f"no spool at {self.path}")
        self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        """The read-only connection; a bug to use it outside the context manager."""
        if self._db is None:
            raise RuntimeError("spool reader is not open")
        return self._db

    def _one(self, sql: str, *args: object) -> Any:
        return self.db.execute(sql, args).fetchone()[0]

    def _counter(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def meta(self) -> dict[str, Any]:
        """The status values (counters, last ack, clock state...) by key."""
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def sample_count(self) -> int:
        """Samples in the spool now (evicted ones gone)."""
        return int(self._one("SELECT count(*) FROM samples"))

    def next_seq(self) -> int:
        """The seq the next sample will get: how many were ever spooled."""
        newest = self._one("SELECT max(seq) FROM samples")
        return max(self._counter("next_seq"), 0 if newest is None else newest + 1)

    def samples(self) -> dict[int, Sample]:
        """Every sample in the spool by seq, as the contract sample it is sent as."""
        rows = self.db.execute("SELECT seq, ts, data, boot FROM samples ORDER BY seq")
        return {
            seq: row_to_sample(seq, ts, data, flagged=boot is not None)
            for seq, ts, data, boot in rows
        }

    def batch_states(self) -> dict[int, int]:
        """Every batch's state (:data:`CREATED`, :data:`PUBLISHED`, :data:`DURABLE`) by id."""
        return dict(self.db.execute("SELECT id, state FROM batches ORDER BY id").fetchall())

    def next_batch(self) -> int:
        """The id the next batch will get."""
        newest = self._one("SELECT max(id) FROM batches")
        return max(self._counter("next_batch"), 0 if newest is None else newest + 1)

    def open_batches(self) -> int:
        """Batches not yet durable."""
        return int(self._one("SELECT count(*) FROM batches WHERE state < ?", DURABLE))

    def samples_by_state(self) -> dict[int, int]:
        """Samples in batches, by batch state; unbatched samples are in none."""
        rows = self.db.execute("SELECT state, coalesce(sum(n), 0) FROM batches GROUP BY state")
        return {int(state): int(n) for state, n in rows}

    def oldest_unsent_ts(self) -> int | None:
        """The timestamp (µs) of the oldest sample no PUBACKed batch covers; None if none."""
        cursor = self._one("SELECT min(seq) FROM samples")
        if cursor is None:
            return None
        for lo, hi in self.db.execute(
            "SELECT lo, hi FROM batches WHERE state >= ? ORDER BY lo", (PUBLISHED,)
        ):
            if lo > cursor:
                break
            cursor = max(cursor, hi + 1)
        row = self.db.execute(
            "SELECT ts FROM samples WHERE seq >= ? ORDER BY seq LIMIT 1", (cursor,)
        ).fetchone()
        return None if row is None else int(row[0])

    def published_since(self, wall: float) -> int:
        """Samples of batches first PUBACKed at or after ``wall`` (seconds since the epoch)."""
        return int(self._one("SELECT coalesce(sum(n), 0) FROM batches WHERE sent_at >= ?", wall))

    def dead_letters_kept(self) -> int:
        """Dead letters kept with their raw bytes."""
        try:
            return int(self._one("SELECT count(*) FROM rejected"))
        except sqlite3.OperationalError:  # a spool made before dead letters existed
            return 0

    def dead_letters(self, limit: int = DEAD_LETTER_MAX_ROWS) -> list[DeadLetter]:
        """The dead letters kept, newest first."""
        try:
            rows = self.db.execute(
                "SELECT received_at, topic, reason, detail, payload, size FROM rejected "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        except sqlite3.OperationalError:  # a spool made before dead letters existed
            return []
        return [
            DeadLetter(
                received_at=float(at),
                topic=str(topic),
                reason=str(reason),
                detail=str(detail),
                payload=bytes(payload),
                size=int(size),
            )
            for at, topic, reason, detail, payload, size in rows
        ]


def _trim_dead_letters(db: sqlite3.Connection, max_rows: int, max_bytes: int) -> int:
    """Delete the oldest dead letters beyond ``max_rows`` or ``max_bytes``; returns how many."""
    used = 0
    cutoff: int | None = None
    rows = db.execute(
        "SELECT id, length(payload) FROM rejected ORDER BY id DESC LIMIT ?", (max_rows + 1,)
    )
    for kept, (row_id, size) in enumerate(rows):
        if kept == max_rows or (kept > 0 and used + size > max_bytes):
            cutoff = row_id
            break
        used += size
    if cutoff is None:
        return 0
    return db.execute("DELETE FROM rejected WHERE id <= ?", (cutoff,)).rowcount


def _delete_rows(db: sqlite3.Connection, lo: int, hi: int) -> int:
    return db.execute("DELETE FROM samples WHERE seq BETWEEN ? AND ?", (lo, hi)).rowcount
