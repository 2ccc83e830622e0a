"""How many bytes the consumer holds for messages received and not yet acked: its memory bound.

The broker's Receive Maximum bounds messages in flight, not bytes: 100 messages of 2 MiB are
200 MB raw, and a 2 MiB batch of tiny samples decodes into ~30 MB of Python objects. So every
message is charged against a byte limit twice over its life:

* on arrival (the subscriber's read of the socket), its raw size: ``queued``. While the limit is
  reached the subscriber stops reading the socket, and TCP pushes back on the broker;
* once decoded, its estimated footprint, raw bytes included: ``held``,
  until the service acks it. Decoding waits too while the limit is reached.

A message is always let through when nothing else is held, so one larger than the limit still
passes (alone). Hence at most ``limit`` plus one message's footprint is ever held.

Freed memory must also go back to the system, which glibc's malloc does not do by itself: its
mmap threshold adapts upwards after each freed 2 MiB payload, after which payloads are carved
from heaps that fragment, and freed heap pages stay resident. :func:`tune_allocator` pins the
threshold and :func:`return_memory` trims. Measured with the flood of
tests/test_consumer_memory.py (baseline 35 MiB): without either, peak 115 MiB and still above
76 MiB 30 s later; trimming only, peak 118-126, after 55-79; both, peak 105-135, after 63-75.
The rest is CPython's small-object arenas, reused by the next flood rather than accumulated.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

from revline.contract import NUMERIC_FIELDS
from revline.wire_v2 import ROW_FIELDS, AnyBatch, RowBatch

__all__ = ["ByteBudget", "footprint", "return_memory", "tune_allocator"]

# Upper bounds of CPython 3.11 (64-bit) object sizes as msgspec builds them, checked against
# tracemalloc by tests/test_consumer_units.py on hostile shapes.
_ITEM = 1_024  # Inbound, Item, Rejected and a detail line
_SAMPLE = 256  # the Sample struct (176), its list slot, ts and seq as ints
_FLOAT = 24
_DICT = 240  # an `extra` dict's own header and first slots
_ENTRY = 144  # an `extra` entry: its slot, the float, and the key's str header
_MIN_FIELD_BYTES = 5  # the cheapest typed field on the wire: "rpm" (4 bytes) and a fixint
# A v2 row: the tuple (56 + 8 per field) and its list slot, ts and seq as ints with their column
# slots. A v2 value costs no wire bytes of its own (runs, width 0), so its floats count in full.
_ROW = 64 + 8 * len(ROW_FIELDS) + 2 * 40


def footprint(raw: int, batch: AnyBatch | None) -> int:
    """An upper bound of the bytes held for a message of ``raw`` bytes that decoded to ``batch``.

    The payload is kept (for the dead letter) and so is the decoded batch. A key's characters
    take up to 4 bytes each (one emoji makes the whole str UCS-4); typed fields are bounded by
    both the sample count and the raw size.
    """
    if batch is None:
        return raw + _ITEM
    if isinstance(batch, RowBatch):
        extras = batch.extras
        chars = sum(sum(map(len, extra)) for extra in extras)
        return (
            raw
            + _ITEM
            + len(batch) * (_ROW + len(NUMERIC_FIELDS) * _FLOAT)
            + len(extras) * _DICT
            + sum(map(len, extras)) * _ENTRY
            + chars * 4
        )
    samples = batch.samples
    dicts = entries = chars = 0
    for sample in samples:
        extra = sample.extra
        if extra is not None:
            dicts += 1
            entries += len(extra)
            chars += sum(map(len, extra))
    typed = min(len(samples) * len(NUMERIC_FIELDS), raw // _MIN_FIELD_BYTES)
    return (
        raw
        + _ITEM
        + len(samples) * _SAMPLE
        + typed * _FLOAT
        + dicts * _DICT
        + entries * _ENTRY
        + chars * 4
    )


class ByteBudget:
    """Bytes ``queued`` (received, not decoded) and ``held`` (decoded, not acked) against a limit.

    Not thread-safe, and needs not be: the subscriber reads the socket on the consumer's event
    loop, which does everything else too (a lock per call was ~11 % of the consumer's CPU with
    1-sample messages).
    """

    __slots__ = ("_held", "_high_water", "_queued", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._queued = 0
        self._held = 0
        self._high_water = 0

    @property
    def queued(self) -> int:
        """Raw bytes received and not yet decoded."""
        return self._queued

    @property
    def held(self) -> int:
        """Estimated bytes of decoded messages not yet acked."""
        return self._held

    @property
    def in_flight(self) -> int:
        """Everything held for messages not yet acked."""
        return self._queued + self._held

    def high_water(self, *, reset: bool = False) -> int:
        """The most ever held at once (since the last reset)."""
        value = self._high_water
        if reset:
            self._high_water = self._queued + self._held
        return value

    def admit(self, size: int) -> bool:
        """Count ``size`` raw bytes in if they fit under the limit (or nothing else is held);
        False, with nothing counted, if not: the caller stops reading until :meth:`release`."""
        total = self._queued + self._held
        if total and total + size > self.limit:
            return False
        self._queued += size
        return True

    def decoded(self, raw: int, held: int) -> None:
        """A queued message of ``raw`` bytes was decoded and is now held as ``held`` bytes."""
        self._queued -= raw
        self._held += held
        total = self._queued + self._held
        self._high_water = max(self._high_water, total)

    def may_decode(self) -> bool:
        """Whether to decode the next message now: the limit is not reached, or nothing decoded
        is held (so that what waits in the queue alone can never stall the pipeline)."""
        return self._queued + self._held <= self.limit or self._held == 0

    def release(self, held: int) -> None:
        """Decoded messages holding ``held`` bytes were acked (or given up): count them out."""
        self._held -= held


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # glibc only: musl and others have neither call, and need neither.
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1024 * 1024


def tune_allocator() -> bool:
    """Serve allocations of 1 MiB and more (payloads) with their own mmap, unmapped on free,
    instead of letting glibc raise its threshold and keep them in heaps. False if not glibc."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def return_memory() -> None:
    """Give free heap pages back to the system (glibc's ``malloc_trim``); a no-op elsewhere."""
    if _LIBC is not None:
        with contextlib.suppress(OSError):
            _LIBC.malloc_trim(0)
