"""The consumer benchmark's ack listener: its packet splitter, and its listener on a real broker."""

from __future__ import annotations

import pytest

from revline.bench.consumer import (
    _AckListener,
    _connect,
    _private_broker,
    _publish_packet,
    _publishes,
)
from revline.consumer.mqttwire import MQTT_311, publish_packet
from revline.contract import Ack, encode
from revline.tools.localservices import wait_until

VIN = "1HGCM82633A004352"


def _stream() -> tuple[bytes, list[bytes], list[int]]:
    """PUBLISHes at QoS 1 and 0 (bodies of 1-, 2- and 3-byte remaining lengths) among a PINGRESP
    and a PUBACK: the bytes, the payloads, the QoS 1 packet ids."""
    payloads = [b"a", b"b" * 200, b"c" * 20_000, b"", b"d"]
    stream = (
        publish_packet("ack/X", payloads[0], qos=1, mid=1, version=MQTT_311)
        + b"\xd0\x00"  # PINGRESP
        + publish_packet("ack/X", payloads[1], qos=0, mid=0, version=MQTT_311)
        + publish_packet("ack/X", payloads[2], qos=1, mid=65535, version=MQTT_311)
        + b"\x40\x02\x00\x07"  # PUBACK
        + publish_packet("ack/X", payloads[3], qos=1, mid=2, version=MQTT_311)
        + publish_packet("ack/X", payloads[4], qos=1, mid=3, version=MQTT_311)
    )
    return stream, payloads, [1, 65535, 2, 3]


def _read_in(chunks: list[bytes]) -> tuple[list[bytes], list[int], bytes]:
    """What the listener's reader makes of ``chunks`` arriving one recv at a time."""
    payloads: list[bytes] = []
    mids: list[int] = []
    buf = b""
    for chunk in chunks:
        buf += chunk
        more, more_mids, used = _publishes(buf)
        buf = buf[used:]
        payloads += more
        mids += more_mids
    return payloads, mids, buf


def test_the_splitter_reads_every_packet_wherever_the_reads_split_the_stream() -> None:
    """Split in two at every offset, or a byte a read: the same payloads and packet ids, in
    order, and nothing left over."""
    stream, payloads, mids = _stream()
    assert _read_in([stream]) == (payloads, mids, b"")
    assert _read_in([stream[i : i + 1] for i in range(len(stream))]) == (payloads, mids, b"")
    for cut in range(len(stream) + 1):
        assert _read_in([stream[:cut], stream[cut:]]) == (payloads, mids, b""), cut


def test_the_splitter_leaves_an_incomplete_packet_for_the_next_read() -> None:
    """A PUBLISH cut anywhere, its length field included, is neither read nor consumed."""
    packet = publish_packet("ack/X", b"x" * 300, qos=1, mid=9, version=MQTT_311)
    for cut in range(len(packet)):
        assert _publishes(packet[:cut]) == ([], [], 0)


def test_the_listener_records_acks_and_refuses_to_ignore_garbage() -> None:
    """On a broker of its own: each batch's first ack time is kept, a repeat does not move it,
    and an ack that does not decode is counted and makes check() raise."""
    with _private_broker() as url:
        acks = _AckListener(url)
        sender = _connect(url, "revline-test-ack-sender")
        try:
            sender.sendall(_publish_packet(f"ack/{VIN}", 1, encode(Ack(v=1, vin=VIN, batches=[4]))))
            wait_until(lambda: acks.count() == 1, what="the first ack", timeout=10)
            first = acks.acked[VIN, 4]
            acks.check()
            ack = Ack(v=1, vin=VIN, batches=[4, 5])
            sender.sendall(_publish_packet(f"ack/{VIN}", 2, encode(ack)))
            sender.sendall(_publish_packet(f"ack/{VIN}", 3, b"\xc1 not an ack"))
            wait_until(lambda: acks.count() == 2 and acks.bad == 1, what="the rest", timeout=10)
            assert acks.acked[VIN, 4] == first
            with pytest.raises(RuntimeError, match="1 end-to-end acks did not decode"):
                acks.check()
        finally:
            sender.close()
            acks.close()
        assert not acks.reader.is_alive()
