"""Contract v2: a batch as columns, at exactly the resolution the cold table stores.

v1 sends a MessagePack map per sample with field names and doubles (about 200 B a sample). v2
sends one MessagePack array ``[2, vin, batch, body]`` or ``[2, vin, batch, body, sections]``
(``array_like``). ``body`` is a binary string:

- one codec byte: ``2`` the raw columns follow; ``3`` zstd: a varint dictionary id (``0``
  none, ``1`` the dictionary shipped as ``revline/wire_v2-1.zdict``), a varint raw size (at
  most :data:`MAX_RAW_BYTES`, checked before decompressing) and a magicless zstd frame;
- the raw columns, a MessagePack array (:class:`_Body`, read by msgspec in C): ``n`` (1 to
  ``MAX_BATCH_SAMPLES``), a bit mask of the fields present (bit ``i``: position ``i`` in
  :data:`revline.fields.FIELDS`), a mask of those present in only some samples, one header
  byte per column, the columns' numbers, the partial fields' bitmaps, and one bit stream.

The columns are ``ts``, ``seq``, then each present field in ``FIELDS`` order. A column's header
byte: bits 0-1 ``order``, bit 2 a step follows, bits 3-7 the bit width ``w`` (``31``: the width
is a number, 31 to 64). With ``order`` 0-2 its numbers are ``order`` heads (the first value of
each round of differencing), ``base``, ``step`` (>= 2, if flagged) and the width if beyond 30;
its ``count - order`` residuals of ``order`` rounds of differencing are each ``base + step * u``,
``u`` taking ``w`` bits of the stream, least significant first. ``order`` 3 is runs: its number
is the run count, then the run values and the run lengths follow as two columns (orders 0-2).
A measurement's value is the integer ``round(value * 10 ** db_digits)``, the cold column
itself, so a new entry in ``FIELDS`` needs no codec change and both versions store identical
rows.

``sections`` is a map of optional, sparse elements (``flags``, ``extra``, ``dtc``: lists of
``[sample index, value]`` with v1's types): a new optional element is a new key, not a new
version.

Decoding is strict and bounded: counts and lengths are checked before anything is allocated for
them, a varint is at most 10 bytes, the raw size is declared and bounded before zstd runs (a
bomb stops at it; a frame declaring its own size is refused), every value is checked against
the contract's bounds, and whatever is wrong raises :class:`ContractError` with the v1 reasons.
:func:`decode_rows` goes straight to the database writer's staging rows without a Python object
per sample. See docs/wire.md, "Schema version 2".
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import accumulate, chain, compress, groupby, repeat
from operator import add, floordiv, lshift, mul, ne, sub, truediv
from typing import Annotated, Any, Final, TypeVar

import msgspec
import zstandard

from revline.contract import (
    MAX_BATCH_SAMPLES,
    MAX_PAYLOAD_BYTES,
    Batch,
    ContractError,
    DtcSet,
    Extra,
    Flags,
    Sample,
    Vin,
    decode_batch,
    vin_from_topic,
)
from revline.fields import FIELDS

__all__ = [
    "CODEC_RAW",
    "CODEC_ZSTD",
    "DICTIONARIES",
    "DICTIONARY_ID",
    "MAX_RAW_BYTES",
    "ROW_FIELDS",
    "WIRE_VERSION",
    "AnyBatch",
    "Columns",
    "RowBatch",
    "columns_from_batch",
    "decode_any",
    "decode_any_rows",
    "decode_rows",
    "decode_v2",
    "encode_body",
    "encode_v2",
    "is_v2",
    "load_dictionary",
]

WIRE_VERSION: Final = 2
CODEC_RAW: Final = 2
CODEC_ZSTD: Final = 3
# Codecs 0 and 1 were the draft v2 body (varint columns, DEFLATE) that was never the default:
# refused as invalid, so a stale draft sender is visible in `rejected` and not misread.

DICTIONARY_ID: Final = 1
"""The dictionary the encoder uses. A new dictionary is a new id and a new file; never change
the bytes of one that was shipped (a test pins each file's SHA-256)."""
DICTIONARIES: Final = {
    1: ("wire_v2-1.zdict", "a1199f8d9c61264db1484f149ad2ebd5d070ebcc5c65c2d2b92a48d38cbf992d"),
}
"""Dictionary id -> (package data file, SHA-256 of its bytes). Id 0 is zstd without one."""

MAX_RAW_BYTES: Final = 1024 * 1024
"""Largest raw (decompressed) body: 5000 samples of every field at 64 bits each is ~0.7 MB."""

ZSTD_LEVEL: Final = 19
_MAX_WINDOW: Final = 1 << 20  # MAX_RAW_BYTES: no valid frame needs a window beyond its output

_TS_MAX: Final = 7_258_118_400_000_000  # the v1 bound: 2200-01-01 in µs
_I64_MAX: Final = 2**63 - 1
_MAX_VARINT_BYTES: Final = 10
_MAX_WIDTH: Final = 64
_WIDE: Final = 31  # the width field's escape: the width is in the next byte
_RUNS: Final = 3
_CHUNK: Final = 64  # values unpacked per big integer: shifts stay on small integers
_SCALES: Final = tuple(10**field.db_digits for field in FIELDS)
_BOUNDS: Final = tuple(
    (round(field.lo * 10**field.db_digits), round(field.hi * 10**field.db_digits))
    for field in FIELDS
)
# A MessagePack array header: fixarray, array 16, array 32. v1 is always a map, JSON a '{'.
_ARRAY_FIRST_BYTES: Final = frozenset({*range(0x90, 0xA0), 0xDC, 0xDD})

ROW_FIELDS: Final = ("vin", *Sample.__struct_fields__)
"""The layout of a decoded row: the VIN, then the sample's fields in contract order (the
database writer's staging columns, ``revline.consumer.writer.STAGING_COLUMNS``)."""

SampleIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_BATCH_SAMPLES)]
BatchId = Annotated[int, msgspec.Meta(ge=0, le=_I64_MAX)]


class _Sections(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Optional sparse elements, keyed by name. Add one as a new optional field here (and a
    line in :func:`_sections_of` and :func:`_row_columns`): no new version (docs/wire.md)."""

    flags: Annotated[
        list[tuple[SampleIndex, Flags]], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)
    ] = msgspec.field(default_factory=list)
    extra: Annotated[
        list[tuple[SampleIndex, Extra]], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)
    ] = msgspec.field(default_factory=list)
    dtc: Annotated[
        list[tuple[SampleIndex, DtcSet]], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)
    ] = msgspec.field(default_factory=list)
    """Trouble-code sets (``Sample.dtc``; ``[]`` is a set: cleared)."""


class _Envelope(msgspec.Struct, array_like=True, forbid_unknown_fields=True, omit_defaults=True):
    """``[2, vin, batch, body]`` or ``[2, vin, batch, body, sections]``."""

    v: int
    vin: Vin
    batch: BatchId
    body: Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD_BYTES)]
    sections: _Sections | None = None


_MAX_COLUMNS: Final = 3 * (2 + len(FIELDS))  # each may be runs: itself, values, lengths


class _Body(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The raw columns: a MessagePack array, so that msgspec reads its numbers in C."""

    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_SAMPLES)]
    """Samples."""
    present: Annotated[int, msgspec.Meta(ge=0, lt=2 ** len(FIELDS))]
    """Bit ``i``: field ``i`` of ``FIELDS`` has a column."""
    partial: Annotated[int, msgspec.Meta(ge=0, lt=2 ** len(FIELDS))]
    """Bit ``i``: that column is only in some samples (a bitmap in ``bitmaps`` says which)."""
    headers: Annotated[bytes, msgspec.Meta(max_length=_MAX_COLUMNS)]
    """One byte per column (ts, seq, present fields; runs add two): order, step, width."""
    nums: Annotated[list[int], msgspec.Meta(max_length=5 * _MAX_COLUMNS)]
    """Per column: heads, base, step (if flagged), width (if beyond 30); per runs: its count."""
    bitmaps: Annotated[bytes, msgspec.Meta(max_length=len(FIELDS) * (MAX_BATCH_SAMPLES // 8 + 1))]
    """⌈n/8⌉ bytes per partial field, in ``FIELDS`` order."""
    bits: Annotated[bytes, msgspec.Meta(max_length=MAX_RAW_BYTES)]
    """Every column's packed values, one stream, least significant bit first."""


_T = TypeVar("_T")
_decoder = msgspec.msgpack.Decoder(_Envelope)
_body_decoder = msgspec.msgpack.Decoder(_Body)
_encoder = msgspec.msgpack.Encoder()


class Columns(msgspec.Struct, kw_only=True):
    """A batch as columns, the encoder's input: integers at the database's resolution."""

    ts: list[int]
    seq: list[int]
    values: dict[int, list[int | None]]
    """Per position in :data:`FIELDS`, one ``round(value * 10 ** db_digits)`` or None per
    sample; a field absent from every sample may be left out."""
    flags: list[int]
    extra: list[dict[str, float] | None]
    dtc: list[list[str] | None] = msgspec.field(default_factory=list)
    """Per sample its trouble-code set or None (may be left empty when no sample has one)."""


@dataclass(frozen=True, slots=True)
class RowBatch:
    """A v2 batch decoded straight to staging rows (:data:`ROW_FIELDS`), validated like a v1
    :class:`~revline.contract.Batch`; the consumer stores it without building samples."""

    v: int
    vin: str
    batch: int
    rows: list[tuple[Any, ...]]
    ts: list[int]
    """The ``ts`` column (also in the rows), for the consumer's checks."""
    seq: list[int]
    extras: list[dict[str, float]]
    """The ``extra`` maps present, for the consumer's memory bound."""

    def __len__(self) -> int:
        """Samples in the batch."""
        return len(self.rows)


AnyBatch = Batch | RowBatch
"""What the consumer stores: a v1 batch of samples or a v2 batch of rows."""


# -- the dictionary ------------------------------------------------------------------------------


def load_dictionary(dictionary_id: int) -> zstandard.ZstdCompressionDict:
    """The shipped zstd dictionary ``dictionary_id``, its bytes checked against their SHA-256.

    Raises ``RuntimeError`` for a file that is missing or changed: a broken installation.
    """
    name, digest = DICTIONARIES[dictionary_id]
    try:
        data = resources.files("revline").joinpath(name).read_bytes()
    except OSError as exc:
        raise RuntimeError(f"revline is installed without its data file {name}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise RuntimeError(f"{name} is not the dictionary {dictionary_id} that was shipped")
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)


# Loaded once at import: a broken installation stops at start, not at the first message.
_DICTS: Final = {key: load_dictionary(key) for key in DICTIONARIES}
_local = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _compressor(dictionary_id: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("c", {})
    if dictionary_id not in cache:
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL,
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=0,
            write_checksum=0,
            write_dict_id=0,
        )
        cache[dictionary_id] = zstandard.ZstdCompressor(
            dict_data=_DICTS.get(dictionary_id), compression_params=params
        )
    return cache[dictionary_id]


def _decompressor(dictionary_id: int) -> zstandard.ZstdDecompressor:
    cache: dict[int, zstandard.ZstdDecompressor] = _local.__dict__.setdefault("d", {})
    if dictionary_id not in cache:
        cache[dictionary_id] = zstandard.ZstdDecompressor(
            dict_data=_DICTS.get(dictionary_id),
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            max_window_size=_MAX_WINDOW,  # a frame asking for a bigger window is refused
        )
    return cache[dictionary_id]


# -- encoding ------------------------------------------------------------------------------------


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _num_size(value: int) -> int:
    """Bytes of ``value`` as a MessagePack integer (msgspec picks the shortest form)."""
    if -32 <= value <= 127:
        return 1
    if -128 <= value <= 255:
        return 2
    if -32_768 <= value <= 65_535:
        return 3
    return 5 if -(2**31) <= value < 2**32 else 9


_NUM_MIN: Final = -(2**63)
_NUM_MAX: Final = 2**64 - 1  # what a MessagePack integer holds


class _Plan:
    """One way to code a column (orders 0-2), and its size in bits; packed only if chosen."""

    __slots__ = ("base", "bits", "heads", "nums", "order", "residuals", "step", "width")

    def __init__(self, values: list[int], order: int) -> None:
        heads: list[int] = []
        residuals = values
        for _ in range(order):
            heads.append(residuals[0])
            residuals = list(map(sub, residuals[1:], residuals))
        base = min(residuals)
        top = max(residuals) - base
        step = math.gcd(*map(sub, residuals, repeat(base))) if top else 1
        width = (top // step).bit_length()
        nums = [*heads, base]
        if step > 1:
            nums.append(step)
        if width >= _WIDE:
            nums.append(width)
        self.order, self.heads, self.residuals = order, heads, residuals
        self.base, self.step, self.width, self.nums = base, step, width, nums
        fits = width <= _MAX_WIDTH and min(nums) >= _NUM_MIN and max(nums) <= _NUM_MAX
        self.bits = 8 + 8 * sum(map(_num_size, nums)) + len(residuals) * width if fits else 1 << 80

    def write(self, out: _Out) -> None:
        out.headers.append(self.order | (4 if self.step > 1 else 0) | min(self.width, _WIDE) << 3)
        out.nums += self.nums
        if self.width:
            units = map(sub, self.residuals, repeat(self.base))
            if self.step > 1:
                units = map(floordiv, units, repeat(self.step))
            out.pack(list(units), self.width)


class _Out:
    """The parts of a raw body as they are written: see :class:`_Body`."""

    def __init__(self) -> None:
        self.headers = bytearray()
        self.nums: list[int] = []
        self.bitmaps = bytearray()
        self.stream = 0
        self.bit = 0

    def pack(self, units: list[int], width: int) -> None:
        """Append ``units`` of ``width`` bits to the bit stream, least significant first."""
        shifts = range(0, _CHUNK * width, width)
        for start in range(0, len(units), _CHUNK):
            chunk = units[start : start + _CHUNK]
            # The fields do not overlap, so their sum is their OR: built in C.
            self.stream |= sum(map(lshift, chunk, shifts)) << self.bit
            self.bit += len(chunk) * width


def _best(values: list[int]) -> _Plan:
    best = _Plan(values, 0)
    for order in range(1, min(3, len(values))):
        if not best.width:  # constant, or a steady step: no higher order is shorter
            break
        plan = _Plan(values, order)
        if plan.bits < best.bits:
            best = plan
    return best


def _column(out: _Out, values: list[int]) -> None:
    """Append the shortest coding of ``values``: orders 0-2, or runs when that is shorter."""
    plan = _best(values)
    changes = sum(map(ne, values, values[1:]))
    if (changes + 1) * 4 <= len(values):
        runs = [(value, sum(1 for _ in group)) for value, group in groupby(values)]
        run_values = _best([value for value, _ in runs])
        run_lengths = _best([length for _, length in runs])
        bits = 8 + 8 * _num_size(len(runs)) + run_values.bits + run_lengths.bits
        if bits < plan.bits:
            out.headers.append(_RUNS)
            out.nums.append(len(runs))
            run_values.write(out)
            run_lengths.write(out)
            return
    plan.write(out)


def encode_body(columns: Columns) -> bytes:
    """The raw columns of a batch (what codec ``2`` carries, and zstd compresses)."""
    n = len(columns.ts)
    out = _Out()
    _column(out, columns.ts)
    _column(out, columns.seq)
    present = partial = 0
    for index in sorted(columns.values):
        column = columns.values[index]
        count = n - column.count(None)
        if not count:
            continue
        present |= 1 << index
        if count == n:
            _column(out, column)  # type: ignore[arg-type]  # no None: just counted
            continue
        partial |= 1 << index
        bitmap = bytearray((n + 7) // 8)
        for i, value in enumerate(column):
            if value is not None:
                bitmap[i >> 3] |= 1 << (i & 7)
        out.bitmaps += bitmap
        _column(out, [value for value in column if value is not None])
    body = _Body(
        n=n,
        present=present,
        partial=partial,
        headers=bytes(out.headers),
        nums=out.nums,
        bitmaps=bytes(out.bitmaps),
        bits=out.stream.to_bytes((out.bit + 7) // 8, "little"),
    )
    return _encoder.encode(body)


_EMPTY: Final = _Sections()


def _sections_of(columns: Columns) -> _Sections | None:
    sections = _Sections(
        flags=[(i, flags) for i, flags in enumerate(columns.flags) if flags],
        extra=[(i, extra) for i, extra in enumerate(columns.extra) if extra],
        dtc=[(i, codes) for i, codes in enumerate(columns.dtc) if codes is not None],
    )
    return None if sections == _EMPTY else sections


def encode_v2(
    vin: str,
    batch_id: int,
    columns: Columns,
    *,
    compress: bool = True,
    dictionary: int = DICTIONARY_ID,
) -> bytes:
    """The v2 wire bytes of a batch (deterministic: a resend is the same bytes).

    With ``compress`` the body is zstd-compressed with ``dictionary`` (``0``: none) when that is
    shorter (the smallest batches may not be).
    """
    raw = encode_body(columns)
    body = bytes((CODEC_RAW,)) + raw
    if compress:
        head = bytearray((CODEC_ZSTD,))
        _varint(head, dictionary)
        _varint(head, len(raw))
        packed = bytes(head) + _compressor(dictionary).compress(raw)
        body = min(body, packed, key=len)
    envelope = _Envelope(
        v=WIRE_VERSION, vin=vin, batch=batch_id, body=body, sections=_sections_of(columns)
    )
    return _encoder.encode(envelope)


def columns_from_batch(batch: Batch) -> Columns:
    """The columns of a decoded batch, values rounded to the database's resolution."""
    samples = batch.samples
    return Columns(
        ts=[sample.ts for sample in samples],
        seq=[sample.seq for sample in samples],
        values={
            index: [
                None if (value := getattr(sample, field.name)) is None else round(value * scale)
                for sample in samples
            ]
            for index, (field, scale) in enumerate(zip(FIELDS, _SCALES, strict=True))
        },
        flags=[sample.flags for sample in samples],
        extra=[sample.extra for sample in samples],
        dtc=[sample.dtc for sample in samples],
    )


# -- decoding ------------------------------------------------------------------------------------


def _invalid(detail: str) -> ContractError:
    return ContractError("invalid", f"v2 {detail}")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _invalid("body ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        value = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise _invalid(f"varint longer than {_MAX_VARINT_BYTES} bytes")


# Unpacking, the per-value work of decoding, is done in C: a column's bits are spread into
# byte-aligned slots by a few big-integer operations over the whole column (_spread), then
# struct unpacks them in one call. Below _SPREAD_MIN values, a shift per value is cheaper.
_SPREAD_MIN: Final = 12
_SLOT_CODES: Final = {8: "B", 16: "H", 32: "I", 64: "Q"}
_WIDE_SPREAD: Final = 32  # wider fields are shifted out one by one (64 bits: struct alone)
# Masks are made for 2**tier fields: a few sizes, so a few cached masks serve every count.
_MASK_TIERS: Final = (4, 6, 9, (MAX_BATCH_SAMPLES - 1).bit_length())


# 120 keys at most (30 widths, 4 tiers): ~9 MB if hostile bodies sent every width with over
# 512 values, well under 1 MB for what devices send (a few narrow widths).
@functools.lru_cache(maxsize=128)
def _spread_masks(width: int, slot: int, tier: int) -> tuple[int, ...]:
    """Per level ``j`` of :func:`_spread`, where it finds the fields it moves (those whose
    index has bit ``j`` set): in every block of ``2**(j + 1)`` slots, the upper half of its
    ``2**(j + 1)`` fields, still ``width`` bits apart; made for ``2**tier`` fields."""
    masks = []
    total = slot << tier
    for level in range(tier):
        half = width << level
        mask = ((1 << half) - 1) << half
        span = slot << (level + 1)
        while span < total:
            mask |= mask << span
            span <<= 1
        masks.append(mask)
    return tuple(masks)


def _spread(column: int, count: int, width: int, slot: int) -> int:
    """``count`` packed fields of ``width`` bits moved to one ``slot``-bit slot each: level
    ``j`` (highest first) moves the fields whose index has bit ``j`` set up by
    ``2**j * (slot - width)`` bits, whole column at a time (about 4 log2(count) operations)."""
    levels = (count - 1).bit_length()
    masks = _spread_masks(width, slot, next(tier for tier in _MASK_TIERS if tier >= levels))
    gap = slot - width
    for level in range(levels - 1, -1, -1):
        moving = column & masks[level]
        column = column ^ moving | moving << (gap << level)
    return column


def _shifted(column: int, count: int, width: int) -> list[int]:
    """The fields by a shift each, ``_CHUNK`` at a time (so that each shift is short)."""
    mask, span = (1 << width) - 1, _CHUNK * width
    shifts, chunk_mask = range(0, span, width), (1 << span) - 1
    out: list[int] = []
    for start in range(0, count * width, span):
        chunk = column >> start & chunk_mask
        out += map(mask.__and__, map(chunk.__rshift__, shifts))
    del out[count:]  # the last chunk's shifts run past its values: they read zeros
    return out


def _split(column: int, count: int, width: int) -> Sequence[int]:
    """The ``count`` (at least ``_SPREAD_MIN``) unsigned ``width``-bit fields of ``column``,
    least significant first."""
    if _WIDE_SPREAD < width < _MAX_WIDTH:  # rare: a random seq or ts; masks would be MBs
        return _shifted(column, count, width)
    slot = 8 if width <= 8 else 16 if width <= 16 else 32 if width <= 32 else 64
    if width != slot:
        column = _spread(column, count, width, slot)
    # "<": the wire is little-endian whatever the machine is.
    data = column.to_bytes(count * slot // 8, "little")
    return struct.unpack(f"<{count}{_SLOT_CODES[slot]}", data)


class _ColumnReader:
    """Walks a raw body's columns: headers, numbers and bits in step (see :class:`_Body`).

    A column is decoded by the shape its header names, straight to what the row holds: a
    constant costs one division and one bound check, a ramp its two ends, runs one division
    per run, packed values a few C passes (unpack, step and base, each round of summing,
    division); the bounds are checked on the ends where the shape decides them."""

    __slots__ = ("bit", "body", "head", "num")

    def __init__(self, body: _Body) -> None:
        self.body = body
        self.head = self.num = self.bit = 0

    def _header(self, count: int, what: str, runs: bool) -> tuple[int, int, list[int], int]:
        """The next column's order, width, numbers and step; order 3 (runs) has no more."""
        headers = self.body.headers
        if self.head >= len(headers):
            raise _invalid(f"column {what}: headers end early")
        header = headers[self.head]
        self.head += 1
        order = header & 3
        if order == _RUNS:
            if not runs or header != _RUNS:
                raise _invalid(f"column {what}: runs header {header:#04x} not allowed here")
            return _RUNS, 0, [], 0
        if order >= count:
            raise _invalid(f"column {what}: order {order} for {count} values")
        width = header >> 3
        used = order + 1 + (header >> 2 & 1) + (width == _WIDE)
        nums = self.body.nums[self.num : self.num + used]
        if len(nums) < used:
            raise _invalid(f"column {what}: numbers end early")
        self.num += used
        step = nums[order + 1] if header & 4 else 1
        if header & 4 and step < 2:
            raise _invalid(f"column {what}: step {step}")
        if width == _WIDE:
            width = nums[-1]
            if not _WIDE <= width <= _MAX_WIDTH:
                raise _invalid(f"column {what}: width {width}, expected 31-64")
        return order, width, nums, step

    def _packed(
        self, order: int, width: int, nums: list[int], step: int, *, k: int, what: str
    ) -> list[int]:
        """The values of a column of order 0-2 with ``k`` residuals (``width`` > 0 or order 2)."""
        base = nums[order]
        if k < _SPREAD_MIN:  # a few values: one comprehension beats a C pass per step
            if width:
                column, mask = self._bits(width, k, what), (1 << width) - 1
                values = [base + step * (column >> at & mask) for at in range(0, k * width, width)]
            else:
                values = [base] * k
            for head in reversed(nums[:order]):
                values = list(accumulate(values, initial=head))
            return values
        residuals: Iterable[int]
        if not width:
            residuals = repeat(base, k)
        elif 1 << width <= 2 * k:  # a list of the possible residuals: one lookup per value
            table = list(range(base, base + (step << width), step))
            residuals = map(table.__getitem__, _split(self._bits(width, k, what), k, width))
        else:
            residuals = _split(self._bits(width, k, what), k, width)
            if step != 1:
                residuals = map(mul, residuals, repeat(step))
            if base:
                residuals = map(add, residuals, repeat(base))
        for head in reversed(nums[:order]):
            residuals = accumulate(residuals, initial=head)
        return list(residuals)

    def ints(self, count: int, what: str, *, runs: bool = True) -> list[int]:
        """``count`` integers (``count`` >= 1, bounded by the caller)."""
        order, width, nums, step = self._header(count, what, runs)
        if order == _RUNS:
            values, lengths = self._runs(count, what)
            return list(chain.from_iterable(map(repeat, values, lengths)))
        base = nums[order]
        if not width and order < 2:
            if not order or not base:
                return [nums[0]] * count
            return list(range(nums[0], nums[0] + base * count, base))
        return self._packed(order, width, nums, step, k=count - order, what=what)

    def floats(self, count: int, what: str, scale: int, lo: float, hi: float) -> list[float]:
        """``count`` values divided by ``scale`` (correctly rounded: the floats of v1), each
        checked to be in ``lo..hi`` (on the floats, as v1 checks: division is monotonic, so
        the smallest and largest integers decide, and where the coding bounds the values
        within ``lo..hi`` none is looked at)."""
        order, width, nums, step = self._header(count, what, True)
        if order == _RUNS:
            values, lengths = self._runs(count, what)
            _bound(min(values) / scale, max(values) / scale, lo, hi, what)
            floats = map(truediv, values, repeat(scale))
            return list(chain.from_iterable(map(repeat, floats, lengths)))
        base = nums[order]
        first = nums[0]
        if not width and order < 2:
            if not order or not base:
                value = first / scale
                _bound(value, value, lo, hi, what)
                return [value] * count
            ends = (first / scale, (first + base * (count - 1)) / scale)
            _bound(min(ends), max(ends), lo, hi, what)
            return list(map(truediv, range(first, first + base * count, base), repeat(scale)))
        k = count - order
        top = base + step * ((1 << width) - 1)  # every residual is in base..top
        if not order and width and 1 << width <= 2 * k and k >= _SPREAD_MIN:
            # Fewer possible values than values: divide each possible one once, look up.
            units = _split(self._bits(width, k, what), k, width)
            if base / scale < lo or top / scale > hi:
                low, high = base + step * min(units), base + step * max(units)
                _bound(low / scale, high / scale, lo, hi, what)
            table = list(map(truediv, range(base, top + 1, step), repeat(scale)))
            return list(map(table.__getitem__, units))
        if not order and k < _SPREAD_MIN:  # a few values: one comprehension, straight to floats
            column, mask = self._bits(width, k, what), (1 << width) - 1
            quotients = [
                (base + step * (column >> at & mask)) / scale for at in range(0, k * width, width)
            ]
            if base / scale < lo or top / scale > hi:
                _bound(min(quotients), max(quotients), lo, hi, what)
            return quotients
        values = self._packed(order, width, nums, step, k=k, what=what)
        # Order 0: every value is in base..top. Order 1: value i is the head plus i
        # residuals, so the lines from the head by k * base and k * top bound them all.
        low, high = (base, top) if not order else (first + k * base, first + k * top)
        if order > 1 or min(first, low) / scale < lo or max(first, high) / scale > hi:
            _bound(min(values) / scale, max(values) / scale, lo, hi, what)
        return list(map(truediv, values, repeat(scale)))

    def _bits(self, width: int, k: int, what: str) -> int:
        """``k`` values of ``width`` bits from the stream, as one integer."""
        size = k * width
        bit, bits = self.bit, self.body.bits
        if bit + size > 8 * len(bits):
            raise _invalid(f"column {what}: bits end early")
        self.bit = bit + size
        column = int.from_bytes(bits[bit >> 3 : (bit + size + 7) >> 3], "little")
        return column >> (bit & 7) & ((1 << size) - 1)

    def _runs(self, count: int, what: str) -> tuple[list[int], list[int]]:
        if self.num >= len(self.body.nums):
            raise _invalid(f"column {what}: numbers end early")
        r = self.body.nums[self.num]
        self.num += 1
        if not 1 <= r <= count:
            raise _invalid(f"column {what}: {r} runs for {count} values")
        values = self.ints(r, what, runs=False)
        lengths = self.ints(r, what, runs=False)
        # Before expanding: a hostile length would otherwise allocate without bound.
        if min(lengths) < 1 or sum(lengths) != count:
            raise _invalid(f"column {what}: run lengths do not add up to {count}")
        return values, lengths

    def finish(self) -> None:
        """Everything was read, and nothing else is there."""
        body, bit = self.body, self.bit
        if self.head != len(body.headers) or self.num != len(body.nums):
            raise _invalid("body has headers or numbers behind its columns")
        if (bit + 7) // 8 != len(body.bits) or (bit & 7 and body.bits[-1] >> (bit & 7)):
            raise _invalid("body has bits behind its columns")


def _bound(smallest: float, largest: float, lo: float, hi: float, what: str) -> None:
    if smallest < lo or largest > hi:
        raise _invalid(f"{what}: a value outside {lo}..{hi}")


def _envelope(payload: bytes) -> _Envelope:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("too_large", f"{len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        envelope = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ContractError("invalid", str(exc)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ContractError("undecodable", f"not valid MessagePack: {exc}") from exc
    except Exception as exc:  # a decoder bug must not stop a service either
        detail = f"MessagePack decoder failed: {type(exc).__name__}: {exc}"
        raise ContractError("undecodable", detail) from exc
    if envelope.v != WIRE_VERSION:
        raise ContractError("unsupported_version", f"schema version {envelope.v}, expected 2")
    return envelope


def _raw_body(body: bytes) -> bytes:
    if not body:
        raise _invalid("body is empty")
    reader = _Reader(body)
    codec = reader.byte()
    if codec == CODEC_RAW:
        return body[1:]
    if codec != CODEC_ZSTD:
        raise _invalid(f"codec {codec}, expected 2 (raw) or 3 (zstd)")
    dictionary = reader.varint()
    if dictionary != 0 and dictionary not in DICTIONARIES:
        known = ", ".join(map(str, [0, *DICTIONARIES]))
        raise ContractError(
            "unsupported_version", f"v2 zstd dictionary {dictionary} unknown (known: {known})"
        )
    size = reader.varint()
    if not 1 <= size <= MAX_RAW_BYTES:
        raise ContractError("too_large", f"v2 raw size {size}, limit {MAX_RAW_BYTES}")
    frame = body[reader.pos :]
    context = _decompressor(dictionary)
    # python-zstandard sizes its output by a content size in the frame header, whatever
    # max_output_size says (a 9 KB frame declaring 300 MB was decompressed in full here): v2
    # frames never carry one, so one that does is refused before anything is allocated.
    header = _zstd(zstandard.get_frame_parameters, frame, zstandard.FORMAT_ZSTD1_MAGICLESS)
    if header.content_size != zstandard.CONTENTSIZE_UNKNOWN:
        raise ContractError("undecodable", "v2 zstd frame declares a content size")
    # At most `size` bytes are produced: a bomb fails here, having allocated only that.
    raw = _zstd(context.decompress, frame, max_output_size=size)
    if len(raw) != size:
        raise _invalid(f"zstd body is {len(raw)} bytes, {size} declared")
    # The frame is now known to be bounded: look once more for bytes behind it.
    stream = context.decompressobj()
    _zstd(stream.decompress, frame)
    if not stream.eof or stream.unused_data:
        raise ContractError("undecodable", "v2 zstd body is truncated or has trailing bytes")
    return raw


def _zstd(call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``call(*args, **kwargs)`` of python-zstandard; whatever it raises is ContractError."""
    try:
        return call(*args, **kwargs)
    except zstandard.ZstdError as exc:
        raise ContractError("undecodable", f"v2 body is not valid zstd: {exc}") from exc
    except (MemoryError, ValueError, OverflowError) as exc:  # a decoder's surprise, not ours
        detail = f"v2 zstd decoder failed: {type(exc).__name__}: {exc}"
        raise ContractError("undecodable", detail) from exc


def _positions(bitmap: bytes, n: int, name: str) -> list[int]:
    bits = int.from_bytes(bitmap, "little")
    if bits >> n:
        raise _invalid(f"column {name}: bitmap padding set")
    if not bits:
        raise _invalid(f"column {name}: partial column with no value")
    flags = format(bits, f"0{n}b")[::-1]
    return list(compress(range(n), map("1".__eq__, flags)))


def _sparse_column(pairs: list[tuple[int, Any]], n: int, fill: Any, what: str) -> list[Any]:
    previous = -1
    for i, _ in pairs:
        if i >= n or i <= previous:
            raise _invalid(f"{what} index {i}: out of range or unordered")
        previous = i
    column = [fill] * n
    for i, value in pairs:  # sparse: a few entries at most in what devices send
        column[i] = value
    return column


def _body(raw: bytes) -> _Body:
    try:
        body = _body_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(f"body: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ContractError("undecodable", f"v2 body is not valid MessagePack: {exc}") from exc
    except Exception as exc:  # a decoder bug must not stop a service either
        detail = f"v2 body decoder failed: {type(exc).__name__}: {exc}"
        raise ContractError("undecodable", detail) from exc
    if body.partial & ~body.present:
        raise _invalid(f"partial mask {body.partial:#x} names fields that are not present")
    partial_count = body.partial.bit_count()
    if len(body.bitmaps) != partial_count * ((body.n + 7) // 8):
        raise _invalid(f"{len(body.bitmaps)} bytes of bitmaps for {partial_count} partial fields")
    return body


_MEASUREMENTS: Final = tuple(
    (index, field.name, scale, field.lo, field.hi)
    for index, (field, scale) in enumerate(zip(FIELDS, _SCALES, strict=True))
)


def _measurements(reader: _ColumnReader, body: _Body) -> dict[str, list[Any]]:
    n, present, partial = body.n, body.present, body.partial
    width = (n + 7) // 8
    bitmaps = 0
    columns: dict[str, list[Any]] = {}
    for index, name, scale, lo, hi in _MEASUREMENTS:
        if not present >> index & 1:
            continue
        if partial >> index & 1:
            rows = _positions(body.bitmaps[bitmaps : bitmaps + width], n, name)
            bitmaps += width
            column: list[Any] = [None] * n
            floats = reader.floats(len(rows), name, scale, lo, hi)
            deque(map(column.__setitem__, rows, floats), maxlen=0)
            columns[name] = column
        else:
            columns[name] = reader.floats(n, name, scale, lo, hi)
    return columns


def _identities(reader: _ColumnReader, n: int, what: str, hi: int) -> list[int]:
    headers = reader.body.headers
    # Order 1 without bits (a steady clock, consecutive numbers) is a ramp: its ends decide.
    ramp = reader.head < len(headers) and headers[reader.head] == 1
    values = reader.ints(n, what)
    ends = (values[0], values[-1]) if ramp else (min(values), max(values))
    if min(ends) < 0 or max(ends) > hi:
        raise _invalid(f"{what}: a value outside 0..{hi}")
    return values


def _column_by_column(body: _Body) -> dict[str, list[Any]]:
    """Every column of any body, one after the other; ContractError for whatever is wrong."""
    n = body.n
    reader = _ColumnReader(body)
    ts = _identities(reader, n, "ts", _TS_MAX)
    seq = _identities(reader, n, "seq", _I64_MAX)
    columns = {"ts": ts, "seq": seq, **_measurements(reader, body)}
    reader.finish()
    return columns


def decode_rows(payload: bytes) -> RowBatch:
    """Decode and validate a v2 payload into staging rows; ContractError if it is not one."""
    envelope = _envelope(payload)
    body = _body(_raw_body(envelope.body))
    n = body.n
    columns = _column_by_column(body)
    ts, seq = columns["ts"], columns["seq"]
    sections = envelope.sections or _EMPTY
    columns["flags"] = _sparse_column(sections.flags, n, 0, "flags")
    columns["extra"] = _sparse_column(sections.extra, n, None, "extra")
    columns["dtc"] = _sparse_column(sections.dtc, n, None, "dtc")
    # A field of Sample that no column or section carries is absent: None in every row.
    get, absent = columns.get, [None] * n
    rows = list(
        zip(repeat(envelope.vin, n), *[get(name, absent) for name in ROW_FIELDS[1:]], strict=True)
    )
    return RowBatch(
        v=WIRE_VERSION,
        vin=envelope.vin,
        batch=envelope.batch,
        rows=rows,
        ts=ts,
        seq=seq,
        extras=[extra for _, extra in sections.extra],
    )


def _samples(rows: list[tuple[Any, ...]]) -> Iterator[Sample]:
    names = ROW_FIELDS[1:]
    for row in rows:
        fields = zip(names, row[1:], strict=True)
        yield Sample(**{name: value for name, value in fields if value is not None})


def decode_v2(payload: bytes) -> Batch:
    """Decode and validate a v2 payload into a :class:`Batch` (tools and tests; the consumer
    uses :func:`decode_rows`); ContractError if it is not one."""
    rows = decode_rows(payload)
    return Batch(v=WIRE_VERSION, vin=rows.vin, batch=rows.batch, samples=list(_samples(rows.rows)))


def is_v2(payload: bytes) -> bool:
    """True when the payload is shaped like v2 (a MessagePack array); v1 is a map or JSON."""
    return bool(payload) and payload[0] in _ARRAY_FIRST_BYTES


def _check_topic(vin: str, topic: str | None) -> None:
    if topic is not None and vin_from_topic(topic) != vin:
        raise ContractError("vin_mismatch", f"payload VIN {vin} on topic {topic!r}")


def decode_any(payload: bytes, topic: str | None = None) -> Batch:
    """Decode a v1 (MessagePack or JSON) or v2 batch; check it against its topic if given."""
    if not is_v2(payload):
        return decode_batch(payload, topic)
    batch = decode_v2(payload)
    _check_topic(batch.vin, topic)
    return batch


def decode_any_rows(payload: bytes, topic: str | None = None) -> AnyBatch:
    """What the consumer stores: a v1 :class:`Batch` (MessagePack or JSON) or a v2
    :class:`RowBatch`, checked against its topic if given."""
    if not is_v2(payload):
        return decode_batch(payload, topic)
    batch = decode_rows(payload)
    _check_topic(batch.vin, topic)
    return batch
