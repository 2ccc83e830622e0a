"""Poison messages: hostile MessagePack and JSON never stop the decoders, the consumer or the edge.

The strategies build payloads byte by byte, so they can say what no encoder would: nesting
thousands deep, NUL and control characters in keys and strings, invalid UTF-8, lying lengths,
huge maps and arrays, every MessagePack type (bin, ext, timestamps, the unused 0xc1), valid
messages with bytes behind them or cut short. Each one is hostile by construction: the unit tests
hold the contract to refusing every one with a ContractError (and nothing else), and the
integration tests publish a fixed-seed sample of them, interleaved with valid batches, to a real
consumer and a real edge.
"""

from __future__ import annotations

import functools
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from revline._peek import json_version, msgpack_version
from revline.consumer.config import ConsumerSettings
from revline.consumer.validate import CONSUMER_REASONS, Invalid, check
from revline.contract import (
    EXTRA_KEY_PATTERN,
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
    telemetry_topic,
)
from revline.edge.status import read_dead_letters, read_status
from revline.storage.migrate import MigrateSettings
from revline.wire_v2 import AnyBatch
from tests.fixtures.consumer import (
    ROOT,
    AckListener,
    ConsumerFactory,
    ConsumerProcess,
    PublisherFactory,
    cold_counts,
    make_batches,
    query,
)
from tests.fixtures.edge import all_durable, edge_settings, running_edge, spooled
from tests.fixtures.services import MosquittoFactory, wait_until

VIN = "1HGCM82633A004352"
CONTRACT_REASONS = {
    "too_large",
    "undecodable",
    "invalid",
    "unsupported_version",
    "vin_mismatch",
    "bad_topic",
}
FIELDS = {*Batch.__struct_fields__, *Sample.__struct_fields__, *Ack.__struct_fields__}
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
SEED = 20_240_612  # the integration tests publish the same hostile sample on every run

# -- MessagePack, byte by byte ------------------------------------------------------------------


def _forms(n: int, fixed: tuple[int, int] | None, codes: tuple[int, int, int]) -> list[bytes]:
    """Every header that can announce ``n`` (a length or a count): fix form, 8/16/32-bit."""
    out = []
    if fixed is not None and n <= fixed[1]:
        out.append(bytes([fixed[0] | n]))
    for code, fmt, top in zip(codes, (">B", ">H", ">I"), (0xFF, 0xFFFF, 0xFFFF_FFFF), strict=True):
        if code and n <= top:
            out.append(bytes([code]) + struct.pack(fmt, n))
    return out


_INT_FORMS = (
    (0xCC, ">B", 0, 2**8 - 1),
    (0xCD, ">H", 0, 2**16 - 1),
    (0xCE, ">I", 0, 2**32 - 1),
    (0xCF, ">Q", 0, 2**64 - 1),
    (0xD0, ">b", -(2**7), 2**7 - 1),
    (0xD1, ">h", -(2**15), 2**15 - 1),
    (0xD2, ">i", -(2**31), 2**31 - 1),
    (0xD3, ">q", -(2**63), 2**63 - 1),
)


@st.composite
def mp_int(draw: st.DrawFn) -> bytes:
    """An integer in any encoding wide enough for it (fixints, uint8-64, int8-64)."""
    value = draw(st.integers(-(2**63), 2**64 - 1))
    forms = [
        bytes([code]) + struct.pack(fmt, value)
        for code, fmt, lo, hi in _INT_FORMS
        if lo <= value <= hi
    ]
    if 0 <= value < 128:
        forms.append(bytes([value]))
    if -32 <= value < 0:
        forms.append(struct.pack(">b", value))
    return draw(st.sampled_from(forms))


@st.composite
def mp_str(draw: st.DrawFn) -> bytes:
    """A string with any characters (controls and NUL too), or bytes that are not UTF-8."""
    data = draw(st.text(max_size=40).map(str.encode) | st.binary(max_size=40))
    return draw(st.sampled_from(_forms(len(data), (0xA0, 31), (0xD9, 0xDA, 0xDB)))) + data


@st.composite
def mp_bin(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(max_size=300))
    return draw(st.sampled_from(_forms(len(data), None, (0xC4, 0xC5, 0xC6)))) + data


@st.composite
def mp_ext(draw: st.DrawFn) -> bytes:
    """An extension of any type; type -1 is a timestamp (4, 8 or 12 bytes, any nanoseconds)."""
    kind = draw(st.integers(-128, 127))
    size = draw(st.sampled_from([4, 8, 12]) if kind == -1 else st.integers(0, 40))
    data = draw(st.binary(min_size=size, max_size=size))
    forms = _forms(size, None, (0xC7, 0xC8, 0xC9))
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    head = draw(st.sampled_from(forms + ([bytes([fixext[size]])] if size in fixext else [])))
    return head + struct.pack(">b", kind) + data


mp_scalar: st.SearchStrategy[bytes] = st.one_of(
    mp_int(),
    st.floats(width=32).map(lambda x: b"\xca" + struct.pack(">f", x)),
    st.floats().map(lambda x: b"\xcb" + struct.pack(">d", x)),
    st.sampled_from([b"\xc0", b"\xc2", b"\xc3", b"\xc1"]),  # nil, false, true, never used
    mp_str(),
    mp_bin(),
    mp_ext(),
    # A header that promises more than follows.
    st.sampled_from([b"\xdb\xff\xff\xff\xff", b"\xc6\x00\x10\x00\x00", b"\xdd\x00\x01\x00\x00"]),
)


def _mp_containers(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    def array(items: list[bytes]) -> st.SearchStrategy[bytes]:
        heads = _forms(len(items), (0x90, 15), (0, 0xDC, 0xDD))
        return st.sampled_from(heads).map(lambda head: head + b"".join(items))

    def mapping(pairs: list[tuple[bytes, bytes]]) -> st.SearchStrategy[bytes]:
        heads = _forms(len(pairs), (0x80, 15), (0, 0xDE, 0xDF))
        return st.sampled_from(heads).map(lambda head: head + b"".join(k + v for k, v in pairs))

    return st.lists(children, max_size=6).flatmap(array) | st.lists(
        st.tuples(children, children), max_size=5
    ).flatmap(mapping)


@st.composite
def mp_deep(draw: st.DrawFn) -> bytes:
    """Arrays and maps nested up to 20,000 deep, closed or not."""
    openers = draw(
        st.lists(
            st.sampled_from(
                [
                    b"\x91",
                    b"\xdc\x00\x01",
                    b"\xdd\x00\x00\x00\x01",
                    b"\x81\xa1k",
                    b"\x81\xc0",
                    b"\xde\x00\x01\xa0",
                    b"\x81\xa3a\x00b",
                    b"\x81",
                ]
            ),
            min_size=1,
            max_size=3,
        )
    )
    depth = draw(st.integers(1, 20_000))
    return b"".join(openers) * depth + draw(mp_scalar)


@st.composite
def mp_huge(draw: st.DrawFn) -> bytes:
    """Arrays of up to 300k elements, maps of up to 100k entries, strings of up to 1 MB of NUL."""
    kind = draw(st.sampled_from(["array", "map", "str", "too_large"]))
    if kind == "array":
        n = draw(st.integers(70_000, 300_000))
        return (
            b"\xdd" + struct.pack(">I", n) + draw(st.sampled_from([b"\xc0", b"\x01", b"\x90"])) * n
        )
    if kind == "map":
        n = draw(st.integers(65, 100_000))
        keys = (b"\xa5" + b"K%04d" % (i % 10_000) for i in range(n))
        return b"\xdf" + struct.pack(">I", n) + b"".join(k + b"\x01" for k in keys)
    if kind == "str":
        return b"\xdb" + struct.pack(">I", 1 << 20) + b"\x00" * (1 << 20)
    return b"\xc0" * (MAX_PAYLOAD_BYTES + 1)


mp_any: st.SearchStrategy[bytes] = st.one_of(
    st.recursive(mp_scalar, _mp_containers, max_leaves=30),
    mp_deep(),
    mp_huge(),
)
_NUMERIC_HEADS = {*range(0x80), *range(0xE0, 0x100), *range(0xCA, 0xD4)}
mp_not_number = mp_any.filter(lambda b: b[0] not in _NUMERIC_HEADS)
"""Hostile where a number is expected: a number would be a legitimate value."""

# -- JSON, byte by byte -------------------------------------------------------------------------

json_scalar: st.SearchStrategy[bytes] = st.one_of(
    st.integers(-(10**30), 10**30).map(lambda n: str(n).encode()),
    st.floats().map(lambda x: repr(x).encode()),  # nan, inf: not JSON
    st.sampled_from(
        [
            b"true",
            b"false",
            b"null",
            b"1e999",
            b"-0",
            b"1E+2",
            b"NaN",
            b"Infinity",
            b"01",
            b"1.",
            b".5",
            b"+1",
            b"0x10",
            b"undefined",
            b"nul",
            b'"\\ud800"',
            b'"\\udc00\\ud800"',
        ]
    ),
    st.text(max_size=40).map(msgspec.json.encode),  # valid, NUL and controls as \u0000 escapes
    st.text(max_size=40).map(lambda s: b'"' + s.encode() + b'"'),  # raw controls: not JSON
    st.binary(max_size=40).map(lambda b: b'"' + b.replace(b'"', b"") + b'"'),  # maybe not UTF-8
)


def _json_containers(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    keys = st.text(max_size=12).map(msgspec.json.encode) | st.sampled_from([b'"a\\u0000b"', b"1"])
    return st.lists(children, max_size=6).map(lambda xs: b"[" + b",".join(xs) + b"]") | st.lists(
        st.tuples(keys, children), max_size=5
    ).map(lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}")


@st.composite
def json_deep(draw: st.DrawFn) -> bytes:
    """Arrays and objects nested up to 20,000 deep, closed or not."""
    opener, closer = draw(
        st.sampled_from([(b"[", b"]"), (b'{"k":', b"}"), (b'{"\\u0000":[', b"]}"), (b"[[", b"]]")])
    )
    depth = draw(st.integers(1, 20_000))
    tail = closer * depth if draw(st.booleans()) else b""
    return opener * depth + draw(json_scalar) + tail


@st.composite
def json_huge(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["array", "object", "escapes", "too_large"]))
    if kind == "array":
        return b"[" + b",".join([b"0"] * draw(st.integers(10_000, 300_000))) + b"]"
    if kind == "object":
        n = draw(st.integers(65, 50_000))
        return b"{" + b",".join(b'"K%d":1' % i for i in range(n)) + b"}"
    if kind == "escapes":
        return b'"' + b"\\u0000" * draw(st.integers(1, 200_000)) + b'"'
    return b"[" + b" " * MAX_PAYLOAD_BYTES + b"]"


json_any: st.SearchStrategy[bytes] = st.one_of(
    st.recursive(json_scalar, _json_containers, max_leaves=30),
    json_deep(),
    json_huge(),
)
json_not_number = json_any.filter(lambda b: not re.fullmatch(rb"-?[0-9][0-9.eE+-]*", b))

# -- hostile messages ---------------------------------------------------------------------------

unknown_keys = st.text(max_size=20).filter(lambda k: k not in FIELDS) | st.sampled_from(
    ["a\x00b", "\x00", "\x1b[2J", "\x7f", "\u0085", "\ufeff"]
)
bad_extra_keys = st.text(min_size=1, max_size=70).filter(
    lambda k: re.fullmatch(EXTRA_KEY_PATTERN, k) is None
)


def _valid_batch(vin: str) -> dict[str, Any]:
    return {
        "v": 1,
        "vin": vin,
        "batch": 1,
        "samples": [{"ts": 1_700_000_000_000_000, "seq": 1, "rpm": 900.0}],
    }


def _valid_ack(vin: str) -> dict[str, Any]:
    return {"v": 1, "vin": vin, "batches": [1]}


@st.composite
def hostile(draw: st.DrawFn, vin: str = VIN, *, ack: bool = False) -> bytes:
    """A message that must be refused: hostile bytes alone, or inside a valid batch or ack."""
    as_json = draw(st.booleans())
    anything, not_number = (json_any, json_not_number) if as_json else (mp_any, mp_not_number)
    encode_ = msgspec.json.encode if as_json else msgspec.msgpack.encode
    message = _valid_ack(vin) if ack else _valid_batch(vin)
    where = draw(
        st.sampled_from(
            ["whole", "top", "field", "trailing", "prefix"]
            + ([] if ack else ["sample", "extra_value", "extra_key"])
        )
    )
    if where == "whole":
        return draw(anything)
    if where == "top":
        message[draw(unknown_keys)] = msgspec.Raw(draw(anything))
    elif where == "sample":
        message["samples"][0][draw(unknown_keys)] = msgspec.Raw(draw(anything))
    elif where == "extra_value":
        message["samples"][0]["extra"] = {"TIMING_ADVANCE": msgspec.Raw(draw(not_number))}
    elif where == "extra_key":
        message["samples"][0]["extra"] = {draw(bad_extra_keys): 1.0}
    elif where == "field":
        # An array in place of a list of ids or samples could be a valid one: never an array.
        field = draw(st.sampled_from(sorted(message)))
        arrays = rb"[\[]" if as_json else rb"[\x90-\x9f\xdc\xdd]"
        value = draw(not_number.filter(lambda b: re.match(arrays, b) is None))
        message[field] = msgspec.Raw(value)
    elif where == "trailing":
        junk = draw(st.binary(min_size=1, max_size=64).filter(lambda b: b.strip(b" \t\r\n")))
        return encode_(message) + junk
    else:
        whole = encode_(message)
        return whole[: draw(st.integers(0, len(whole) - 1))]
    return encode_(message)


def _refused(decode: Callable[[bytes], object], payload: bytes) -> ContractError:
    """The ContractError for ``payload``: anything else (a message, another exception) fails."""
    with pytest.raises(ContractError) as info:
        decode(payload)
    error = info.value
    assert error.reason in CONTRACT_REASONS
    assert error.detail
    assert len(error.detail) <= MAX_DETAIL_CHARS
    assert UNPRINTABLE.search(error.detail) is None
    error.detail.encode()  # storable as UTF-8 text
    return error


_UNIT = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_UNIT
@given(hostile())
def test_hostile_batches_are_refused_with_a_contract_error_and_nothing_else(payload: bytes) -> None:
    """Every hostile batch gives a ContractError with a known reason and a printable detail."""
    _refused(lambda p: decode_batch(p, telemetry_topic(VIN)), payload)
    _refused(decode_ack, payload)


@_UNIT
@given(hostile(ack=True))
def test_hostile_acks_are_refused_with_a_contract_error_and_nothing_else(payload: bytes) -> None:
    """Every hostile ack gives a ContractError with a known reason and a printable detail."""
    _refused(decode_ack, payload)
    _refused(decode_batch, payload)


@_UNIT
@given(st.one_of(mp_any, json_any))
def test_hostile_bytes_reach_the_consumer_check_as_invalid_never_as_an_exception(
    payload: bytes,
) -> None:
    """consumer.validate.check turns any bytes into a Batch or an Invalid, never an exception."""
    verdict = check(payload, telemetry_topic(VIN), now_us=0, max_future_us=1, max_age_us=1)
    assert isinstance(verdict, Invalid)
    assert verdict.reason in CONTRACT_REASONS | set(CONSUMER_REASONS)


@_UNIT
@given(st.one_of(mp_any, json_any, st.binary(max_size=200)))
def test_the_version_walker_never_raises(payload: bytes) -> None:
    """Whatever the bytes, the walker that looks for `v` answers an int or None."""
    for walk in (msgpack_version, json_version):
        assert walk(payload) is None or isinstance(walk(payload), int)


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@_UNIT
@given(
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "v"), _plain, max_size=6),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 6),
)
def test_the_version_walker_finds_v_wherever_it_is(
    fields: dict[str, Any], v: int, position: int
) -> None:
    """`v` at any place among shallow fields is found in both wire forms, as msgspec encodes it."""
    items = list(fields.items())
    items.insert(min(position, len(items)), ("v", v))
    message = dict(items)
    assert msgpack_version(msgspec.msgpack.encode(message)) == v
    assert json_version(msgspec.json.encode(message)) == v


_DEEPEST = MAX_PAYLOAD_BYTES - 100
_NO_RECURSION = f"""
import sys
sys.setrecursionlimit(10**8)  # a recursive decoder now overflows the C stack instead of raising
import msgspec
from revline.contract import ContractError, decode_ack, decode_batch
deep = {{"mp": msgspec.Raw(b"\\x91" * {_DEEPEST} + b"\\x01"),
        "json": msgspec.Raw(b"[" * {_DEEPEST // 2} + b"]" * {_DEEPEST // 2})}}
for form, encode in (("mp", msgspec.msgpack.encode), ("json", msgspec.json.encode)):
    base = {{"v": 1, "vin": "{VIN}", "batch": 1, "samples": [{{"ts": 1, "seq": 1}}]}}
    payloads = [
        bytes(deep[form]),
        encode({{"unknown": deep[form], **base}}),
        encode({{"unknown": deep[form], **base, "v": 2}}),  # v behind it: not found
        encode({{**base, "samples": [{{"ts": 1, "seq": 1, "unknown": deep[form]}}]}}),
        encode({{**base, "samples": [{{"ts": 1, "seq": 1, "extra": {{"X": deep[form]}}}}]}}),
        encode({{**base, "v": deep[form]}}),
        encode({{"v": 1, "vin": "{VIN}", "batches": deep[form]}}),
    ]
    for payload in payloads:
        for decode in (decode_batch, decode_ack):
            try:
                decode(payload)
            except ContractError as exc:
                print(exc.reason)
"""


def test_nesting_as_deep_as_the_size_limit_allows_never_recurses() -> None:
    """~2 million levels, in every position, with the recursion limit out of the way: no crash."""
    result = subprocess.run(
        [sys.executable, "-c", _NO_RECURSION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]  # -11: the C stack overflowed
    reasons = result.stdout.split()
    assert len(reasons) == 2 * 7 * 2
    assert set(reasons) <= {"invalid", "undecodable"}


# -- consumer-side refusals (pure) --------------------------------------------------------------


def _batch_bytes(samples: list[Sample], vin: str = VIN, batch: int = 1) -> bytes:
    return encode(Batch(v=1, vin=vin, batch=batch, samples=samples))


def test_a_batch_repeating_an_identity_is_refused_as_duplicate_sample() -> None:
    """Defect 10: two samples with equal (ts, seq) refuse the batch, which is kept for its ack."""
    now = 1_700_000_000_000_000
    topic = telemetry_topic(VIN)
    twice = [Sample(ts=now, seq=1, speed=10.0), Sample(ts=now, seq=2), Sample(ts=now, seq=1)]
    verdict = check(_batch_bytes(twice), topic, now_us=now, max_future_us=1, max_age_us=10**12)
    assert isinstance(verdict, Invalid)
    assert verdict.reason == "duplicate_sample"
    assert f"({now}, 1)" in verdict.detail
    assert verdict.batch is not None
    # Same seq at another instant is another identity, and the same instant with another seq too.
    distinct = [Sample(ts=now, seq=1), Sample(ts=now + 1, seq=1), Sample(ts=now, seq=2)]
    ok = check(_batch_bytes(distinct), topic, now_us=now, max_future_us=1, max_age_us=10**12)
    assert isinstance(ok, Batch)


def test_a_sample_older_than_the_age_limit_refuses_the_batch_as_too_old() -> None:
    """Defect 11: one sample beyond max_age refuses the whole batch; at the limit it is accepted."""
    now = 1_700_000_000_000_000
    limit = 358 * 86_400_000_000
    topic = telemetry_topic(VIN)

    def verdict(oldest: int) -> AnyBatch | Invalid:
        samples = [Sample(ts=now, seq=2), Sample(ts=oldest, seq=1)]
        return check(_batch_bytes(samples), topic, now_us=now, max_future_us=1, max_age_us=limit)

    assert isinstance(verdict(now - limit), Batch)
    refused = verdict(now - limit - 1)
    assert isinstance(refused, Invalid)
    assert refused.reason == "too_old"
    assert refused.batch is not None
    epoch = verdict(0)
    assert isinstance(epoch, Invalid)
    assert epoch.reason == "too_old"
    assert "19675.9 days behind" in epoch.detail


def test_the_age_limit_is_a_week_inside_the_shipped_raw_retention(database_url: str) -> None:
    """max_age_s stays 7 days shorter than `revline migrate`'s raw retention on every date."""
    (row,) = query(
        database_url,
        "SELECT min(d - (d - $1::text::interval)) AS shortest "
        "FROM generate_series('2024-01-01'::timestamp, '2032-12-31', '1 day') AS d",
        MigrateSettings().raw_retention,
    )
    assert ConsumerSettings().max_age_s <= row["shortest"].total_seconds() - 7 * 86_400


# -- against a real consumer --------------------------------------------------------------------


def _draw(strategy: st.SearchStrategy[bytes], n: int) -> list[bytes]:
    """``n`` examples of ``strategy``, the same on every run (fixed seed, no example database)."""
    drawn: list[bytes] = []

    @seed(SEED)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    return drawn


def _reported(vin: str) -> list[bytes]:
    """The payloads of issue 12 that stopped the consumer (defects 1 and 3), each as reported."""
    deep_mp = msgspec.Raw(b"\x91" * 1_000 + b"\x01")
    deep_json = msgspec.Raw(b"[" * 1_000 + b"]" * 1_000)
    base = _valid_batch(vin)
    sample = base["samples"][0]
    return [
        msgspec.msgpack.encode({**base, "unknown": deep_mp}),
        msgspec.json.encode({**base, "unknown": deep_json}),
        msgspec.msgpack.encode({**base, "samples": [{**sample, "extra": {"X": deep_mp}}]}),
        msgspec.json.encode({**base, "samples": [{**sample, "extra": {"X": deep_json}}]}),
        msgspec.msgpack.encode({**base, "samples": [{**sample, "a\x00b": 1.0}]}),
        msgspec.json.encode({**base, "samples": [{**sample, "a\x00b": 1.0}]}),
        msgspec.msgpack.encode({**base, "samples": [{**sample, "extra": {"a\x00b": 1.0}}]}),
    ]


def _rejected_payloads(database_url: str) -> list[bytes]:
    rows = query(database_url, "SELECT payload FROM rejected ORDER BY id")
    return [bytes(row["payload"]) for row in rows]


def test_a_real_consumer_dead_letters_every_hostile_message_and_stores_every_valid_batch(
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Hostile messages among valid batches: each in `rejected` with its bytes, each batch once."""
    poison = _reported(unique_vin) + _draw(hostile(unique_vin), 40)
    valid = make_batches(unique_vin, 10 * len(poison), per_message=10)
    topic = telemetry_topic(unique_vin)
    consumer = make_consumer()
    pub = make_publisher()
    infos = []
    for batch, bad in zip(valid, poison, strict=True):
        infos += [pub.publish(topic, encode(batch)), pub.publish(topic, bad)]
    for info in infos:
        info.wait_for_publish(60)
    wait_until(
        lambda: (
            consumer.healthy()  # fails at once, with its log, if the consumer exited
            and len(_rejected_payloads(database_url)) >= len(poison)
            and cold_counts(database_url, unique_vin)[0] >= 10 * len(poison)
        ),
        what=f"{len(poison)} dead letters and every valid sample",
    )
    assert consumer.healthy()  # still running, broker and database up
    assert sorted(_rejected_payloads(database_url)) == sorted(poison)
    assert cold_counts(database_url, unique_vin) == (10 * len(poison), 10 * len(poison))
    rows = query(database_url, "SELECT reason, detail FROM rejected")
    assert {row["reason"] for row in rows} <= CONTRACT_REASONS
    assert all(UNPRINTABLE.search(row["detail"]) is None for row in rows)
    assert "Traceback" not in consumer.log_text()


def test_a_retained_poison_message_does_not_stop_new_consumers(
    make_mosquitto: MosquittoFactory,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Defect 1, retained: each brand-new consumer dead-letters the poison and goes on storing."""
    broker = make_mosquitto()
    poison = _reported(unique_vin)[0]
    topic = telemetry_topic(unique_vin)
    device = make_publisher(broker.url)
    device.client.publish(topic, poison, qos=1, retain=True).wait_for_publish(30)

    def stored_and_dead_lettered(consumer: ConsumerProcess, starts: int) -> bool:
        return (
            consumer.healthy()
            and cold_counts(database_url, unique_vin)[0] == 100 * starts
            and (len(_rejected_payloads(database_url)) == starts)
        )

    for index, batch in enumerate(make_batches(unique_vin, 200, per_message=100)):
        consumer = make_consumer(mqtt_url=broker.url, client_id=f"new-{index}")
        make_publisher(broker.url).publish_batches([batch])
        wait_until(
            functools.partial(stored_and_dead_lettered, consumer, index + 1),
            what="the batch stored and the poison dead-lettered",
        )
        assert consumer.healthy()
        assert consumer.terminate() == 0
        consumer.close()  # and its session: the next consumer is brand-new
    assert _rejected_payloads(database_url) == [poison, poison]
    assert cold_counts(database_url, unique_vin) == (200, 200)


def test_expired_and_repeated_samples_are_refused_with_their_own_reason_and_acked(
    database_url: str,
    unique_vin: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Defects 10 and 11: ts=0 is too_old, a repeated (ts, seq) duplicate_sample; both acked."""
    good = make_batches(unique_vin, 100, per_message=50, first_batch=3)
    newest = good[-1].samples[-1]
    too_old = Batch(v=1, vin=unique_vin, batch=1, samples=[Sample(ts=0, seq=1_000, speed=1.0)])
    # Newer than every good sample: had it been taken, the hot table would show 99 or 42.
    ts = newest.ts + 1_000_000
    repeated = [Sample(ts=ts, seq=2_000, speed=99.0), Sample(ts=ts, seq=2_000, speed=42.0)]
    duplicate = Batch(v=1, vin=unique_vin, batch=2, samples=repeated)
    consumer = make_consumer()
    make_publisher().publish_batches([too_old, good[0], duplicate, good[1]])
    wait_until(
        lambda: consumer.healthy() and sorted(ack_listener.seen()) == [1, 2, 3, 4],
        what="four acks",
    )
    assert consumer.healthy()
    rows = query(database_url, "SELECT reason, payload FROM rejected ORDER BY id")
    assert [(row["reason"], bytes(row["payload"])) for row in rows] == [
        ("too_old", encode(too_old)),
        ("duplicate_sample", encode(duplicate)),
    ]
    assert cold_counts(database_url, unique_vin) == (100, 100)
    (state,) = query(
        database_url, "SELECT seq, speed FROM vehicle_state WHERE vin = $1", unique_vin
    )
    assert (state["seq"], state["speed"]) == (newest.seq, newest.speed)


# -- against a real edge ------------------------------------------------------------------------


def test_hostile_acks_do_not_stop_a_running_edge(
    tmp_path: Path,
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Hostile acks, one retained: the edge keeps sampling and sending, and all of it is stored."""
    deep_ack = msgspec.msgpack.encode({**_valid_ack(unique_vin), "x": msgspec.Raw(b"\x91" * 1_000)})
    poison = [deep_ack, *_draw(hostile(unique_vin, ack=True), 30)]
    for payload in poison:  # a forged but valid ack would lose data: that is another defect
        _refused(decode_ack, payload)
    settings_ = edge_settings(tmp_path, unique_vin, mqtt_url)
    path = settings_.spool_path
    topic = ack_topic(unique_vin)
    consumer = make_consumer()
    attacker = make_publisher()
    try:
        # Retained: the edge gets it as soon as it subscribes, and again on every reconnect.
        attacker.client.publish(topic, deep_ack, qos=1, retain=True).wait_for_publish(30)
        with running_edge(settings_) as edge:
            wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= 100, what="data")
            for info in [attacker.publish(topic, payload) for payload in poison]:
                info.wait_for_publish(60)
            before = spooled(path)
            wait_until(
                lambda: (
                    consumer.healthy() and cold_counts(database_url, unique_vin)[0] >= before + 200
                ),
                what="samples taken after the hostile acks, stored",
            )
            assert edge.is_alive()
            # Every hostile ack is in the edge's own dead letters, raw bytes kept.
            wait_until(
                lambda: read_status(str(path)).rejected >= len(poison) + 1,
                what="every hostile ack dead-lettered by the edge",
            )
            letters = read_dead_letters(str(path))
            for payload in poison:
                assert any(
                    letter.size == len(payload) and payload.startswith(letter.payload)
                    for letter in letters
                ), payload[:40]
    finally:
        attacker.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(30)
    total = spooled(path)
    wait_until(
        lambda: cold_counts(database_url, unique_vin) == (total, total) and all_durable(path),
        what=f"all {total} spooled samples stored and acked",
    )
    assert consumer.healthy()
