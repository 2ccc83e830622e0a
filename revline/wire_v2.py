"""Contract v2: a batch as columns, at exactly the resolution the cold table stores.

v1 sends a MessagePack map per sample with field names and doubles (about 200 B a sample). v2
sends one MessagePack array ``[2, vin, batch, body, flags, extra, dtc]`` (``array_like``; the
trailing elements may be left out when empty), where
``body`` is a binary string of unsigned LEB128 varints:

- one codec byte: ``0`` the rest is raw, ``1`` the rest is raw DEFLATE (``zlib``, no header);
- ``n``, the number of samples (1 to ``MAX_BATCH_SAMPLES``);
- the ``ts`` column, then the ``seq`` column, then ``k`` (columns that follow) and ``k`` field
  columns, each ``index`` (position in :data:`revline.fields.FIELDS`), a presence byte (``0``
  every sample has it, ``1`` a bitmap of ``ceil(n / 8)`` bytes follows, bit ``i % 8`` of byte
  ``i // 8`` for sample ``i``) and then one value per present sample.

A column is ``order`` (0, 1 or 2, what the encoder found shortest) then its values as zigzag
varints after ``order`` rounds of differencing (``[x0, x1 - x0, ...]``). A measurement's value
is the integer ``round(value * 10 ** db_digits)``, the cold column itself, so a new entry in
``FIELDS`` needs no codec change and both versions store identical rows. ``flags``, ``extra``
and ``dtc`` (trouble-code sets) are rare: sparse lists of ``[sample index, value]`` in the
envelope, validated by msgspec with the v1 types.

Decoding is strict and bounded: counts and lengths are checked before anything is allocated for
them, a varint is at most 10 bytes, the inflated body at most ``MAX_PAYLOAD_BYTES``, every value
is checked against the contract's bounds, and whatever is wrong raises :class:`ContractError`
with the v1 reasons. See docs/wire.md, "Schema version 2".
"""

from __future__ import annotations

import zlib
from itertools import pairwise
from typing import Annotated, Final, TypeVar

import msgspec

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
    "CODEC_DEFLATE",
    "CODEC_RAW",
    "WIRE_VERSION",
    "Columns",
    "columns_from_batch",
    "decode_any",
    "decode_v2",
    "encode_v2",
    "is_v2",
]

WIRE_VERSION: Final = 2
CODEC_RAW: Final = 0
CODEC_DEFLATE: Final = 1

_TS_MAX: Final = 7_258_118_400_000_000  # the v1 bound: 2200-01-01 in µs
_I64_MAX: Final = 2**63 - 1
_MAX_VARINT_BYTES: Final = 10
_SCALES: Final = tuple(10**field.db_digits for field in FIELDS)
_BOUNDS: Final = tuple(
    (round(field.lo * 10**field.db_digits), round(field.hi * 10**field.db_digits))
    for field in FIELDS
)
# A MessagePack array header: fixarray, array 16, array 32. v1 is always a map, JSON a '{'.
_ARRAY_FIRST_BYTES: Final = frozenset({*range(0x90, 0xA0), 0xDC, 0xDD})

SampleIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_BATCH_SAMPLES)]
BatchId = Annotated[int, msgspec.Meta(ge=0, le=_I64_MAX)]


class _Envelope(msgspec.Struct, array_like=True, forbid_unknown_fields=True, omit_defaults=True):
    v: int
    vin: Vin
    batch: BatchId
    body: Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD_BYTES)]
    flags: Annotated[
        list[tuple[SampleIndex, Flags]], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)
    ] = msgspec.field(default_factory=list)
    extra: Annotated[
        list[tuple[SampleIndex, Extra]], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)
    ] = msgspec.field(default_factory=list)
    # Trouble-code sets (Sample.dtc), sparse like extra; an optional trailing element, so a v2
    # batch without one is the same bytes as before it existed.
    dtc: Annotated[
        list[tuple[SampleIndex, DtcSet]], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)
    ] = msgspec.field(default_factory=list)


_decoder = msgspec.msgpack.Decoder(_Envelope)
_T = TypeVar("_T")
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


# -- encoding ------------------------------------------------------------------------------------


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _diff(values: list[int]) -> list[int]:
    return values[:1] + [b - a for a, b in pairwise(values)]


def _column(out: bytearray, values: list[int]) -> None:
    """Append the shortest of orders 0, 1, 2 of ``values``."""
    best: bytearray | None = None
    current = values
    for order in range(3):
        candidate = bytearray((order,))
        for value in current:
            _varint(candidate, value << 1 if value >= 0 else ((-value) << 1) - 1)
        if best is None or len(candidate) < len(best):
            best = candidate
        current = _diff(current)
    assert best is not None
    out += best


def encode_v2(vin: str, batch_id: int, columns: Columns, *, compress: bool = True) -> bytes:
    """The v2 wire bytes of a batch (deterministic: a resend is the same bytes).

    With ``compress`` the body is DEFLATEd when that is shorter (small batches may not be).
    """
    n = len(columns.ts)
    body = bytearray()
    _varint(body, n)
    _column(body, columns.ts)
    _column(body, columns.seq)
    present = [(index, column) for index, column in sorted(columns.values.items())
               if any(value is not None for value in column)]  # fmt: skip
    _varint(body, len(present))
    for index, column in present:
        _varint(body, index)
        if all(value is not None for value in column):
            body.append(0)
            _column(body, column)  # type: ignore[arg-type]  # no None, just checked
            continue
        body.append(1)
        bitmap = bytearray((n + 7) // 8)
        for i, value in enumerate(column):
            if value is not None:
                bitmap[i >> 3] |= 1 << (i & 7)
        body += bitmap
        _column(body, [value for value in column if value is not None])
    wire = bytes((CODEC_RAW,)) + body
    if compress:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        deflated = bytes((CODEC_DEFLATE,)) + packer.compress(bytes(body)) + packer.flush()
        wire = min(wire, deflated, key=len)
    envelope = _Envelope(
        v=WIRE_VERSION,
        vin=vin,
        batch=batch_id,
        body=wire,
        flags=[(i, flags) for i, flags in enumerate(columns.flags) if flags],
        extra=[(i, extra) for i, extra in enumerate(columns.extra) if extra],
        dtc=[(i, codes) for i, codes in enumerate(columns.dtc) if codes is not None],
    )
    # msgspec writes every element of an array_like struct; the decoder takes a missing trailing
    # one as its default. So a batch without trouble codes stays the bytes it was before them.
    elements = msgspec.structs.astuple(envelope)
    return _encoder.encode(elements if envelope.dtc else elements[:-1])


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


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ContractError("invalid", "v2 body ends early")
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
        raise ContractError("invalid", f"v2 varint longer than {_MAX_VARINT_BYTES} bytes")

    def take(self, length: int) -> bytes:
        if self.pos + length > len(self.data):
            raise ContractError("invalid", "v2 body ends early")
        chunk = self.data[self.pos : self.pos + length]
        self.pos += length
        return chunk

    def column(self, count: int, what: str) -> list[int]:
        order = self.byte()
        if order > 2:
            raise ContractError("invalid", f"v2 column {what}: order {order}, expected 0-2")
        if count > len(self.data) - self.pos:  # every value takes at least one byte
            raise ContractError("invalid", f"v2 column {what}: {count} values, body too short")
        values = []
        for _ in range(count):
            z = self.varint()
            values.append((z >> 1) ^ -(z & 1))
        for _ in range(order):
            total = 0
            for i, value in enumerate(values):
                total += value
                values[i] = total
        return values


def _inflate(body: bytes) -> bytes:
    if not body:
        raise ContractError("invalid", "v2 body is empty")
    codec, rest = body[0], body[1:]
    if codec == CODEC_RAW:
        return rest
    if codec != CODEC_DEFLATE:
        raise ContractError("invalid", f"v2 codec {codec}, expected 0 (raw) or 1 (deflate)")
    inflater = zlib.decompressobj(-15)
    try:
        data = inflater.decompress(rest, MAX_PAYLOAD_BYTES)
    except zlib.error as exc:
        raise ContractError("undecodable", f"v2 body is not valid DEFLATE: {exc}") from exc
    if inflater.unconsumed_tail:
        raise ContractError("too_large", f"v2 body inflates beyond {MAX_PAYLOAD_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ContractError("undecodable", "v2 DEFLATE body is truncated or has trailing bytes")
    return data


def _check_range(values: list[int], lo: int, hi: int, what: str) -> None:
    if values and (min(values) < lo or max(values) > hi):
        raise ContractError("invalid", f"v2 {what}: a value outside {lo}..{hi}")


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


def _present_rows(reader: _Reader, n: int, name: str) -> range | list[int]:
    presence = reader.byte()
    if presence == 0:
        return range(n)
    if presence != 1:
        raise ContractError("invalid", f"v2 column {name}: presence {presence}, expected 0 or 1")
    bitmap = reader.take((n + 7) // 8)
    if n % 8 and bitmap[-1] >> (n % 8):
        raise ContractError("invalid", f"v2 column {name}: bitmap padding set")
    return [i for i in range(n) if bitmap[i >> 3] >> (i & 7) & 1]


def _measurements(reader: _Reader, n: int) -> list[dict[str, float]]:
    fields: list[dict[str, float]] = [{} for _ in range(n)]
    k = reader.varint()
    if k > len(FIELDS):
        raise ContractError("invalid", f"v2 batch of {k} columns, {len(FIELDS)} fields known")
    seen: set[int] = set()
    for _ in range(k):
        index = reader.varint()
        if index >= len(FIELDS) or index in seen:
            raise ContractError("invalid", f"v2 column for field {index}: unknown or repeated")
        seen.add(index)
        name, scale = FIELDS[index].name, _SCALES[index]
        rows = _present_rows(reader, n, name)
        values = reader.column(len(rows), name)
        _check_range(values, *_BOUNDS[index], name)
        for i, value in zip(rows, values, strict=True):
            fields[i][name] = value / scale
    return fields


def _sparse(pairs: list[tuple[int, _T]], n: int, what: str) -> dict[int, _T]:
    previous = -1
    for i, _ in pairs:
        if i >= n or i <= previous:
            raise ContractError("invalid", f"v2 {what} index {i}: out of range or unordered")
        previous = i
    return dict(pairs)


def decode_v2(payload: bytes) -> Batch:
    """Decode and validate a v2 payload into a :class:`Batch`; ContractError if it is not one."""
    envelope = _envelope(payload)
    reader = _Reader(_inflate(envelope.body))
    n = reader.varint()
    if not 1 <= n <= MAX_BATCH_SAMPLES:
        raise ContractError("invalid", f"v2 batch of {n} samples, expected 1..{MAX_BATCH_SAMPLES}")
    ts = reader.column(n, "ts")
    _check_range(ts, 0, _TS_MAX, "ts")
    seq = reader.column(n, "seq")
    _check_range(seq, 0, _I64_MAX, "seq")
    fields = _measurements(reader, n)
    if reader.pos != len(reader.data):
        raise ContractError("invalid", f"v2 body has {len(reader.data) - reader.pos} bytes behind")
    flags = _sparse(envelope.flags, n, "flags")
    extras = _sparse(envelope.extra, n, "extra")
    dtcs = _sparse(envelope.dtc, n, "dtc")
    samples = [
        Sample(ts=ts[i], seq=seq[i], flags=flags.get(i, 0), extra=extras.get(i), dtc=dtcs.get(i),
               **fields[i])
        for i in range(n)
    ]
    return Batch(v=WIRE_VERSION, vin=envelope.vin, batch=envelope.batch, samples=samples)


def is_v2(payload: bytes) -> bool:
    """True when the payload is shaped like v2 (a MessagePack array); v1 is a map or JSON."""
    return bool(payload) and payload[0] in _ARRAY_FIRST_BYTES


def decode_any(payload: bytes, topic: str | None = None) -> Batch:
    """Decode a v1 (MessagePack or JSON) or v2 batch; check it against its topic if given."""
    if not is_v2(payload):
        return decode_batch(payload, topic)
    batch = decode_v2(payload)
    if topic is not None and vin_from_topic(topic) != batch.vin:
        raise ContractError("vin_mismatch", f"payload VIN {batch.vin} on topic {topic!r}")
    return batch
