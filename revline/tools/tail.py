"""``revline tail``: watch decoded telemetry and acks on the broker, like ``mosquitto_sub``.

Every payload is untrusted: what does not decode is shown with its reason and its first bytes in
hex (``--json``: all its bytes in base64), never as a Python repr. ``--json`` prints one JSON
object per message, for ``jq``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import sys
import uuid
from typing import Any

import msgspec
import paho.mqtt.client as paho

from revline.contract import ContractError, decode_ack, printable
from revline.mqtt import ConnectError, MqttClientSettings, connect_blocking
from revline.settings import flag_values, load
from revline.wire_v2 import decode_any

__all__ = ["format_json", "format_message", "run"]

_HEAD_BYTES = 48
"""Bytes of an undecodable payload shown in a human line."""


def _when(micros: int) -> str:
    try:
        return dt.datetime.fromtimestamp(micros / 1e6, tz=dt.UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):  # decoded, but out of datetime's range
        return str(micros)


def _values(sample: msgspec.Struct) -> dict[str, Any]:
    """The fields a sample carries (``extra`` included), without ``ts`` and ``seq``."""
    return {
        name: getattr(sample, name)
        for name in sample.__struct_fields__
        if name not in {"ts", "seq"} and getattr(sample, name) is not None
    }


def _decode(topic: str, payload: bytes) -> tuple[str, Any]:
    """("ack", Ack) or ("batch", Batch); ContractError for anything else."""
    if topic.startswith("ack/"):
        return "ack", decode_ack(payload)
    return "batch", decode_any(payload, topic)  # v1 (MessagePack or JSON) or v2


def format_message(topic: str, payload: bytes, *, samples: bool = False) -> str:
    """One human line (plus one per sample if asked) for a message seen on the broker."""
    shown = printable(topic)
    try:
        kind, message = _decode(topic, payload)
    except ContractError as exc:
        head = payload[:_HEAD_BYTES].hex(" ")
        more = " ..." if len(payload) > _HEAD_BYTES else ""
        return f"{shown}  REJECTED {printable(str(exc))}  ({len(payload)} bytes: {head}{more})"
    if kind == "ack":
        return f"{shown}  ack batches={message.batches}"
    first, last = message.samples[0], message.samples[-1]
    line = (
        f"{shown}  batch={message.batch} samples={len(message.samples)} bytes={len(payload)} "
        f"seq={first.seq}..{last.seq} ts={_when(first.ts)}..{_when(last.ts)}"
    )
    if samples:
        for sample in message.samples:
            values = " ".join(
                f"{name}={printable(str(value))}" for name, value in _values(sample).items()
            )
            line += f"\n    {_when(sample.ts)} seq={sample.seq} {values}"
    return line


def format_json(topic: str, payload: bytes, *, samples: bool = False) -> str:
    """One JSON object (one line) for a message seen on the broker: ``type`` is ``batch``,
    ``ack`` or ``rejected`` (then ``reason``, ``detail`` and the payload in ``base64``)."""
    out: dict[str, Any] = {"topic": topic, "bytes": len(payload)}
    try:
        kind, message = _decode(topic, payload)
    except ContractError as exc:
        out |= {
            "type": "rejected",
            "reason": exc.reason,
            "detail": exc.detail,
            "base64": base64.b64encode(payload).decode("ascii"),
        }
        return msgspec.json.encode(out).decode()
    if kind == "ack":
        out |= {"type": "ack", "vin": message.vin, "batches": message.batches}
        return msgspec.json.encode(out).decode()
    first, last = message.samples[0], message.samples[-1]
    out |= {
        "type": "batch",
        "vin": message.vin,
        "batch": message.batch,
        "count": len(message.samples),
        "first_seq": first.seq,
        "last_seq": last.seq,
        "first_ts": _when(first.ts),
        "last_ts": _when(last.ts),
    }
    if samples:
        out["samples"] = [
            {"ts": s.ts, "time": _when(s.ts), "seq": s.seq, **_values(s)} for s in message.samples
        ]
    # msgspec writes valid JSON whatever the values: bytes as base64, NaN and inf as null,
    # every string escaped.
    return msgspec.json.encode(out).decode()


def run(args: argparse.Namespace) -> int:
    """Subscribe without a session of its own and print until interrupted or --count is reached."""
    settings = load(MqttClientSettings, flags=flag_values(args, MqttClientSettings))
    address = settings.address
    client = settings.client(f"revline-tail-{uuid.uuid4().hex[:8]}")
    topics = [(f"telemetry/{args.vin}", 0), (f"ack/{args.vin}", 0)]
    show = format_json if args.json else format_message
    seen = 0

    def on_connect(
        client: paho.Client, _u: object, _f: object, _rc: object, _p: object = None
    ) -> None:
        client.subscribe(topics)  # again after paho reconnected on its own

    def on_message(client: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        nonlocal seen
        print(show(msg.topic, bytes(msg.payload), samples=args.samples), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            client.disconnect()

    try:
        connect_blocking(client, address)
    except ConnectError as exc:
        print(f"revline tail: {exc}", file=sys.stderr)
        return 1
    client.on_connect = on_connect
    client.on_message = on_message
    client.subscribe(topics)
    print(f"# connected to {address}; waiting for messages", file=sys.stderr)
    client.loop_forever()
    return 0
