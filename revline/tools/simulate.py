"""``revline simulate``: a fleet of simulated cars publishing straight to a broker.

For feeding a server stack (``docker compose up``, then Grafana) or load-testing one: N vehicles,
each a ``DriveSimulator``, publishing one batch per vehicle every ``--batch-s`` seconds, QoS 1,
over a single connection. It keeps no spool and ignores end-to-end acks: it is a load generator,
not a device (``revline edge --source sim`` is the lossless one).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import msgspec
from paho.mqtt.client import MQTT_ERR_SUCCESS

from revline.contract import SCHEMA_VERSION, Batch, Sample, encode, telemetry_topic
from revline.edge.sim import DriveSimulator
from revline.mqtt import ConnectError, MqttClientSettings, connect_blocking
from revline.settings import flag_values, load

__all__ = ["fleet_vins", "run"]

_INFLIGHT_MAX = 200  # QoS 1 messages awaiting PUBACK; paho slows down badly with thousands



def fleet_vins(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct valid VINs, the same for the same seed."""
    return [f"1RVSM{seed:03d}{i:09d}"[:17] for i in range(count)]


class _Fleet:
    """The simulated cars and their counters; ``batches()`` advances every car by one batch."""

    def __init__(self, vehicles: int, seed: int, hz: float, per_batch: int) -> None:

        self.cars = [
            (vin, DriveSimulator(seed + i)) for i, vin in enumerate(fleet_vins(vehicles, seed))
        ]
        self.step_s = 1.0 / hz
        self.per_batch = per_batch
        # Sequence numbers and batch ids must grow across runs without a spool: start from time.
        self.seq = self.batch_id = int(time.time() * 1000)

    def batches(self, now_us: int) -> Iterator[tuple[str, bytes]]:
        """(topic, payload) of one batch per car, samples spaced 1/hz and ending at ``now_us``."""


        for vin, sim in self.cars:
            samples = []
            for k in range(self.per_batch):
                ts = now_us - round((self.per_batch - 1 - k) * self.step_s * 1e6)
                fields = {"ts": ts, "seq": self.seq, **sim.step(self.step_s)}
                samples.append(msgspec.convert(fields, Sample))  # validated against the contract
                self.seq += 1
            batch = Batch(v=SCHEMA_VERSION, vin=vin, batch=self.batch_id, samples=samples)
            self.batch_id += 1
            yield telemetry_topic(vin), encode(batch)


def run(args: argparse.Namespace) -> int:
    """Publish until --seconds elapse or Ctrl-C; print a line every 10 s and a total."""


    if args.vehicles < 1 or args.hz <= 0 or args.batch_s <= 0:
        print("revline simulate: --vehicles, --hz and --batch-s must be positive", file=sys.stderr)
        return 2
    settings = load(MqttClientSettings, flags=flag_values(args, MqttClientSettings))
    address = settings.address
    client = settings.client(f"revline-simulate-{args.seed}")
    inflight: set[int] = set()
    client.on_publish = lambda _c, _u, mid, _rc, _p: inflight.discard(mid)
    try:
        connect_blocking(client, address)
    except ConnectError as exc:
        print(f"revline simulate: {exc}", file=sys.stderr)
        return 1

    def pump(timeout: float) -> None:
        if client.loop(timeout=timeout) != MQTT_ERR_SUCCESS:
            # Broker gone: what was in flight is lost (no spool here); try again shortly.
            inflight.clear()
            time.sleep(1.0)
            with contextlib.suppress(OSError):
                client.reconnect()

    per_batch = max(1, round(args.hz * args.batch_s))
    fleet = _Fleet(args.vehicles, args.seed, args.hz, per_batch)
    started = last_report = next_tick = time.monotonic()
    published = reported = 0
    print(
        f"simulating {args.vehicles} cars at {args.hz:g} Hz, {per_batch} samples per batch, "
        f"to {address}",
        flush=True,
    )
    try:
        while not args.seconds or time.monotonic() - started < args.seconds:
            for topic, payload in fleet.batches(int(time.time() * 1e6)):
                inflight.add(client.publish(topic, payload, qos=1).mid)
                published += per_batch
                while len(inflight) >= _INFLIGHT_MAX:
                    pump(0.05)
            next_tick += args.batch_s
            while (wait := next_tick - time.monotonic()) > 0:
                pump(min(wait, 0.1))
            if time.monotonic() - last_report >= 10:
                rate = (published - reported) / (time.monotonic() - last_report)
                print(f"{published:,} samples published, {rate:,.0f}/s", flush=True)
                last_report, reported = time.monotonic(), published
        drain_until = time.monotonic() + 30
        while inflight and time.monotonic() < drain_until:
            pump(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
    print(f"published {published} samples from {args.vehicles} cars", flush=True)
    return 0
