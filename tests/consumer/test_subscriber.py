"""The subscriber's MQTT packets (revline/consumer/mqttwire.py): what we send parses back, and
whatever a broker sends either parses or is a clean ProtocolError."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from revline.consumer import mqttwire as wire
from revline.consumer.mqttwire import MQTT_5, MQTT_311, ProtocolError
from revline.consumer.subscriber import Inbound, Subscriber, _Connection
from revline.mqtt import BrokerAddress, drop_session, parse_mqtt_url
from tests.fixtures.consumer import PublisherFactory

versions = st.sampled_from([MQTT_5, MQTT_311])
topics = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1
).filter(lambda t: len(t.encode()) <= 0xFFFF)


def _packets(buf: bytes) -> list[tuple[int, bytes, int, int]]:
    """Split ``buf`` whole: (first byte, buf, body start, end) per packet."""
    out = []
    pos = 0
    while pos < len(buf):
        packet = wire.split(buf, pos)
        assert packet is not None
        first, start, end = packet
        assert end <= len(buf)
        out.append((first, buf, start, end))
        pos = end
    return out


@given(
    topic=topics,
    payload=st.binary(max_size=3000),
    qos=st.sampled_from([0, 1]),
    mid=st.integers(1, 0xFFFF),
    dup=st.booleans(),
    version=versions,
)
def test_a_publish_reads_back_as_written(
    topic: str, payload: bytes, qos: int, mid: int, dup: bool, version: int
) -> None:
    """Topic, payload, QoS, packet id and DUP survive encoding and splitting."""
    packet = wire.publish_packet(topic, payload, qos=qos, mid=mid, version=version, dup=dup)
    [(first, buf, start, end)] = _packets(packet)
    assert first >> 4 == wire.PUBLISH
    got = wire.read_publish(first, buf, start, end, version)
    assert got == (topic, payload, qos, mid if qos else 0, dup and qos == 1)


@given(
    messages=st.lists(st.tuples(topics, st.binary(max_size=300)), min_size=1, max_size=20),
    version=versions,
    cut=st.integers(0, 10_000),
)
def test_a_stream_cut_anywhere_splits_into_the_same_packets(
    messages: list[tuple[str, bytes]], version: int, cut: int
) -> None:
    """A read ending inside a packet (or its length) leaves it incomplete, never misread."""
    stream = b"".join(
        wire.publish_packet(t, p, qos=1, mid=i + 1, version=version)
        for i, (t, p) in enumerate(messages)
    )
    cut %= len(stream) + 1
    head = stream[:cut]
    pos = 0
    while (packet := wire.split(head, pos)) is not None and packet[2] <= len(head):
        pos = packet[2]
    # Everything before pos is whole packets; the rest waits for more bytes.
    whole = _packets(stream)
    ends = [end for *_, end in whole]
    assert pos == 0 or pos in ends
    assert all(end > len(head) for end in ends if end > pos)


@given(garbage=st.binary(max_size=200), version=versions)
def test_garbage_from_a_broker_is_a_protocol_error_or_parses(garbage: bytes, version: int) -> None:
    """No input makes the readers raise anything but ProtocolError."""
    for reader in (
        lambda b: wire.read_connack(b, version),
        lambda b: wire.read_suback(b, version),
        wire.read_puback,
        lambda b: wire.read_disconnect(b, version),
    ):
        with contextlib.suppress(ProtocolError):
            reader(garbage)
    pos = 0
    with contextlib.suppress(ProtocolError):
        while (packet := wire.split(garbage, pos)) is not None:
            first, start, end = packet
            if end > len(garbage):
                break
            if first >> 4 == wire.PUBLISH:
                wire.read_publish(first, garbage, start, end, version)
            pos = end


def test_a_topic_that_is_not_utf8_is_delivered_replaced_not_raised() -> None:
    """A broker that lets a bad topic through does not crash the consumer: the topic is
    replaced, which the validator then dead-letters (no telemetry/<vin> matches it)."""
    body = b"\x00\x03\xff\xfe/" + b"\x00\x07" + b"\x00" + b"payload"
    topic, payload, qos, mid, _ = wire.read_publish(0x32, body, 0, len(body), MQTT_5)
    assert (topic, payload, qos, mid) == ("\ufffd\ufffd/", b"payload", 1, 7)


@pytest.mark.parametrize(
    ("first", "body", "why"),
    [
        (0x34, b"\x00\x01t\x00\x01\x00", "QoS 2"),
        (0x36, b"\x00\x01t\x00\x01\x00", "QoS 3"),
        (0x32, b"\x00\x01t\x00\x00\x00", "packet id 0"),
        (0x32, b"\x00\x09t\x00\x01", "topic longer"),
        (0x30, b"\x00\x00\x00", "without a topic"),
        (0x32, b"\x00\x01t\x00\x01\x05\x01", "properties longer"),
    ],
)
def test_a_malformed_publish_is_refused(first: int, body: bytes, why: str) -> None:
    """Each malformation has its own ProtocolError."""
    with pytest.raises(ProtocolError, match=why):
        wire.read_publish(first, body, 0, len(body), MQTT_5)


def test_a_remaining_length_of_five_bytes_is_refused() -> None:
    """MQTT's remaining length has at most 4 bytes (2.1.4)."""
    with pytest.raises(ProtocolError):
        wire.split(b"\x30\xff\xff\xff\xff\x01", 0)
    assert wire.split(b"\x30\xff\xff\xff", 0) is None  # not complete yet


def test_a_v5_connack_reads_its_properties_and_a_311_answer_reads_too() -> None:
    """Receive Maximum, Server Keep Alive and the reason string; a 3.1.1 broker's 2-byte
    CONNACK to our v5 CONNECT is its refusal code 1."""
    reason = b"go away"
    props = b"\x21\x00\x14\x13\x00\x0a\x1f" + len(reason).to_bytes(2, "big") + reason
    body = b"\x01\x00" + bytes((len(props),)) + props
    connack = wire.read_connack(body, MQTT_5)
    assert connack == wire.Connack(True, 0, 20, 10, "go away")
    assert wire.read_connack(b"\x00\x01", MQTT_5).code == 1
    assert wire.connack_reason(1, MQTT_5) == ("Unsupported protocol version", 132)
    assert wire.connack_reason(5, MQTT_311) == ("Not authorized", 135)
    assert wire.connack_reason(135, MQTT_5) == ("Not authorized", 135)


@pytest.mark.parametrize("version", [MQTT_5, MQTT_311])
def test_connect_and_subscribe_are_what_paho_sends(version: int) -> None:
    """Our CONNECT and SUBSCRIBE are byte for byte paho's for the same session (paho is the
    reference the consumer used before)."""
    protocol = paho.MQTTv5 if version == MQTT_5 else paho.MQTTv311
    client: Any = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="c-1",
        protocol=protocol,
        clean_session=None if version == MQTT_5 else False,
    )
    client.username_pw_set("user", "p@ss")
    sent: list[bytes] = []

    def queue(_cmd: int, packet: bytes, *_args: object, **_kwargs: object) -> MQTTErrorCode:
        sent.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._packet_queue = queue
    client._keepalive = 30
    if version == MQTT_5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 86_400
        props.ReceiveMaximum = 1_000
        client._connect_properties = props
        client._clean_start = False
    client._send_connect(30)
    ours = wire.connect_packet(
        client_id="c-1",
        version=version,
        keepalive_s=30,
        username="user",
        password="p@ss",
        session_expiry_s=86_400,
        receive_maximum=1_000,
    )
    assert sent == [ours]


def _connection(
    version: int, *, max_inflight_bytes: int = 1 << 20
) -> tuple[Subscriber, _Connection]:
    """A subscriber and a connection with no socket (writes go nowhere), generation 1."""
    sub = Subscriber(
        BrokerAddress("broker.invalid", 1883),
        client_id="c-1",
        subscription="telemetry/+",
        max_inflight_bytes=max_inflight_bytes,
    )
    conn = _Connection(sub, version)
    sub._conn = conn
    sub.connected = True
    sub.generation = conn.generation = 1
    return sub, conn


def _drain(sub: Subscriber) -> list[Inbound]:
    got = []
    while not sub.inbound.empty():
        item = sub.inbound.get_nowait()
        assert item is not None
        got.append(item)
    return got


@given(
    messages=st.lists(st.tuples(topics, st.binary(max_size=500)), min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=40),
    version=versions,
)
def test_any_split_of_the_byte_stream_delivers_the_same_messages_in_order(
    messages: list[tuple[str, bytes]], cuts: list[int], version: int
) -> None:
    """However TCP cuts the stream into reads, every PUBLISH arrives once, whole, in order."""
    stream = b"".join(
        wire.publish_packet(t, p, qos=1, mid=i + 1, version=version)
        + (b"\xd0\x00" if i % 3 == 0 else b"")  # a PINGRESP now and then
        for i, (t, p) in enumerate(messages)
    )

    async def run() -> list[Inbound]:
        sub, conn = _connection(version)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for start, end in itertools.pairwise(points):
            conn.data_received(stream[start:end])
        return _drain(sub)

    got = asyncio.run(run())
    assert [(g.topic, g.payload, g.mid, g.generation) for g in got] == [
        (t, p, i + 1, 1) for i, (t, p) in enumerate(messages)
    ]


def test_a_full_byte_budget_pauses_reading_and_acks_resume_it() -> None:
    """Past max_inflight_bytes held, what was read waits unparsed; acking frees room and the
    rest is delivered, in order, nothing lost."""
    payloads = [bytes([i]) * 400 for i in range(10)]
    stream = b"".join(
        wire.publish_packet("telemetry/X", p, qos=1, mid=i + 1, version=MQTT_5)
        for i, p in enumerate(payloads)
    )

    async def run() -> list[bytes]:
        sub, conn = _connection(MQTT_5, max_inflight_bytes=1000)
        conn.data_received(stream)
        delivered: list[bytes] = []
        while True:
            got = _drain(sub)
            if not got:
                break
            assert conn.paused or len(delivered) + len(got) == len(payloads)
            for item in got:
                sub.hold(item, len(item.payload))
            delivered.extend(item.payload for item in got)
            sub.ack(got)  # frees the budget: parsing resumes where it stopped
        assert not conn.paused
        assert sub.budget.in_flight == 0
        return delivered

    assert asyncio.run(run()) == payloads


def test_a_malformed_packet_drops_the_connection_not_the_process() -> None:
    """A PUBLISH at QoS 3 from a broken broker: the connection is aborted, nothing raised."""

    async def run() -> str | None:
        sub, conn = _connection(MQTT_5)
        conn.data_received(b"\x36\x05\x00\x01t\x00\x01")
        assert _drain(sub) == []
        return conn.disconnect_reason

    reason = asyncio.run(run())
    assert reason is not None
    assert "QoS 3" in reason


async def _session(
    url: str, client_id: str, subscription: str, version: int, count: int, ack: int
) -> list[Inbound]:
    """Connect as ``client_id``, take ``count`` messages, PUBACK the first ``ack``, leave."""
    sub = Subscriber(parse_mqtt_url(url), client_id=client_id, subscription=subscription)
    sub.protocol = version
    got: list[Inbound] = []
    async with sub, asyncio.timeout(60):
        while len(got) < count:
            item = await sub.inbound.get()
            assert item is not None
            got.append(item)
        if ack:
            assert sub.ack(got[:ack]) == ack
        await asyncio.sleep(0)  # the PUBACKs written before the DISCONNECT
    return got


@pytest.mark.parametrize("version", [MQTT_5, MQTT_311])
def test_the_session_keeps_what_was_not_acked_in_mqtt_5_and_3_1_1(
    mqtt_url: str, make_publisher: PublisherFactory, version: int
) -> None:
    """Against the real Mosquitto, in either protocol version: messages queued while away arrive
    on reconnect; those PUBACKed are gone after the next reconnect, the others come back (DUP),
    and nothing else arrives before a new message."""
    client_id = f"t-sub-{secrets.token_hex(4)}"
    root = f"t{secrets.token_hex(4)}"
    url = mqtt_url
    publisher = make_publisher()

    def publish(*names: str) -> None:
        for info in [publisher.publish(f"{root}/{name}", name.encode()) for name in names]:
            info.wait_for_publish(60)

    try:
        asyncio.run(_session(url, client_id, f"{root}/+", version, 0, 0))  # the session exists
        publish("a", "b", "c", "d")
        first = asyncio.run(_session(url, client_id, f"{root}/+", version, 4, 2))
        assert [m.payload for m in first] == [b"a", b"b", b"c", b"d"]
        again = asyncio.run(_session(url, client_id, f"{root}/+", version, 2, 2))
        assert [(m.payload, m.dup) for m in again] == [(b"c", True), (b"d", True)]
        publish("e")
        last = asyncio.run(_session(url, client_id, f"{root}/+", version, 1, 1))
        assert [(m.topic, m.payload) for m in last] == [(f"{root}/e", b"e")]
    finally:
        drop_session(parse_mqtt_url(url), client_id)
