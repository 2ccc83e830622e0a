"""Contract v2 (columns at the database's resolution): round trips, sizes and hostile bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revline.bench.wire import train_dictionary
from revline.contract import MAX_BATCH_SAMPLES, Batch, ContractError, Sample, encode
from revline.edge.sim import simulate_samples
from revline.edge.spool import SpoolBatch, batch_columns, encode_batch, pack_values
from revline.fields import FIELDS
from revline.wire_v2 import (
    CODEC_RAW,
    CODEC_ZSTD,
    DICTIONARIES,
    MAX_RAW_BYTES,
    Columns,
    RowBatch,
    _split,
    columns_from_batch,
    decode_any,
    decode_rows,
    decode_v2,
    encode_body,
    encode_v2,
    load_dictionary,
)
from tests.fixtures import wire_v2_oracle as oracle

VIN = "1HGCM82633A004352"
T0 = 1_750_000_000_000_000
_TS_MAX = 7_258_118_400_000_000
_BOUNDS = [(round(f.lo * 10**f.db_digits), round(f.hi * 10**f.db_digits)) for f in FIELDS]


def _drive(n: int, seed: int = 3) -> Batch:
    return Batch(v=1, vin=VIN, batch=9, samples=list(simulate_samples(seed, T0, n, 10.0)))


def _stored(batch: Batch) -> list[tuple[object, ...]]:
    """What the cold table would hold: identity, every field at db resolution, extra, flags."""
    columns = columns_from_batch(batch)
    return [
        (
            columns.ts[i],
            columns.seq[i],
            *(columns.values[k][i] for k in range(len(FIELDS))),
            columns.extra[i],
            columns.flags[i],
        )
        for i in range(len(batch.samples))
    ]


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for value in values:
        rest = value
        while rest > 0x7F:
            out.append((rest & 0x7F) | 0x80)
            rest >>= 7
        out.append(rest)
    return bytes(out)


def _zstd_body(raw: bytes, *, declared: int | None = None, dictionary: int = 0) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=0
    )
    frame = zstandard.ZstdCompressor(compression_params=params).compress(raw)
    size = len(raw) if declared is None else declared
    return bytes((CODEC_ZSTD,)) + _varints([dictionary, size]) + frame


def _payload(body: bytes) -> bytes:
    return msgspec.msgpack.encode([2, VIN, 1, body])


def test_a_simulated_drive_decodes_to_the_same_stored_values_as_v1() -> None:
    """Every field of a drive, GPS included, survives v2 exactly at the database's resolution."""
    batch = _drive(300)
    assert all(getattr(batch.samples[-1], field.name) is not None for field in FIELDS[:14])
    for compress in (False, True):
        decoded = decode_v2(encode_v2(VIN, 9, columns_from_batch(batch), compress=compress))
        assert (decoded.vin, decoded.batch) == (VIN, 9)
        assert _stored(decoded) == _stored(batch)


def test_v2_is_at_least_twenty_times_smaller_than_v1_in_batches_of_fifty() -> None:
    """A 5-s batch at 10 Hz is a twentieth of v1's bytes or less."""
    batch = _drive(50)
    v2 = encode_v2(VIN, 9, columns_from_batch(batch))
    assert len(v2) * 20 <= len(encode(batch))


def test_the_shipped_dictionary_is_pinned_and_used() -> None:
    """Each dictionary file matches the SHA-256 its id was shipped with, and it compresses."""
    for dictionary_id, (name, digest) in DICTIONARIES.items():
        data = (Path(__file__).parents[2] / "revline" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
        assert load_dictionary(dictionary_id).as_bytes() == data
    columns = columns_from_batch(_drive(10))
    with_dictionary = encode_v2(VIN, 9, columns)
    assert len(with_dictionary) < len(encode_v2(VIN, 9, columns, compress=False))
    body = msgspec.msgpack.decode(with_dictionary)[3]
    assert body[:2] == bytes((CODEC_ZSTD, 1))


def test_the_spool_encodes_v2_from_its_integers_and_resends_the_same_bytes() -> None:
    """The edge's v2 bytes come from spool rows without floats and equal the samples' columns."""
    samples = list(simulate_samples(5, T0, 40, 10.0))
    rows: list[tuple[int, int, bytes, int | None]] = [
        (
            s.seq,
            s.ts,
            pack_values({f.name: v for f in FIELDS if (v := getattr(s, f.name)) is not None}),
            None,
        )
        for s in samples
    ]
    spool_batch = SpoolBatch(id=4, rows=rows)
    first = encode_batch(VIN, spool_batch, 2)
    assert first == encode_batch(VIN, spool_batch, 2)
    from_samples = columns_from_batch(Batch(v=1, vin=VIN, batch=4, samples=samples))
    assert encode_v2(VIN, 4, batch_columns(spool_batch)) == encode_v2(VIN, 4, from_samples) == first
    assert _stored(decode_any(first, f"telemetry/{VIN}")) == _stored(decode_any(
        encode_batch(VIN, spool_batch, 1)))  # fmt: skip


def test_v1_and_json_still_decode_through_the_same_entry() -> None:
    """decode_any reads v1 MessagePack and JSON as before."""
    batch = _drive(3)
    assert decode_any(encode(batch)) == batch
    assert decode_any(msgspec.json.encode(batch)) == batch


def test_a_v2_batch_on_another_vehicles_topic_is_a_vin_mismatch() -> None:
    """The topic check applies to v2 as to v1."""
    payload = encode_v2(VIN, 1, columns_from_batch(_drive(2)))
    with pytest.raises(ContractError) as info:
        decode_any(payload, "telemetry/1HGCM82633A004353")
    assert info.value.reason == "vin_mismatch"


@st.composite
def _column(draw: st.DrawFn, n: int, lo: int, hi: int) -> list[int]:
    """A column of ``n`` values in ``lo..hi``, shaped like what devices send or not at all:
    random, constant, runs, linear ramps, or smooth with a little noise."""
    shape = draw(st.sampled_from(["random", "constant", "runs", "ramp", "smooth"]))
    if shape == "random":
        return draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    start = draw(st.integers(lo, hi))
    if shape == "constant":
        return [start] * n
    if shape == "runs":
        values = draw(st.lists(st.integers(lo, hi), min_size=1, max_size=4))
        return [values[i * len(values) // n] for i in range(n)]
    step = draw(st.integers(-1000, 1000))
    noise = (
        draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        if shape == "smooth"
        else ([0] * n)
    )
    return [min(hi, max(lo, start + i * step + e)) for i, e in enumerate(noise)]


@st.composite
def columns(draw: st.DrawFn) -> Columns:
    """Random valid columns at the cold table's resolution: any subset of fields, each in every
    sample or only some, flags and extra here and there, identities up to their bounds."""
    n = draw(st.integers(1, 60))
    ts = draw(_column(n, 0, _TS_MAX))
    seq = draw(_column(n, 0, 2**63 - 1))
    values: dict[int, list[int | None]] = {}
    gaps_allowed = draw(st.booleans())  # half the batches have every field in every sample
    for index in draw(st.sets(st.integers(0, len(FIELDS) - 1))):
        column: list[int | None] = list(draw(_column(n, *_BOUNDS[index])))
        if gaps_allowed and draw(st.booleans()):
            gaps = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            column = [None if gap else value for gap, value in zip(gaps, column, strict=True)]
        values[index] = column
    return Columns(
        ts=ts,
        seq=seq,
        values=values,
        flags=draw(st.lists(st.sampled_from([0, 0, 0, 1, 2**31 - 1]), min_size=n, max_size=n)),
        extra=draw(
            st.lists(
                st.one_of(st.none(), st.none(), st.just({"TIMING_ADVANCE": -12.5})),
                min_size=n,
                max_size=n,
            )
        ),
    )


def _canonical(columns: Columns) -> tuple[object, ...]:
    values = {k: v for k, v in columns.values.items() if any(x is not None for x in v)}
    n = len(columns.ts)
    full = [values.get(k, [None] * n) for k in range(len(FIELDS))]
    return (columns.ts, columns.seq, full, columns.flags, columns.extra)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=columns(), compress=st.booleans(), batch_id=st.integers(0, 2**63 - 1))
def test_any_valid_batch_round_trips_exactly_at_the_cold_resolution(
    original: Columns, compress: bool, batch_id: int
) -> None:
    """Whatever integers a device may send come back exactly, in rows and in samples."""
    payload = encode_v2(VIN, batch_id, original, compress=compress)
    batch = decode_v2(payload)
    assert batch.batch == batch_id
    assert _canonical(columns_from_batch(batch)) == _canonical(original)
    rows = decode_rows(payload)
    assert [row[1:3] for row in rows.rows] == list(zip(original.ts, original.seq, strict=True))
    assert (rows.ts, rows.seq) == (original.ts, original.seq)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.builds(_drive, st.integers(1, 120), st.integers(0, 50)))
def test_a_drive_decoded_to_rows_equals_the_v1_samples_rows(batch: Batch) -> None:
    """The rows decoded from v2 are the staging rows of the same drive sent as v1: same floats."""
    payload = encode_v2(VIN, 9, columns_from_batch(batch))
    astuple = msgspec.structs.astuple
    assert decode_rows(payload).rows == [(VIN, *astuple(s)) for s in batch.samples]


def _hostile_bodies() -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=200)
    varints = st.lists(st.integers(0, 2**70), max_size=40).map(_varints)
    return st.one_of(
        raw.map(lambda b: bytes((CODEC_RAW,)) + b),
        raw.map(lambda b: bytes((CODEC_ZSTD,)) + b),
        varints.map(lambda b: bytes((CODEC_RAW,)) + b),
        raw.map(lambda b: _zstd_body(bytes((0x01,)) + b)),
        varints.map(_zstd_body),
        st.builds(_zstd_body, raw, declared=st.integers(0, 2**40), dictionary=st.integers(0, 3)),
    )


def _valid_body(batch: Batch) -> bytes:
    return bytes((CODEC_RAW,)) + encode_body(columns_from_batch(batch))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=st.sampled_from(["body", "mutated", "truncated", "zstd", "envelope", "sections"]),
)
def test_hostile_v2_payloads_raise_only_contract_errors(data: st.DataObject, shape: str) -> None:
    """Corrupt bodies, bombs, huge counts, bad envelopes and sections: ContractError only."""
    if shape == "body":
        payload = _payload(data.draw(_hostile_bodies()))
    elif shape in ("mutated", "truncated", "zstd"):
        batch = _drive(data.draw(st.integers(1, 30)))
        if shape == "zstd":  # the shipped dictionary's frames, corrupted
            packed = encode_v2(VIN, 1, columns_from_batch(batch))
            body = bytearray(msgspec.msgpack.decode(packed)[3])
        else:
            body = bytearray(_valid_body(batch))
        if shape == "truncated" or data.draw(st.booleans()):
            body = body[: data.draw(st.integers(0, len(body) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 4))):
                body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        payload = _payload(bytes(body))
    elif shape == "envelope":
        item = st.one_of(
            st.integers(-(2**63), 2**64 - 1),
            st.text(max_size=20),
            st.binary(max_size=20),
            st.none(),
            st.dictionaries(st.text(max_size=6), st.integers(-(2**63), 2**63), max_size=3),
        )
        payload = msgspec.msgpack.encode(data.draw(st.lists(item, max_size=8)))
    else:
        index = st.integers(-5, MAX_BATCH_SAMPLES + 5)
        flags = data.draw(st.lists(st.tuples(index, st.integers(-1, 2**32)), max_size=5))
        extra = data.draw(st.lists(st.tuples(index, st.just({"A": 1.0})), max_size=5))
        other = data.draw(st.dictionaries(st.sampled_from(["dtc", "x", ""]), st.integers(0, 9)))
        sections = {"flags": flags, "extra": extra, **other}
        payload = msgspec.msgpack.encode([2, VIN, 1, _valid_body(_drive(3)), sections])
    reasons = {"invalid", "undecodable", "too_large", "unsupported_version"}
    try:
        batch = decode_any(payload)
    except ContractError as exc:
        reason = exc.reason
    else:
        reason = "decoded"
        assert 1 <= len(batch.samples) <= MAX_BATCH_SAMPLES
    assert reason in {*reasons, "decoded"}


def _raw(n: int, headers: bytes, nums: list[int], bits: bytes = b"") -> bytes:
    """A raw body by hand: n samples, no field columns."""
    return bytes((CODEC_RAW,)) + msgspec.msgpack.encode([n, 0, 0, headers, nums, b"", bits])


def test_a_count_beyond_the_limit_is_refused_before_allocation() -> None:
    """A body claiming a billion samples is refused at once."""
    with pytest.raises(ContractError, match="5000"):
        decode_v2(_payload(_raw(10**9, b"", [])))


def test_runs_claiming_more_values_than_the_column_holds_are_refused_before_expanding() -> None:
    """A run of 2**61 values is refused from its lengths, not by trying to build it."""
    # ts as runs: 1 run; its value column constant 0, its length column constant 2**61.
    with pytest.raises(ContractError, match="run lengths"):
        decode_v2(_payload(_raw(3, b"\x03\x00\x00", [1, 0, 2**61])))


def test_a_column_reading_past_its_bits_is_refused() -> None:
    """A width and count that need more bits than the body holds are refused, not padded."""
    with pytest.raises(ContractError, match="bits end early"):
        decode_v2(_payload(_raw(5000, bytes((_width(60),)), [0, 60], b"\xff")))


def _width(width: int) -> int:
    return min(width, 31) << 3


def test_a_zstd_bomb_is_refused_without_decompressing_past_its_declared_size() -> None:
    """A frame that inflates to 100 MB, declared small or declared huge, or a 300 MB frame
    that says so in its header, is refused cheaply."""
    bomb = _zstd_body(b"\x00" * 100_000_000, declared=1000)
    with pytest.raises(ContractError) as info:
        decode_v2(_payload(bomb))
    assert info.value.reason == "undecodable"
    with pytest.raises(ContractError) as info:
        decode_v2(_payload(_zstd_body(b"\x00" * 1000, declared=MAX_RAW_BYTES + 1)))
    assert info.value.reason == "too_large"
    # python-zstandard sizes its output by a content size in the frame, whatever the limit.
    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=1
    )
    sized = zstandard.ZstdCompressor(compression_params=params).compress(bytes(300_000_000))
    with pytest.raises(ContractError, match="content size"):
        decode_v2(_payload(bytes((CODEC_ZSTD,)) + _varints([0, 1000]) + sized))


def test_an_unknown_dictionary_id_is_an_unsupported_version() -> None:
    """A body compressed with a dictionary this consumer does not ship names the id."""
    body = _zstd_body(encode_body(columns_from_batch(_drive(5))), dictionary=7)
    with pytest.raises(ContractError, match="dictionary 7") as info:
        decode_v2(_payload(body))
    assert info.value.reason == "unsupported_version"


def test_bytes_behind_a_zstd_frame_are_refused() -> None:
    """A valid frame followed by anything is not the same message: refused, not ignored."""
    body = _zstd_body(encode_body(columns_from_batch(_drive(5))))
    for tail in (b"\x00", body[3:]):
        with pytest.raises(ContractError, match="trailing"):
            decode_v2(_payload(body + tail))


def test_the_draft_v2_codecs_are_refused() -> None:
    """The draft body (codec 0 raw varints, 1 DEFLATE) is not misread as columns."""
    for codec in (0, 1):
        with pytest.raises(ContractError, match="codec"):
            decode_v2(_payload(bytes((codec,)) + _varints([1, 0, 0, 0])))


def test_an_unknown_section_is_refused_like_an_unknown_v1_field() -> None:
    """A section this consumer does not know is invalid (dead-lettered, replayable)."""
    body = _valid_body(_drive(2))
    with pytest.raises(ContractError, match="dtc") as info:
        decode_v2(msgspec.msgpack.encode([2, VIN, 1, body, {"dtc": [[0, "P0301"]]}]))
    assert info.value.reason == "invalid"


def test_an_empty_field_subset_still_round_trips() -> None:
    """A batch whose samples carry no measurement at all keeps its identities."""
    columns = Columns(ts=[T0, T0 + 7], seq=[1, 2], values={}, flags=[0, 1], extra=[None, None])
    decoded = decode_v2(encode_v2(VIN, 0, columns))
    assert [(s.ts, s.seq, s.flags) for s in decoded.samples] == [(T0, 1, 0), (T0 + 7, 2, 1)]


def test_the_worked_v2_example_in_docs_decodes_to_the_v1_example() -> None:
    """docs/wire.md's v2 hex is the v1 example's batch at the database's resolution, and the
    columns the text reads out of it are the ones it decodes to."""
    text = (Path(__file__).parents[2] / "docs" / "wire.md").read_text()
    v1_hex = text.split("<!-- example-msgpack -->")[1].split("```")[1]
    v2_hex = text.split("<!-- example-v2 -->")[1].split("```")[1]
    v1 = decode_any(bytes.fromhex("".join(v1_hex.split())))
    v2_bytes = bytes.fromhex("".join(v2_hex.split()))
    v2 = decode_any(v2_bytes)
    assert _stored(v2) == _stored(v1)
    assert encode_v2(VIN, 42, columns_from_batch(v1), compress=False) == v2_bytes
    rows = decode_rows(v2_bytes)
    assert rows.ts == [1764115200000000, 1764115200100000]
    assert rows.seq == [1000, 1001]
    assert [(s.speed, s.rpm, s.coolant, s.lat) for s in v2.samples] == [
        (52.0, 1850.0, 88.0, 48.85837),
        (53.0, 1875.0, None, None),
    ]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keep=st.lists(st.sets(st.integers(0, 13)), min_size=1, max_size=30),
    extra_at=st.sets(st.integers(0, 29)),
)
def test_the_spool_columns_equal_the_samples_columns_whatever_each_sample_read(
    keep: list[set[int]], extra_at: set[int]
) -> None:
    """Samples that read different fields (or the same) give the spool the same v2 bytes as
    their contract samples: the edge's fast transposition and its sample-by-sample path agree."""
    drive = list(simulate_samples(8, T0, len(keep), 10.0))
    samples = [
        Sample(
            ts=s.ts,
            seq=s.seq,
            extra={"TIMING_ADVANCE": 1.5} if i in extra_at else None,
            **{FIELDS[k].name: getattr(s, FIELDS[k].name) for k in fields},
        )
        for i, (s, fields) in enumerate(zip(drive, keep, strict=True))
    ]
    rows: list[tuple[int, int, bytes, int | None]] = [
        (
            s.seq,
            s.ts,
            pack_values(
                {f.name: v for f in FIELDS if (v := getattr(s, f.name)) is not None}, s.extra
            ),
            None,
        )
        for s in samples
    ]
    from_spool = encode_batch(VIN, SpoolBatch(id=2, rows=rows), 2)
    batch = Batch(v=1, vin=VIN, batch=2, samples=samples)
    assert from_spool == encode_v2(VIN, 2, columns_from_batch(batch))


@pytest.mark.slow
def test_the_shipped_dictionary_is_its_recipe_trained_again() -> None:
    """The recipe of `revline bench dictionary` gives the shipped dictionary's bytes exactly,
    so how it was made is known and a retrained one is a deliberate new id."""
    name, _ = DICTIONARIES[1]
    shipped = (Path(__file__).parents[2] / "revline" / name).read_bytes()
    assert train_dictionary(1) == shipped


# -- the decoder against its former self (tests/fixtures/wire_v2_oracle.py) -----------------


def _outcome(
    decode: Callable[[bytes], RowBatch | oracle.RowBatch], payload: bytes
) -> tuple[object, ...]:
    """What a decoder makes of a payload: its rows and columns, or its refusal."""
    try:
        rows = decode(payload)
    except ContractError as exc:
        return (exc.reason, exc.detail)
    return (rows.vin, rows.batch, rows.rows, rows.ts, rows.seq, rows.extras)


def _same_as_the_oracle(payload: bytes) -> tuple[object, ...]:
    outcome = _outcome(decode_rows, payload)
    assert outcome == _outcome(oracle.decode_rows, payload)
    return outcome


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=columns(), compress=st.booleans())
def test_any_valid_batch_decodes_to_the_rows_the_former_decoder_made(
    original: Columns, compress: bool
) -> None:
    """Shape by shape decoding gives exactly the old decoder's rows, floats included."""
    outcome = _same_as_the_oracle(encode_v2(VIN, 5, original, compress=compress))
    assert isinstance(outcome[2], list)  # decoded, not refused


@st.composite
def _long_columns(draw: st.DrawFn) -> Columns:
    """Batches long enough for every way of unpacking (a shift per value, and spreading into
    8-64-bit slots with masks of each size): any field, any width the bounds allow."""
    n = draw(st.sampled_from([11, 12, 13, 16, 17, 63, 64, 65, 200, 512, 513, 1500, 5000]))
    index = draw(st.integers(0, len(FIELDS) - 1))
    lo, hi = _BOUNDS[index]
    top = draw(st.integers(lo, hi))
    bottom = draw(st.integers(lo, top))
    seed = draw(st.integers(0, 2**32))
    values: list[int | None] = [
        bottom + (seed * 7919 * (i + 1)) % (top - bottom + 1) for i in range(n)
    ]
    gap = draw(st.sampled_from([1, 1, 7, 2**20, 2**40]))  # consecutive, or any spacing
    seq_start = draw(st.integers(0, 2**63 - 1 - gap * n))
    return Columns(
        ts=[T0 + 100_000 * i + seed % 1000 * (i % 2) for i in range(n)],
        seq=[seq_start + gap * i + (seed >> i % 16 & 3) * (gap > 1) for i in range(n)],
        values={index: values},
        flags=[0] * n,
        extra=[None] * n,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=_long_columns())
def test_long_batches_decode_to_the_rows_the_former_decoder_made(original: Columns) -> None:
    """Long columns of every width: the same rows as the old decoder, and the values sent."""
    outcome = _same_as_the_oracle(encode_v2(VIN, 5, original, compress=False))
    assert isinstance(outcome[2], list)
    assert outcome[3] == original.ts


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.builds(_drive, st.sampled_from([1, 10, 11, 12, 50, 500]), st.integers(0, 50)))
def test_drives_decode_to_the_rows_the_former_decoder_made(batch: Batch) -> None:
    """Simulator drives of the benchmark's batch sizes: the same rows as before."""
    _same_as_the_oracle(encode_v2(VIN, 9, columns_from_batch(batch)))


def _mutated_body(data: st.DataObject, batch: Batch) -> bytes:
    """A valid raw body with its header bytes, numbers or bits changed: reaches the column
    decoder with coherent MessagePack, where a corrupt byte stream mostly fails earlier."""
    n, present, partial, headers, nums, bitmaps, bits = msgspec.msgpack.decode(
        encode_body(columns_from_batch(batch))
    )
    headers, bits = bytearray(headers), bytearray(bits)
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["header", "num", "bits", "n", "cut"]))
        if what == "header" and headers:
            headers[data.draw(st.integers(0, len(headers) - 1))] = data.draw(st.integers(0, 255))
        elif what == "num" and nums:
            at = data.draw(st.integers(0, len(nums) - 1))
            nums[at] = data.draw(
                st.one_of(
                    st.integers(-5, 70),
                    st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, 10**12, -(10**12)]),
                    st.just(nums[at] + data.draw(st.integers(-3, 3))),
                )
            )
        elif what == "bits" and bits:
            bits[data.draw(st.integers(0, len(bits) - 1))] = data.draw(st.integers(0, 255))
        elif what == "n":
            n = data.draw(st.integers(1, MAX_BATCH_SAMPLES))
        elif what == "cut":
            del nums[data.draw(st.integers(0, len(nums))) :]
            del bits[data.draw(st.integers(0, len(bits))) :]
    body = [n, present, partial, bytes(headers), nums, bitmaps, bytes(bits)]
    return bytes((CODEC_RAW,)) + msgspec.msgpack.encode(body)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=st.sampled_from(["body", "columns", "columns", "mutated", "truncated", "zstd"]),
)
def test_hostile_payloads_are_refused_with_the_former_decoders_reason_and_detail(
    data: st.DataObject, shape: str
) -> None:
    """Corrupt columns, counts, bombs and truncations: the same ContractError as before, word
    for word, or (where the corruption still makes a valid batch) the same rows."""
    if shape == "body":
        body = data.draw(_hostile_bodies())
    elif shape == "columns":
        size = data.draw(st.sampled_from([1, 3, 11, 12, 40, 200]))
        body = _mutated_body(data, _drive(size, data.draw(st.integers(0, 9))))
    else:
        batch = _drive(data.draw(st.integers(1, 60)))
        if shape == "zstd":
            body_array = bytearray(
                msgspec.msgpack.decode(encode_v2(VIN, 1, columns_from_batch(batch)))[3]
            )
        else:
            body_array = bytearray(_valid_body(batch))
        if shape == "truncated":
            body_array = body_array[: data.draw(st.integers(0, len(body_array) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 4))):
                at = data.draw(st.integers(0, len(body_array) - 1))
                body_array[at] = data.draw(st.integers(0, 255))
        body = bytes(body_array)
    _same_as_the_oracle(_payload(body))


@pytest.mark.parametrize("width", range(1, 65))
def test_every_width_unpacks_at_every_mask_size(width: int) -> None:
    """The spreading unpacker gives each field of each width, for counts around every mask
    size, the value a shift per field gives."""
    for count in (12, 13, 16, 17, 64, 65, 512, 513, MAX_BATCH_SAMPLES):
        fields = [(i * 0x9E3779B97F4A7C15 >> (i % 7)) % (1 << width) for i in range(count)]
        fields[0], fields[-1] = (1 << width) - 1, 0
        packed = sum(field << (i * width) for i, field in enumerate(fields))
        assert list(_split(packed, count, width)) == fields
