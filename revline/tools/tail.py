"""``revline tail``: watch decoded telemetry and acks on the broker, like ``mosquitto_sub``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid

import paho.mqtt.client as paho

from revline.contract import ContractError, decode_ack
from revline.mqtt import make_client, parse_mqtt_url
from revline.wire_v2 import decode_any

__all__ = ["format_message", "run"]



def _when(micros: int) -> str:
    return dt.datetime.fromtimestamp(micros / 1e6, tz=dt.UTC).isoformat(timespec="milliseconds")


def format_message(topic: str, payload: bytes, *, samples: bool = False) -> str:
    """One human line (plus one per sample if asked) for a message seen on the broker."""
    try:
        if topic.startswith("ack/"):
            ack = decode_ack(payload)
            return f"{topic}  ack batches={ack.batches}"
        batch = decode_any(payload, topic)  # v1 (MessagePack or JSON) or v2
    except ContractError as exc:
        return f"{topic}  REJECTED {exc}  ({len(payload)} bytes: {payload[:48]!r})"
    first, last = batch.samples[0], batch.samples[-1]
    line = (
        f"{topic}  batch={batch.batch} samples={len(batch.samples)} bytes={len(payload)} "
        f"seq={first.seq}..{last.seq} ts={_when(first.ts)}..{_when(last.ts)}"
    )
    if samples:
        for sample in batch.samples:
            values = {
                name: getattr(sample, name)
                for name in sample.__struct_fields__
                if name not in {"ts", "seq"} and getattr(sample, name) is not None
            }
            line += f"\n    {_when(sample.ts)} seq={sample.seq} {values}"
    return line


def run(args: argparse.Namespace) -> int:
    """Subscribe without a session of its own and print until interrupted or --count is reached."""


    address = parse_mqtt_url(args.mqtt_url)
    client = make_client(address, f"revline-tail-{uuid.uuid4().hex[:8]}")
    seen = 0

    def on_connect(
        client: paho.Client, _u: object, _f: object, rc: object, _p: object = None
    ) -> None:
        client.subscribe([(f"telemetry/{args.vin}", 0), (f"ack/{args.vin}", 0)])
        print(f"# connected to {address} ({rc}); waiting for messages", file=sys.stderr)

    def on_message(client: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        nonlocal seen
        print(format_message(msg.topic, bytes(msg.payload), samples=args.samples), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            client.disconnect()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(address.host, address.port)
    client.loop_forever()
    return 0
