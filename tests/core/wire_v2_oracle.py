"""The v2 decoder as it was before its columns were decoded by shape (main at 27a678d),
kept unchanged as the oracle of tests/core/test_wire_v2.py: the decoder must give the same rows
for every valid payload and the same ContractError (reason and detail) for every other one.
Only its decoding is used; nothing in the product imports it.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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


class _Constant:
    """``count`` times ``value``: a column whose bits are none (width 0, order 0)."""

    __slots__ = ("count", "value")

    def __init__(self, value: int, count: int) -> None:
        self.value = value
        self.count = count

    def __iter__(self) -> Iterator[int]:
        return repeat(self.value, self.count)


class _ColumnReader:
    """Walks a raw body's columns: headers, numbers and bits in step (see :class:`_Body`)."""

    __slots__ = ("bit", "body", "head", "num", "stream")

    def __init__(self, body: _Body) -> None:
        self.body = body
        self.stream = int.from_bytes(body.bits, "little")
        self.head = self.num = self.bit = 0

    def column(self, count: int, what: str, *, runs: bool = True) -> Iterable[int]:
        """``count`` values (``count`` >= 1, bounded by the caller), lazily: one list is made
        by the caller, whatever the coding."""
        headers = self.body.headers
        if self.head >= len(headers):
            raise _invalid(f"column {what}: headers end early")
        header = headers[self.head]
        self.head += 1
        order = header & 3
        if order == _RUNS:
            if not runs or header != _RUNS:
                raise _invalid(f"column {what}: runs header {header:#04x} not allowed here")
            return self._runs(count, what)
        if order >= count:
            raise _invalid(f"column {what}: order {order} for {count} values")
        width = header >> 3
        used = order + 1 + (header >> 2 & 1) + (width == _WIDE)
        nums = self.body.nums[self.num : self.num + used]
        if len(nums) < used:
            raise _invalid(f"column {what}: numbers end early")
        self.num += used
        base = nums[order]
        step = nums[order + 1] if header & 4 else 1
        if header & 4 and step < 2:
            raise _invalid(f"column {what}: step {step}")
        if not width and order < 2:
            if not order or not base:
                return _Constant(nums[0], count)
            return range(nums[0], nums[0] + base * count, base)
        k = count - order
        values = (
            self._packed(width, nums[-1], k, step=step, base=base, what=what)
            if width
            else repeat(base, k)
        )
        for head in reversed(nums[:order]):
            values = accumulate(values, initial=head)
        return values

    def _packed(
        self, width: int, last: int, k: int, *, step: int, base: int, what: str
    ) -> Iterable[int]:
        """``base + step * u`` for the ``k`` packed values ``u``; ``last`` is the width when
        the header says it is beyond 30."""
        if width == _WIDE:
            width = last
            if not _WIDE <= width <= _MAX_WIDTH:
                raise _invalid(f"column {what}: width {width}, expected 31-64")
        units = self._unpack(width, k, what)
        if step != 1:
            units = map(mul, units, repeat(step))
        return map(add, units, repeat(base)) if base else units

    def _unpack(self, width: int, k: int, what: str) -> Iterable[int]:
        """``k`` values of ``width`` bits from the stream, least significant first."""
        size = k * width
        if self.bit + size > 8 * len(self.body.bits):
            raise _invalid(f"column {what}: bits end early")
        column = self.stream >> self.bit & ((1 << size) - 1)
        self.bit += size
        mask = (1 << width) - 1
        if k <= _CHUNK:
            return map(mask.__and__, map(column.__rshift__, range(0, size, width)))
        out: list[int] = []
        span = _CHUNK * width
        shifts = range(0, span, width)
        chunk_mask = (1 << span) - 1
        for start in range(0, size, span):
            chunk = column >> start & chunk_mask
            out += map(mask.__and__, map(chunk.__rshift__, shifts))
        del out[k:]  # the last chunk's shifts run past its values: they read zeros
        return out

    def _runs(self, count: int, what: str) -> Iterable[int]:
        if self.num >= len(self.body.nums):
            raise _invalid(f"column {what}: numbers end early")
        r = self.body.nums[self.num]
        self.num += 1
        if not 1 <= r <= count:
            raise _invalid(f"column {what}: {r} runs for {count} values")
        values = list(self.column(r, what, runs=False))
        lengths = list(self.column(r, what, runs=False))
        # Before expanding: a hostile length would otherwise allocate without bound.
        if min(lengths) < 1 or sum(lengths) != count:
            raise _invalid(f"column {what}: run lengths do not add up to {count}")
        return chain.from_iterable(map(repeat, values, lengths))

    def finish(self) -> None:
        """Everything was read, and nothing else is there."""
        body = self.body
        if self.head != len(body.headers) or self.num != len(body.nums):
            raise _invalid("body has headers or numbers behind its columns")
        if (self.bit + 7) // 8 != len(body.bits) or self.stream >> self.bit:
            raise _invalid("body has bits behind its columns")


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


def _check_range(values: list[int], lo: int, hi: int, what: str) -> None:
    if min(values) < lo or max(values) > hi:
        raise _invalid(f"{what}: a value outside {lo}..{hi}")


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


def _measurements(reader: _ColumnReader, body: _Body) -> dict[str, list[Any]]:
    n, present, partial = body.n, body.present, body.partial
    width = (n + 7) // 8
    bitmaps = 0
    columns: dict[str, list[Any]] = {}
    for index, (field, scale) in enumerate(zip(FIELDS, _SCALES, strict=True)):
        if not present >> index & 1:
            continue
        name = field.name
        lo, hi = field.lo, field.hi
        if partial >> index & 1:
            rows = _positions(body.bitmaps[bitmaps : bitmaps + width], n, name)
            bitmaps += width
            floats = list(map(truediv, reader.column(len(rows), name), repeat(scale)))
            column: list[Any] = [None] * n
            deque(map(column.__setitem__, rows, floats), maxlen=0)
        else:
            values = reader.column(n, name)
            if isinstance(values, _Constant):  # one division, one bound check
                floats = [values.value / scale]
                column = floats * n
            else:
                column = floats = list(map(truediv, values, repeat(scale)))
        # On the floats: the bounds are whole numbers and division is monotonic, so this is
        # the integer check at the database's resolution.
        if min(floats) < lo or max(floats) > hi:
            raise _invalid(f"{name}: a value outside {lo}..{hi}")
        columns[name] = column
    return columns


def _column_by_column(body: _Body) -> dict[str, list[Any]]:
    """Every column of any body, one after the other; ContractError for whatever is wrong."""
    n = body.n
    reader = _ColumnReader(body)
    ts = list(reader.column(n, "ts"))
    _check_range(ts, 0, _TS_MAX, "ts")
    seq = list(reader.column(n, "seq"))
    _check_range(seq, 0, _I64_MAX, "seq")
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
    rows = list(
        zip(
            repeat(envelope.vin, n),
            *(columns.get(name) or repeat(None, n) for name in ROW_FIELDS[1:]),
            strict=True,
        )
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
