"""Helpers for the edge tests: a tiny real MQTT acker standing in for the consumer.

The acker subscribes to ``telemetry/<vin>``, decodes every batch with the contract and answers
with an :class:`revline.contract.Ack` on ``ack/<vin>``, like the consumer does after its commit.
It records what arrived, in order, so tests can check identities, duplicates and ordering.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from revline.contract import Ack, Batch, ack_topic, decode_batch, encode, telemetry_topic
from revline.mqtt import make_client, parse_mqtt_url


@dataclass
class Acker:
    """What a running acker has seen; ``acking`` can be switched off to play a dead consumer."""

    vin: str
    batches: list[Batch] = field(default_factory=list)
    acking: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seqs(self) -> list[int]:
        """Every sample sequence number received, in arrival order, duplicates included."""
        with self.lock:
            return [s.seq for b in self.batches for s in b.samples]

    def identities(self) -> set[tuple[int, int]]:
        """Distinct ``(ts, seq)`` identities received."""
        with self.lock:
            return {(s.ts, s.seq) for b in self.batches for s in b.samples}

    def snapshot(self) -> list[Batch]:
        """The batches received so far."""
        with self.lock:
            return list(self.batches)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    """Poll until ``predicate()`` holds; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@contextmanager
def running_acker(mqtt_url: str, vin: str) -> Iterator[Acker]:
    """Run an acker in a background thread (paho loop_start), reconnecting on its own."""
    acker = Acker(vin=vin)
    client = make_client(parse_mqtt_url(mqtt_url), f"acker-{uuid.uuid4().hex[:8]}")
    topic = telemetry_topic(vin)
    subscribed = threading.Event()

    def on_connect(c: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(*_args: Any) -> None:
        subscribed.set()

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        batch = decode_batch(bytes(msg.payload), msg.topic)
        with acker.lock:
            acker.batches.append(batch)
        if acker.acking:
            c.publish(ack_topic(vin), encode(Ack(v=1, vin=vin, batches=[batch.batch])), qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    address = parse_mqtt_url(mqtt_url)
    client.reconnect_delay_set(0.2, 1.0)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise AssertionError("acker could not subscribe")
        yield acker
    finally:
        client.disconnect()
        client.loop_stop()
