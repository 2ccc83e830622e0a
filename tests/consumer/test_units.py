"""Consumer logic without servers: batching by size and age, the byte budget, validation,
settings, and the rate limit of connection failure logs."""

from __future__ import annotations

import string
import time
import tracemalloc

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from revline.consumer.batcher import Batcher
from revline.consumer.budget import ByteBudget, footprint
from revline.consumer.config import load_settings
from revline.consumer.validate import Invalid, check
from revline.contract import (
    NUMERIC_FIELDS,
    Batch,
    Sample,
    decode_batch,
    encode,
    encode_json,
    telemetry_topic,
)
from revline.settings import ConfigError

VIN = "1HGCM82633A004352"
OTHER_VIN = "2HGCM82633A004352"


def _payload(ts: int, *, vin: str = VIN, n: int = 3) -> bytes:
    samples = [Sample(ts=ts + i, seq=i, speed=50.0) for i in range(n)]
    return encode(Batch(v=1, vin=vin, batch=7, samples=samples))


@given(
    items=st.lists(
        st.tuples(st.integers(min_value=0, max_value=50), st.integers(min_value=0, max_value=900)),
        max_size=200,
    ),
    max_samples=st.integers(min_value=1, max_value=120),
    max_items=st.integers(min_value=1, max_value=30),
    max_bytes=st.integers(min_value=1, max_value=3_000),
)
def test_batcher_keeps_order_and_bounds(
    items: list[tuple[int, int]], max_samples: int, max_items: int, max_bytes: int
) -> None:
    """Every item comes out once, in order, and no batch exceeds a bound unless one item does."""
    batcher: Batcher[int] = Batcher(
        max_samples=max_samples, max_age=1.0, max_items=max_items, max_bytes=max_bytes
    )
    closed = []
    for index, (samples, size) in enumerate(items):
        closed.extend(batcher.add(index, samples, now=0.0, size=size))
    closed.append(batcher.take())
    assert [i for b in closed for i in b.items] == list(range(len(items)))
    for batch in closed:
        assert batch.samples == sum(items[i][0] for i in batch.items)
        assert batch.size == sum(items[i][1] for i in batch.items)
        assert len(batch.items) <= max_items
        if len(batch.items) > 1:
            assert batch.samples <= max_samples
            assert batch.size <= max_bytes


def test_batcher_closes_by_bytes() -> None:
    """Messages without samples (dead letters) still close a batch by their size in bytes."""
    batcher: Batcher[str] = Batcher(max_samples=10, max_age=60.0, max_bytes=100)
    assert batcher.add("a", 0, now=0.0, size=60) == []
    closed = batcher.add("b", 0, now=0.0, size=60)
    assert [b.items for b in closed] == [["a"]]
    closed = batcher.add("c", 0, now=0.0, size=40)
    assert [(b.items, b.size) for b in closed] == [(["b", "c"], 100)]


def test_batcher_closes_by_size() -> None:
    """A batch closes as soon as it reaches max_samples, without waiting for its age."""
    batcher: Batcher[str] = Batcher(max_samples=10, max_age=60.0)
    assert batcher.add("a", 6, now=0.0) == []
    closed = batcher.add("b", 4, now=0.1)
    assert [b.items for b in closed] == [["a", "b"]]
    assert len(batcher) == 0
    assert batcher.deadline() is None


def test_batcher_closes_before_overflowing() -> None:
    """An item that would overflow the open batch starts the next one instead."""
    batcher: Batcher[str] = Batcher(max_samples=10, max_age=60.0)
    batcher.add("a", 6, now=0.0)
    closed = batcher.add("b", 6, now=0.1)
    assert [b.items for b in closed] == [["a"]]
    assert batcher.samples == 6


def test_batcher_oversized_item_is_a_batch_of_its_own() -> None:
    """One message larger than max_samples is never split: it is acked as a whole."""
    batcher: Batcher[str] = Batcher(max_samples=10, max_age=60.0)
    batcher.add("a", 3, now=0.0)
    closed = batcher.add("huge", 25, now=0.0)
    assert [b.items for b in closed] == [["a"], ["huge"]]


def test_batcher_is_due_by_age_of_first_item() -> None:
    """The age deadline counts from the first item of the open batch."""
    batcher: Batcher[str] = Batcher(max_samples=1000, max_age=0.2)
    assert not batcher.due(100.0)
    batcher.add("a", 1, now=10.0)
    batcher.add("b", 1, now=10.15)
    assert batcher.deadline() == pytest.approx(10.2)
    assert not batcher.due(10.19)
    assert batcher.due(10.2)
    assert batcher.take().items == ["a", "b"]
    assert not batcher.due(99.0)


def test_batcher_rejects_nonsense_bounds() -> None:
    """Zero or negative bounds are a programming error."""
    with pytest.raises(ValueError, match="max_samples"):
        Batcher(max_samples=0, max_age=1.0)


def test_check_accepts_a_valid_batch_in_msgpack_and_json() -> None:
    """A valid batch decodes from either wire form."""
    now = int(time.time() * 1e6)
    topic = telemetry_topic(VIN)
    batch = check(_payload(now), topic, now_us=now, max_future_us=300_000_000)
    assert isinstance(batch, Batch)
    assert len(batch.samples) == 3
    as_json = encode_json(Batch(v=1, vin=VIN, batch=1, samples=[Sample(ts=now, seq=1)]))
    assert isinstance(check(as_json, topic, now_us=now, max_future_us=1), Batch)


@pytest.mark.parametrize(
    ("payload", "topic", "reason"),
    [
        (b"\xc1garbage", telemetry_topic(VIN), "undecodable"),
        (b"{not json", telemetry_topic(VIN), "undecodable"),
        (_payload(1_000, vin=OTHER_VIN), telemetry_topic(VIN), "vin_mismatch"),
        (_payload(1_000), "telemetry/short", "bad_topic"),
        (b'{"v": 9, "vin": "x"}', telemetry_topic(VIN), "unsupported_version"),
        (b'{"v": 1, "vin": "' + VIN.encode() + b'", "batch": 1, "samples": []}', None, "invalid"),
    ],
)
def test_check_reports_contract_reasons(payload: bytes, topic: str | None, reason: str) -> None:
    """A bad message comes back as Invalid with the contract's reason code."""
    verdict = check(payload, topic or telemetry_topic(VIN), now_us=0, max_future_us=1)
    assert isinstance(verdict, Invalid)
    assert verdict.reason == reason
    assert verdict.detail


def test_check_rejects_future_timestamps_beyond_the_window() -> None:
    """A sample more than the window ahead of our clock is future_timestamp; at the edge is ok."""
    now = 1_700_000_000_000_000
    window = 300_000_000
    topic = telemetry_topic(VIN)
    ok = check(_payload(now + window - 2, n=3), topic, now_us=now, max_future_us=window)
    assert isinstance(ok, Batch)
    late = check(_payload(now + window - 1, n=3), topic, now_us=now, max_future_us=window)
    assert isinstance(late, Invalid)
    assert late.reason == "future_timestamp"
    assert late.batch is not None  # kept so the device still gets its ack


def test_settings_layer_env_and_flags() -> None:
    """MQTT_URL/DATABASE_URL are honoured, REVLINE_* wins over them and flags win over both."""
    env = {
        "MQTT_URL": "mqtt://broker:1883",
        "DATABASE_URL": "postgresql://db/x",
        "REVLINE_DATABASE_URL": "postgresql://db/y",
        "REVLINE_BATCH_MAX_SAMPLES": "500",
    }
    flags = {"group": "g1", "client_id": "c1", "batch_max_samples": None}
    settings = load_settings(environ=env, flags=flags)
    assert settings.mqtt_url == "mqtt://broker:1883"
    assert settings.database_url == "postgresql://db/y"
    assert settings.batch_max_samples == 500
    assert settings.subscription == "$share/g1/telemetry/+"
    assert load_settings(environ={}).subscription == "telemetry/+"
    assert load_settings(environ={}).effective_client_id.startswith("revline-consumer-")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"REVLINE_BATCH_MAX_SAMPLES": "lots"}, "batch_max_samples"),
        ({"REVLINE_RECEIVE_MAXIMUM": "70000"}, "receive_maximum"),
        ({"MQTT_URL": "http://x"}, "mqtt_url"),
        ({"DATABASE_URL": "mysql://x"}, "database_url"),
        ({"REVLINE_GROUP": "a/b"}, "group"),
    ],
)
def test_bad_settings_name_the_key(env: dict[str, str], key: str) -> None:
    """A bad value is a one-line ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert info.value.key == key
    assert "\n" not in str(info.value)


_VIN_FIELDS = {"v": 1, "vin": VIN, "batch": 1}
_ONE_CHAR = list(string.ascii_letters + string.digits + "_")  # every key character allowed
_TWO_CHARS = [a + b for a in string.ascii_letters for b in "xyz"][:64]


def _samples(n: int, **fields: object) -> list[dict[str, object]]:
    return [{"ts": 0, "seq": 0, **fields} for _ in range(n)]


_HOSTILE_SHAPES = {
    "bare samples": _samples(2_000),
    "large ints": [{"ts": 10**15 + i, "seq": 2**40 + i} for i in range(2_000)],
    "one extra entry each": _samples(2_000, extra={"a": 0}),
    "64 one-char keys": _samples(1_000, extra=dict.fromkeys(_ONE_CHAR, 0)),
    "64 two-char keys": _samples(1_000, extra=dict.fromkeys(_TWO_CHARS, 0)),
    "64 long keys": _samples(200, extra={f"{i:02d}" + "k" * 62: 0 for i in range(64)}),
    "every typed field as 0": _samples(2_000, **dict.fromkeys(NUMERIC_FIELDS, 0)),
    "every typed field as float": _samples(2_000, **dict.fromkeys(NUMERIC_FIELDS, 1.5)),
    "typical": [{"ts": 10**15 + i, "seq": i, "speed": 50.5, "rpm": 900.0} for i in range(500)],
}


@pytest.mark.parametrize("wire", ["msgpack", "json"])
@pytest.mark.parametrize("shape", sorted(_HOSTILE_SHAPES))
def test_footprint_bounds_what_a_decoded_message_holds(shape: str, wire: str) -> None:
    """The bytes charged for a message cover its payload and every object its decoding made."""
    message = {**_VIN_FIELDS, "samples": _HOSTILE_SHAPES[shape]}
    encode_wire = msgspec.msgpack.encode if wire == "msgpack" else msgspec.json.encode
    payload = encode_wire(message)
    tracemalloc.start()
    try:
        batch = decode_batch(payload)
        decoded, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert footprint(len(payload), batch) >= len(payload) + decoded
    assert footprint(len(payload), None) >= len(payload)


def test_byte_budget_refuses_arrivals_until_acks_free_room() -> None:
    """An arrival that does not fit is refused (the subscriber stops reading) and fits once
    held bytes are released."""
    budget = ByteBudget(100)
    assert budget.admit(60)
    budget.decoded(60, 90)  # decoding made it bigger
    assert not budget.admit(20)
    assert (budget.queued, budget.held) == (0, 90)  # nothing counted for the refused one
    budget.release(90)
    assert budget.admit(20)
    assert (budget.queued, budget.held) == (20, 0)
    assert budget.high_water() == 90


def test_byte_budget_lets_a_message_larger_than_the_limit_through_alone() -> None:
    """With nothing held, any message passes (else it would wait forever), and is decoded."""
    budget = ByteBudget(100)
    assert budget.admit(500)
    assert budget.may_decode()  # nothing decoded is held: the queue alone never stalls
    budget.decoded(500, 2_000)
    assert not budget.may_decode()
    assert not budget.admit(1)
    budget.release(2_000)
    assert budget.may_decode()
    assert budget.admit(1)
