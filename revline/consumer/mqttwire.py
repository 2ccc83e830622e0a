"""The MQTT 5 / 3.1.1 packets the consumer's subscriber sends and reads: pure bytes, no I/O.

Only what a persistent QoS 1 subscriber needs (OASIS MQTT 5.0 and 3.1.1, section 3 of each):
CONNECT, SUBSCRIBE, PUBLISH (our end-to-end acks), PUBACK, PINGREQ and DISCONNECT out; CONNACK,
PUBLISH, PUBACK, SUBACK, PINGRESP and DISCONNECT in. Whatever the broker sends is untrusted
input: a packet that does not parse raises :class:`ProtocolError` and nothing else, and the
subscriber drops the connection (the broker keeps the session and redelivers).

The hot path (splitting a buffer into packets and reading PUBLISH) is written out in
:func:`split` and :func:`read_publish` for the subscriber's receive loop to call per packet.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "MQTT_5",
    "MQTT_311",
    "PINGREQ_PACKET",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "Connack",
    "ProtocolError",
    "connack_reason",
    "connect_packet",
    "disconnect_packet",
    "disconnect_reason",
    "puback_packets",
    "publish_packet",
    "read_connack",
    "read_disconnect",
    "read_puback",
    "read_publish",
    "read_suback",
    "split",
    "subscribe_packet",
]

MQTT_311 = 4
MQTT_5 = 5

CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBACK = 9
PINGRESP = 13
DISCONNECT = 14

PINGREQ_PACKET = b"\xc0\x00"
MAX_REMAINING_LENGTH = 268_435_455
"""The largest remaining length four varint bytes can say (MQTT 2.1.4 / 1.5.5)."""


class ProtocolError(Exception):
    """The broker sent something that is not a valid packet here; the connection must go."""


# -- encoding -------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError("an MQTT string is at most 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING_LENGTH:
        raise ValueError("packet too large for MQTT")
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(
    *,
    client_id: str,
    version: int,
    keepalive_s: int,
    username: str | None = None,
    password: str | None = None,
    session_expiry_s: int = 0,
    receive_maximum: int = 65_535,
) -> bytes:
    """CONNECT for a persistent session: clean start (3.1.1: clean session) false; in MQTT 5 with
    the session expiry and the Receive Maximum (how many unacked QoS 1 messages the broker may
    have in flight to us)."""
    flags = 0
    if username is not None:
        flags |= 0x80
        if password is not None:
            flags |= 0x40
    name = b"\x00\x04MQTT"
    header = name + bytes((version, flags)) + max(0, min(keepalive_s, 0xFFFF)).to_bytes(2, "big")
    if version == MQTT_5:
        props = (
            b"\x11"
            + max(0, min(session_expiry_s, 0xFFFFFFFF)).to_bytes(4, "big")
            + b"\x21"
            + max(1, min(receive_maximum, 0xFFFF)).to_bytes(2, "big")
        )
        header += _varint(len(props)) + props
    payload = _string(client_id)
    if username is not None:
        payload += _string(username)
        if password is not None:
            payload += _string(password)
    return _packet(0x10, header + payload)


def subscribe_packet(mid: int, topic_filter: str, *, version: int, qos: int = 1) -> bytes:
    """SUBSCRIBE to one filter at ``qos`` (MQTT 5 options: no local off, retain handling 0)."""
    props = b"\x00" if version == MQTT_5 else b""
    body = mid.to_bytes(2, "big") + props + _string(topic_filter) + bytes((qos,))
    return _packet(0x82, body)


def publish_packet(
    topic: str, payload: bytes, *, qos: int, mid: int, version: int, dup: bool = False
) -> bytes:
    """PUBLISH ``payload`` on ``topic`` (no retain, no properties)."""
    first = 0x30 | (qos << 1) | (0x08 if dup and qos else 0)
    body = _string(topic)
    if qos:
        body += mid.to_bytes(2, "big")
    if version == MQTT_5:
        body += b"\x00"
    return _packet(first, body + payload)


_PUBACK = struct.Struct("!BBH")


def puback_packets(mids: Sequence[int]) -> bytes:
    """The PUBACK packets for ``mids``, in order, as one byte string (fixed header 0x40,
    remaining length 2, the packet id; MQTT 5 allows leaving out the reason code when it is 0,
    success, and the properties with it)."""
    pack = _PUBACK.pack
    return b"".join([pack(0x40, 2, mid) for mid in mids])


def disconnect_packet() -> bytes:
    """A normal DISCONNECT: in MQTT 5 (reason 0, no properties: the session expiry given at
    CONNECT stands) as in 3.1.1 two bytes."""
    return b"\xe0\x00"


# -- decoding -------------------------------------------------------------------------------------


def split(buf: bytes, pos: int) -> tuple[int, int, int] | None:
    """The packet starting at ``buf[pos]``: (its first byte, where its body starts, where it
    ends), or None while it is incomplete. A malformed remaining length is a ProtocolError."""
    n = len(buf)
    i = pos + 1
    length = 0
    shift = 0
    while True:
        if i >= n:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 21:
            raise ProtocolError("remaining length longer than 4 bytes")
    return buf[pos], i, i + length


def _read_varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if i >= end:
            raise ProtocolError("truncated variable byte integer")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than 4 bytes")


def read_publish(
    first: int, buf: bytes, start: int, end: int, version: int
) -> tuple[str, bytes, int, int, bool]:
    """A PUBLISH body ``buf[start:end]``: (topic, payload, qos, packet id, dup).

    The topic is decoded as UTF-8 with bad bytes replaced (a broker should have refused it; if
    not, the message is still delivered, and dead-lettered by topic, never a crash). QoS 2 or 3
    and a QoS 1 packet id of 0 are protocol errors; an empty topic too (we allow no topic
    aliases).
    """
    qos = (first >> 1) & 3
    if qos > 1:
        # QoS 3 does not exist; QoS 2 needs a PUBREC exchange, and we subscribe at QoS 1.
        raise ProtocolError(f"PUBLISH at QoS {qos} on a QoS 1 subscription")
    p = start + 2
    if p > end:
        raise ProtocolError("PUBLISH shorter than its topic length")
    t_end = p + ((buf[start] << 8) | buf[start + 1])
    if t_end > end:
        raise ProtocolError("PUBLISH topic longer than the packet")
    topic = buf[p:t_end].decode("utf-8", "replace")
    p = t_end
    mid = 0
    if qos:
        if p + 2 > end:
            raise ProtocolError("PUBLISH without its packet id")
        mid = (buf[p] << 8) | buf[p + 1]
        if mid == 0:
            raise ProtocolError("PUBLISH with packet id 0")
        p += 2
    if version == MQTT_5:
        if p < end and buf[p] == 0:
            p += 1  # no properties: the usual case
        else:
            props, p = _read_varint(buf, p, end)
            p += props
            if p > end:
                raise ProtocolError("PUBLISH properties longer than the packet")
    if not topic:
        raise ProtocolError("PUBLISH without a topic (aliases are not allowed)")
    return topic, buf[p:end], qos, mid, bool(first & 0x08)


@dataclass(frozen=True, slots=True)
class Connack:
    """What the broker said to our CONNECT."""

    session_present: bool
    code: int
    """0 on success; in MQTT 3.1.1 terms (1-5) or MQTT 5 terms (>= 128)."""
    receive_maximum: int = 65_535
    """How many of our QoS 1 PUBLISHes the broker takes unacked (MQTT 5; else the maximum)."""
    server_keepalive_s: int | None = None
    """The keepalive the broker imposes (MQTT 5 Server Keep Alive), if any."""
    reason_string: str = ""


# Property identifier -> its encoding (MQTT 5, 2.2.2.2): 1, 2, 4 bytes, varint, string, binary
# data, string pair.
_PROPERTY_TYPES: dict[int, str] = {
    0x01: "b", 0x02: "i", 0x03: "s", 0x08: "s", 0x09: "d", 0x0B: "v", 0x11: "i", 0x12: "s",
    0x13: "h", 0x15: "s", 0x16: "d", 0x17: "b", 0x18: "i", 0x19: "b", 0x1A: "s", 0x1C: "s",
    0x1F: "s", 0x21: "h", 0x22: "h", 0x23: "h", 0x24: "b", 0x25: "b", 0x26: "p", 0x27: "i",
    0x28: "b", 0x29: "b", 0x2A: "b",
}  # fmt: skip


def _read_properties(buf: bytes, i: int, end: int) -> tuple[dict[int, int | bytes], int]:
    """The properties at ``buf[i]`` (their length first): {identifier: value}, and where they
    end. Strings and binary data come back as bytes; a repeated User Property keeps the last."""
    length, i = _read_varint(buf, i, end)
    stop = i + length
    if stop > end:
        raise ProtocolError("properties longer than the packet")
    props: dict[int, int | bytes] = {}
    while i < stop:
        ident, i = _read_varint(buf, i, stop)
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        if kind in "bhi":
            size = {"b": 1, "h": 2, "i": 4}[kind]
            if i + size > stop:
                raise ProtocolError("truncated property")
            props[ident] = int.from_bytes(buf[i : i + size], "big")
            i += size
        elif kind == "v":
            props[ident], i = _read_varint(buf, i, stop)
        else:
            for _ in range(2 if kind == "p" else 1):
                if i + 2 > stop:
                    raise ProtocolError("truncated property")
                s_end = i + 2 + int.from_bytes(buf[i : i + 2], "big")
                if s_end > stop:
                    raise ProtocolError("truncated property")
                props[ident] = buf[i + 2 : s_end]
                i = s_end
    return props, stop


def read_connack(body: bytes, version: int) -> Connack:
    """A CONNACK body. An MQTT 3.1.1 broker answers a v5 CONNECT with a 2-byte CONNACK (code 1,
    unacceptable protocol version): read without properties whatever the version."""
    if len(body) < 2:
        raise ProtocolError("CONNACK shorter than 2 bytes")
    session_present, code = bool(body[0] & 1), body[1]
    if version != MQTT_5 or len(body) == 2:
        return Connack(session_present, code)
    props, _ = _read_properties(body, 2, len(body))
    receive_maximum = props.get(0x21, 65_535)
    keepalive = props.get(0x13)
    reason = props.get(0x1F, b"")
    return Connack(
        session_present,
        code,
        receive_maximum=receive_maximum if isinstance(receive_maximum, int) else 65_535,
        server_keepalive_s=keepalive if isinstance(keepalive, int) else None,
        reason_string=reason.decode("utf-8", "replace") if isinstance(reason, bytes) else "",
    )


def read_puback(body: bytes) -> int:
    """A PUBACK body: the packet id (a failure reason code is not ours to act on: the e2e ack is
    given up like a delivered one; the edge re-sends what it never sees acked)."""
    if len(body) < 2:
        raise ProtocolError("PUBACK shorter than 2 bytes")
    return (body[0] << 8) | body[1]


def read_suback(body: bytes, version: int) -> tuple[int, list[int]]:
    """A SUBACK body: (packet id, the granted QoS or failure code per filter)."""
    if len(body) < 3:
        raise ProtocolError("SUBACK shorter than 3 bytes")
    mid = (body[0] << 8) | body[1]
    i = 2
    if version == MQTT_5:
        _, i = _read_properties(body, 2, len(body))
    codes = list(body[i:])
    if not codes:
        raise ProtocolError("SUBACK without a return code")
    return mid, codes


def read_disconnect(body: bytes, version: int) -> int:
    """A DISCONNECT from the broker (MQTT 5): its reason code (0 when left out)."""
    if version != MQTT_5 or not body:
        return 0
    return body[0]


_REASONS = {
    0: "Success",
    4: "Disconnect with will message",
    128: "Unspecified error",
    129: "Malformed packet",
    130: "Protocol error",
    131: "Implementation specific error",
    132: "Unsupported protocol version",
    133: "Client identifier not valid",
    134: "Bad user name or password",
    135: "Not authorized",
    136: "Server unavailable",
    137: "Server busy",
    138: "Banned",
    139: "Server shutting down",
    140: "Bad authentication method",
    141: "Keep alive timeout",
    142: "Session taken over",
    143: "Topic filter invalid",
    144: "Topic name invalid",
    147: "Receive maximum exceeded",
    148: "Topic alias invalid",
    149: "Packet too large",
    150: "Message rate too high",
    151: "Quota exceeded",
    152: "Administrative action",
    153: "Payload format invalid",
    154: "Retain not supported",
    155: "QoS not supported",
    156: "Use another server",
    157: "Server moved",
    158: "Shared subscriptions not supported",
    159: "Connection rate exceeded",
    160: "Maximum connect time",
    161: "Subscription identifiers not supported",
    162: "Wildcard subscriptions not supported",
}
_CONNACK_311 = {
    1: 132,  # unacceptable protocol version
    2: 133,  # identifier rejected
    3: 136,  # server unavailable
    4: 134,  # bad user name or password
    5: 135,  # not authorized
}


def connack_reason(code: int, version: int) -> tuple[str, int]:
    """A refusing CONNACK's code as (name, MQTT 5 code), 3.1.1 codes mapped to their v5 twins
    (as paho reports them)."""
    if version != MQTT_5 or code < 128:
        code = _CONNACK_311.get(code, code)
    return _REASONS.get(code, "Unknown reason"), code


def disconnect_reason(code: int) -> str:
    """A DISCONNECT reason code's name."""
    if code == 0:
        return "Normal disconnection"
    return _REASONS.get(code, f"reason {code}")
