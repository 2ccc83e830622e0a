"""Contract v2 (columns at the database's resolution): round trips, sizes and hostile bytes."""

from __future__ import annotations

import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revline.contract import MAX_BATCH_SAMPLES, Batch, ContractError, Sample, encode
from revline.edge.sim import simulate_samples
from revline.edge.spool import SpoolBatch, batch_columns, encode_batch, pack_values
from revline.fields import FIELDS
from revline.wire_v2 import Columns, columns_from_batch, decode_any, decode_v2, encode_v2

VIN = "1HGCM82633A004352"
T0 = 1_750_000_000_000_000


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


def test_a_simulated_drive_decodes_to_the_same_stored_values_as_v1() -> None:
    """Every field of a drive, GPS included, survives v2 exactly at the database's resolution."""
    batch = _drive(300)
    assert all(getattr(batch.samples[-1], field.name) is not None for field in FIELDS[:14])
    for compress in (False, True):
        decoded = decode_v2(encode_v2(VIN, 9, columns_from_batch(batch), compress=compress))
        assert (decoded.vin, decoded.batch) == (VIN, 9)
        assert _stored(decoded) == _stored(batch)


def test_v2_is_at_least_ten_times_smaller_than_v1_in_batches_of_fifty() -> None:
    """A 5-s batch at 10 Hz is a tenth of v1's bytes or less once compressed."""
    batch = _drive(50)
    v2 = encode_v2(VIN, 9, columns_from_batch(batch))
    assert len(v2) * 10 <= len(encode(batch))


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


measurement = st.one_of(st.none(), st.floats(0, 100, allow_nan=False))


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    """Random valid batches: any subset of fields, flags, extra and trouble codes here and there."""
    n = draw(st.integers(1, 40))
    seqs = sorted(draw(st.sets(st.integers(0, 2**63 - 1), min_size=n, max_size=n)))
    samples = []
    for seq in seqs:
        values = {
            field.name: draw(st.one_of(st.none(), st.floats(field.lo, field.hi)))
            for field in FIELDS
        }
        samples.append(
            Sample(
                ts=draw(st.integers(0, 7_258_118_400_000_000)),
                seq=seq,
                flags=draw(st.sampled_from([0, 0, 1, 2**31 - 1])),
                extra=draw(st.one_of(st.none(), st.just({"TIMING_ADVANCE": -12.5}))),
                dtc=draw(st.one_of(st.none(), st.just([]), st.just(["C0035", "P0301"]))),
                **values,
            )
        )
    return Batch(v=1, vin=VIN, batch=draw(st.integers(0, 2**63 - 1)), samples=samples)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), compress=st.booleans())
def test_any_valid_batch_round_trips_at_database_resolution(batch: Batch, compress: bool) -> None:
    """Whatever a device may send decodes to the values the cold table would store."""
    decoded = decode_v2(encode_v2(VIN, batch.batch, columns_from_batch(batch), compress=compress))
    assert decoded.batch == batch.batch
    assert _stored(decoded) == _stored(batch)


def _hostile_bodies() -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=200)
    varints = st.lists(st.integers(0, 2**70), max_size=40).map(_varints)
    return st.one_of(
        raw.map(lambda b: b"\x00" + b),
        raw.map(lambda b: b"\x01" + b),
        raw.map(lambda b: b"\x01" + zlib.compress(b)[2:-4]),
        varints.map(lambda b: b"\x00" + b),
        st.just(b"\x01" + zlib.compressobj(9, zlib.DEFLATED, -15).compress(b"\x00" * 3_000_000)),
    )


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for value in values:
        rest = value
        while rest > 0x7F:
            out.append((rest & 0x7F) | 0x80)
            rest >>= 7
        out.append(rest)
    return bytes(out)


def _valid_body(batch: Batch) -> bytes:
    return msgspec.msgpack.decode(encode_v2(VIN, 1, columns_from_batch(batch), compress=False))[3]  # type: ignore[no-any-return]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=st.sampled_from(["body", "mutated", "truncated", "envelope", "sparse"]),
)
def test_hostile_v2_payloads_raise_only_contract_errors(data: st.DataObject, shape: str) -> None:
    """Corrupt bodies, bombs, huge counts, bad envelopes and sparse lists: ContractError only."""
    if shape == "body":
        payload = msgspec.msgpack.encode([2, VIN, 1, data.draw(_hostile_bodies())])
    elif shape in ("mutated", "truncated"):
        body = bytearray(_valid_body(_drive(data.draw(st.integers(1, 30)))))
        if shape == "truncated":
            body = body[: data.draw(st.integers(0, len(body) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 4))):
                body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        payload = msgspec.msgpack.encode([2, VIN, 1, bytes(body)])
    elif shape == "envelope":
        item = st.one_of(
            st.integers(-(2**63), 2**64 - 1),
            st.text(max_size=20),
            st.binary(max_size=20),
            st.none(),
        )
        payload = msgspec.msgpack.encode(data.draw(st.lists(item, max_size=8)))
    else:
        index = st.integers(-5, MAX_BATCH_SAMPLES + 5)
        flags = data.draw(st.lists(st.tuples(index, st.integers(-1, 2**32)), max_size=5))
        extra = data.draw(st.lists(st.tuples(index, st.just({"A": 1.0})), max_size=5))
        payload = msgspec.msgpack.encode([2, VIN, 1, _valid_body(_drive(3)), flags, extra])
    reasons = {"invalid", "undecodable", "too_large", "unsupported_version"}
    try:
        batch = decode_any(payload)
    except ContractError as exc:
        reason = exc.reason
    else:
        reason = "decoded"
        assert 1 <= len(batch.samples) <= MAX_BATCH_SAMPLES
    assert reason in {*reasons, "decoded"}


def test_a_count_beyond_the_limit_is_refused_before_allocation() -> None:
    """A body claiming a billion samples is refused at once."""
    payload = msgspec.msgpack.encode([2, VIN, 1, b"\x00" + _varints([10**9])])
    with pytest.raises(ContractError, match="samples"):
        decode_v2(payload)


def test_a_deflate_bomb_is_refused_as_too_large() -> None:
    """A body inflating past the payload limit is refused without inflating all of it."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(b"\x00" * 3_000_000) + packer.flush()
    with pytest.raises(ContractError) as info:
        decode_v2(msgspec.msgpack.encode([2, VIN, 1, b"\x01" + bomb]))
    assert info.value.reason == "too_large"


def test_an_empty_field_subset_still_round_trips() -> None:
    """A batch whose samples carry no measurement at all keeps its identities."""
    columns = Columns(ts=[T0, T0 + 7], seq=[1, 2], values={}, flags=[0, 1], extra=[None, None])
    decoded = decode_v2(encode_v2(VIN, 0, columns))
    assert [(s.ts, s.seq, s.flags) for s in decoded.samples] == [(T0, 1, 0), (T0 + 7, 2, 1)]


def test_the_worked_v2_example_in_docs_decodes_to_the_v1_example() -> None:
    """docs/wire.md's v2 hex is the v1 example's batch at the database's resolution."""
    text = (Path(__file__).parents[2] / "docs" / "wire.md").read_text()
    v1_hex = text.split("<!-- example-msgpack -->")[1].split("```")[1]
    v2_hex = text.split("<!-- example-v2 -->")[1].split("```")[1]
    v1 = decode_any(bytes.fromhex("".join(v1_hex.split())))
    v2 = decode_any(bytes.fromhex("".join(v2_hex.split())))
    assert _stored(v2) == _stored(v1)
    assert encode_v2(VIN, 42, columns_from_batch(v1), compress=False).hex() == "".join(
        v2_hex.split()
    )
