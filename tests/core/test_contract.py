"""The message contract: round trips, strict rejection with a reason, topics and VINs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revline._peek import MAX_DEPTH, MAX_STEPS, json_version, msgpack_version
from revline.contract import (
    EXTRA_KEY_PATTERN,
    MAX_BATCH_SAMPLES,
    MAX_DETAIL_CHARS,
    MAX_PAYLOAD_BYTES,
    Ack,
    Batch,
    ContractError,
    Sample,
    ack_topic,
    decode_ack,
    decode_batch,
    encode,
    encode_json,
    is_valid_vin,
    telemetry_topic,
    vin_from_topic,
)
from revline.fields import FIELDS

VIN = "1HGCM82633A004352"
VIN_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
REASONS = {
    "too_large",
    "undecodable",
    "invalid",
    "unsupported_version",
    "vin_mismatch",
    "bad_topic",
}

vins = st.text(alphabet=VIN_ALPHABET, min_size=17, max_size=17)


def _opt(lo: float, hi: float) -> st.SearchStrategy[float | None]:
    return st.none() | st.floats(min_value=lo, max_value=hi, allow_nan=False)


samples = st.builds(
    Sample,
    ts=st.integers(min_value=0, max_value=7_258_118_400_000_000),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    **{field.name: _opt(field.lo, field.hi) for field in FIELDS},
    extra=st.none()
    | st.dictionaries(
        st.from_regex(EXTRA_KEY_PATTERN, fullmatch=True),
        st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
        max_size=8,
    ),
    flags=st.integers(min_value=0, max_value=2**31 - 1),
)
batches = st.builds(
    Batch,
    v=st.just(1),
    vin=vins,
    batch=st.integers(min_value=0, max_value=2**63 - 1),
    samples=st.lists(samples, min_size=1, max_size=20),
)


def _outcome(payload: bytes, topic: str | None = None) -> str:
    """ "ok", or the reason of the ContractError; any other exception propagates and fails."""
    try:
        decode_batch(payload, topic)
    except ContractError as exc:
        return exc.reason if exc.detail else "error without detail"
    return "ok"


@given(batches)
def test_batch_round_trips_through_msgpack_and_json(batch: Batch) -> None:
    """Any valid batch decodes back to itself from both wire forms."""
    assert decode_batch(encode(batch), telemetry_topic(batch.vin)) == batch
    assert decode_batch(encode_json(batch)) == batch


@given(vins, st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=1, max_size=50))
def test_ack_round_trips(vin: str, ids: list[int]) -> None:
    """Acks decode back to themselves from both wire forms."""
    ack = Ack(v=1, vin=vin, batches=ids)
    assert decode_ack(encode(ack)) == ack
    assert decode_ack(encode_json(ack)) == ack


@settings(max_examples=300)
@given(batches, st.data())
def test_any_corruption_is_rejected_with_a_reason_never_a_crash(
    batch: Batch, data: st.DataObject
) -> None:
    """Flipping, cutting or inserting bytes gives a valid batch or a ContractError, nothing else."""
    raw = bytearray(encode(batch))
    action = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    if action == "flip":
        raw[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif action == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    assert _outcome(bytes(raw), telemetry_topic(batch.vin)) in {"ok", *REASONS}


@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(payload: bytes) -> None:
    """Arbitrary bytes are either a batch or a ContractError with a known reason."""
    assert _outcome(payload) in {"ok", *REASONS}


def _raw(**override: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1,
        "vin": VIN,
        "batch": 1,
        "samples": [{"ts": 1_700_000_000_000_000, "seq": 1, "rpm": 850.0}],
    }
    message.update(override)
    return message


def _reason(message: object, topic: str | None = None, *, as_json: bool = False) -> str:
    payload = msgspec.json.encode(message) if as_json else msgspec.msgpack.encode(message)
    with pytest.raises(ContractError) as info:
        decode_batch(payload, topic)
    return info.value.reason


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (_raw(samples=[{"ts": 1, "seq": 1, "rpm": "fast"}]), "invalid"),
        (_raw(samples=[{"ts": 1, "seq": -1}]), "invalid"),
        (_raw(samples=[{"ts": 1.5, "seq": 1}]), "invalid"),
        (_raw(samples=[{"ts": 1, "seq": 1, "lat": 91.0}]), "invalid"),
        (_raw(samples=[{"ts": 1, "seq": 1, "colour": "red"}]), "invalid"),
        (_raw(samples=[{"ts": 1, "seq": 1, "extra": {"X": "y"}}]), "invalid"),
        (_raw(samples=[]), "invalid"),
        (_raw(vin="1HGCM82633A00435I"), "invalid"),
        (_raw(v=2), "unsupported_version"),
        ({"v": 7, "anything": "goes"}, "unsupported_version"),
        ([1, 2, 3], "invalid"),
    ],
)
def test_malformed_batches_name_their_reason(
    message: object, reason: str, *, as_json: bool
) -> None:
    """Each kind of bad content maps to one stable reason code, in both wire forms."""
    assert _reason(message, as_json=as_json) == reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_rejected(bad: float) -> None:
    """Non-finite numbers are invalid in typed fields and in extra."""
    assert _reason(_raw(samples=[{"ts": 1, "seq": 1, "speed": bad}])) == "invalid"
    assert _reason(_raw(samples=[{"ts": 1, "seq": 1, "extra": {"X": bad}}])) == "invalid"


def test_oversize_batches_are_rejected() -> None:
    """Too many samples, or too many bytes, is rejected before it can cost memory."""
    many = [{"ts": 1, "seq": i} for i in range(MAX_BATCH_SAMPLES + 1)]
    assert _reason(_raw(samples=many)) == "invalid"
    with pytest.raises(ContractError) as info:
        decode_batch(b"{" + b" " * MAX_PAYLOAD_BYTES + b"}")
    assert info.value.reason == "too_large"


def test_garbage_is_undecodable() -> None:
    """Bytes that are neither MessagePack nor JSON say so."""
    for payload in (b"", b"\xc1", b"{not json", b"\x92\x01"):
        with pytest.raises(ContractError) as info:
            decode_batch(payload)
        assert info.value.reason in {"undecodable", "invalid"}


def test_topic_vin_must_match_payload_vin() -> None:
    """A batch published on another vehicle's topic is refused."""
    assert _reason(_raw(), "telemetry/2HGCM82633A004352") == "vin_mismatch"
    assert _reason(_raw(), "telemetry/not-a-vin") == "bad_topic"
    assert _reason(_raw(), "elsewhere/" + VIN) == "bad_topic"


def test_topics_and_vins() -> None:
    """Topic helpers build and parse both topics and validate the VIN."""
    assert telemetry_topic(VIN) == f"telemetry/{VIN}"
    assert ack_topic(VIN) == f"ack/{VIN}"
    assert vin_from_topic(f"ack/{VIN}") == VIN
    assert is_valid_vin(VIN)
    for bad in ("", VIN[:-1], VIN + "1", VIN[:-1] + "O", VIN[:-1] + "q", VIN[:-1] + "I"):
        assert not is_valid_vin(bad)
        with pytest.raises(ContractError):
            telemetry_topic(bad)


def test_json_with_leading_whitespace_is_json() -> None:
    """A hand-typed JSON payload with a newline in front still decodes."""
    assert (
        decode_batch(b"\n  " + encode_json(Batch(**_raw(samples=[Sample(ts=1, seq=1)])))).batch == 1
    )


def test_integral_values_may_travel_as_integers() -> None:
    """Edges may send 850 instead of 850.0 to save bytes; the float field accepts it."""
    batch = decode_batch(msgspec.msgpack.encode(_raw(samples=[{"ts": 1, "seq": 1, "rpm": 850}])))
    assert batch.samples[0].rpm == 850.0


def _doc_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "wire.md").read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_wire_doc_example_bytes_decode_to_the_json_example() -> None:
    """docs/wire.md's hex bytes decode, and equal its JSON form, so the doc cannot drift."""
    raw = bytes.fromhex("".join(_doc_block("example-msgpack").split()))
    topic = "telemetry/1HGCM82633A004352"
    from_hex = decode_batch(raw, topic)
    from_json = decode_batch(_doc_block("example-json").encode(), topic)
    assert from_hex == from_json
    assert len(raw) == 220
    assert from_hex.samples[1].extra == {"TIMING_ADVANCE": 12.5}
    assert decode_ack(
        bytes.fromhex("83a17601a376696eb1314847434d383236333341303034333532a76261746368657392292a")
    ) == Ack(v=1, vin="1HGCM82633A004352", batches=[41, 42])


CONTROL = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]


def _error(payload: bytes) -> ContractError:
    with pytest.raises(ContractError) as info:
        decode_batch(payload)
    return info.value


def _encoded(message: object, *, as_json: bool) -> bytes:
    return msgspec.json.encode(message) if as_json else msgspec.msgpack.encode(message)


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(
    "key", ["a\x00b", "\x00", "a\x01", "TAB\t", "DEL\x7f", "a b", "a.b", "é", "", "K" * 65]
)
def test_extra_keys_outside_the_pattern_are_invalid(key: str, *, as_json: bool) -> None:
    """An extra key with a control character (NUL above all), a space or non-ASCII is refused."""
    message = _raw(samples=[{"ts": 1, "seq": 1, "extra": {key: 1.0}}])
    assert _reason(message, as_json=as_json) == "invalid"


def test_extra_keys_of_python_obd_names_are_accepted() -> None:
    """python-OBD command names are the model for the pattern."""
    extra = {"TIMING_ADVANCE": 12.5, "O2_B1S1": 0.45, "DTC_COUNT": 0.0, "k" * 64: 1.0}
    batch = decode_batch(
        msgspec.msgpack.encode(_raw(samples=[{"ts": 1, "seq": 1, "extra": extra}]))
    )
    assert batch.samples[0].extra == extra


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("where", ["top", "sample"])
def test_control_characters_in_unknown_field_names_are_escaped_in_the_detail(
    where: str, *, as_json: bool
) -> None:
    """Defect 3: a NUL in a field name never reaches the detail (a text column), it is escaped."""
    name = "a\x00b" + "".join(CONTROL)
    if where == "top":
        message = {**_raw(), name: 1}
    else:
        message = _raw(samples=[{"ts": 1, "seq": 1, name: 1}])
    error = _error(_encoded(message, as_json=as_json))
    assert error.reason == "invalid"
    assert "a\\x00b" in error.detail
    assert not set(error.detail) & set(CONTROL)
    assert not set(str(error)) & set(CONTROL)


def test_the_detail_is_cut_to_its_limit() -> None:
    """An unknown field name of 100k characters gives a detail of at most MAX_DETAIL_CHARS."""
    error = _error(msgspec.msgpack.encode({**_raw(), "x" * 100_000: 1}))
    assert error.reason == "invalid"
    assert len(error.detail) == MAX_DETAIL_CHARS


def _deep_msgpack(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"\x91" * depth + b"\x01")


def _deep_json(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"[" * depth + b"1" + b"]" * depth)


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("where", ["top", "sample", "extra", "v", "vin"])
def test_a_field_nested_a_thousand_deep_is_invalid_not_a_crash(
    where: str, *, as_json: bool
) -> None:
    """Defect 1: ~1,000 levels of nesting anywhere in a batch give `invalid`, not RecursionError."""
    deep = _deep_json(1_000) if as_json else _deep_msgpack(1_000)
    sample: dict[str, Any] = {"ts": 1, "seq": 1}
    message: dict[str, Any] = _raw(samples=[sample])
    if where == "top":
        message["unknown"] = deep
    elif where == "sample":
        sample["unknown"] = deep
    elif where == "extra":
        sample["extra"] = {"X": deep}
    else:
        message[where] = deep
    payload = _encoded(message, as_json=as_json)
    assert _error(payload).reason == "invalid"
    with pytest.raises(ContractError) as info:
        decode_ack(payload)
    assert info.value.reason == "invalid"


@pytest.mark.parametrize("as_json", [False, True])
def test_a_newer_version_is_found_behind_deep_or_long_unknown_fields(*, as_json: bool) -> None:
    """`v` after a big unknown field is still read; beyond the walker's limits it is `invalid`."""
    before = {
        "unknown": [[[{"a": [1, "x", b"y" if not as_json else "y"]}]]],
        "more": list(range(50)),
    }
    payload = _encoded({**before, **_raw(v=2), "other": 1}, as_json=as_json)
    assert _error(payload).reason == "unsupported_version"
    deep = _deep_json(MAX_DEPTH + 1) if as_json else _deep_msgpack(MAX_DEPTH + 1)
    assert _error(_encoded({"unknown": deep, "v": 2}, as_json=as_json)).reason == "invalid"
    long = list(range(MAX_STEPS))
    assert _error(_encoded({"unknown": long, "v": 2}, as_json=as_json)).reason == "invalid"


@pytest.mark.parametrize(
    "v", [0, 1, 2, 127, 128, 255, 256, 65_536, 2**32, 2**63 - 1, 2**64 - 1, -1, -32, -33, -(2**63)]
)
def test_the_version_walker_reads_every_integer_encoding(v: int) -> None:
    """`v` is read from fixint, uint8-64 and int8-64 forms, and from JSON, after other fields."""
    message = {"x": [1.5, None, True, {"k": b"\x00" * 300}], "s": "é" * 40, "v": v}
    assert msgpack_version(msgspec.msgpack.encode(message)) == v
    expected = v if abs(v) < 10**19 else None  # longer JSON integers are not looked at
    assert json_version(b" \n" + msgspec.json.encode(message)) == expected
    assert json_version(b'{"\\u0076" : %d }' % v) == expected  # an escaped key is still "v"


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x80", b"\x81", b"\x81\xc1\x01", b"\x81\xa1v", b"\x81\xa1v\xc0", b"\x81\xdb\xff\xff",
     b"\x82\xa1x\xdd\xff\xff\xff\xff\xa1v\x02", b"\x91\x02", b"\xde"],
)  # fmt: skip
def test_the_msgpack_version_walker_gives_up_quietly(payload: bytes) -> None:
    """Truncated or malformed MessagePack gives None, never an exception."""
    assert msgpack_version(payload) is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b'{"v"', b'{"v":', b'{"v":1.5}', b'{"v":"2"}', b'{"x":[}', b'{"x":1 "v":2}',
     b'{"x":"\\', b'{"\\ud800":1,"v":2}', b'{"x":]],"v":2}', b'[{"v":2}]'],
)  # fmt: skip
def test_the_json_version_walker_gives_up_quietly(payload: bytes) -> None:
    """Truncated or malformed JSON gives None, never an exception."""
    assert json_version(payload) is None
