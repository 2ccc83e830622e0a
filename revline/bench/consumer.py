"""``revline bench consumer``: end-to-end ingest rate and latency against a plain staged COPY.

1. Creates two scratch databases ``revline_bench_<pid>_{e2e,copy}`` on the server of
   ``--database-url`` and migrates both (dropped again at the end).
2. Starts ``revline consumer`` as a subprocess on the first one, with its own client id.
3. Publisher processes pre-encode every message (outside the timing), then publish them QoS 1
   as fast as the broker takes them, noting each message's publish time.
4. The bench listens on ``ack/+``: a message is done when its end-to-end ack arrives (the consumer
   publishes it after commit). Rate = samples / (last ack - first publish); latency per message =
   ack receipt - publish.
5. Ceiling: the same rows, COPYed into the staging table and inserted into ``samples`` in
   transactions of the same size on the second database (no MQTT, no decoding, no hot upsert).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from revline.contract import Batch, Sample, decode_ack, encode, telemetry_topic
from revline.mqtt import drop_session, parse_mqtt_url
from revline.tools.localservices import MosquittoService, free_port

__all__ = ["main"]

_VIN_CHARS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"


def _vin(index: int) -> str:
    digits = []
    for _ in range(6):
        index, rest = divmod(index, len(_VIN_CHARS))
        digits.append(_VIN_CHARS[rest])
    return "1RVBENCH000" + "".join(reversed(digits))


def _plan(samples: int, per_message: int, vehicles: int) -> list[tuple[str, int, int]]:
    """(vin, batch id, first seq) of every message, vehicles interleaved like a live fleet."""
    per_vehicle = -(-samples // vehicles)
    messages = -(-per_vehicle // per_message)
    plan = []
    for m in range(messages):
        for v in range(vehicles):
            first = m * per_message
            if v * per_vehicle + first < samples and first < per_vehicle:
                plan.append((_vin(v), m, first))
    return plan


def _batch(vin: str, batch: int, first: int, count: int, t0: int) -> Batch:
    return Batch(
        v=1,
        vin=vin,
        batch=batch,
        samples=[
            Sample(
                ts=t0 + seq * 100_000,
                seq=seq,
                speed=float(seq % 180),
                rpm=800.0 + seq % 4000,
                coolant=90.0,
                throttle=float(seq % 100),
                battery=13.8,
                lat=48.1 + seq * 1e-6,
                lon=11.5 + seq * 1e-6,
            )
            for seq in range(first, first + count)
        ],
    )


@dataclass(frozen=True)
class _PublisherJob:
    mqtt_url: str
    work: list[tuple[str, int, int, int]]
    t0: int
    ready: MpEvent
    go: MpEvent
    out: Any
    rate: float = 0.0
    """Samples/s this process publishes at (0: as fast as the broker takes them)."""


def _publisher(job: _PublisherJob) -> None:
    """Pre-encode, wait for the go, publish everything QoS 1, report publish times."""
    payloads = [
        (telemetry_topic(vin), encode(_batch(vin, b, first, n, job.t0)), vin, b)
        for vin, b, first, n in job.work
    ]
    address = parse_mqtt_url(job.mqtt_url)
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"revline-bench-pub-{os.getpid()}",
        protocol=paho.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.connect(address.host, address.port)
    client.loop_start()
    job.ready.set()
    job.go.wait()
    times: list[tuple[str, int, float]] = []
    infos = []
    began = time.monotonic()
    sent = 0
    for (topic, payload, vin, b), (*_, count) in zip(payloads, job.work, strict=True):
        if job.rate:
            # Paced: latency then measures the pipeline, not the queue of a burst.
            time.sleep(max(0.0, began + sent / job.rate - time.monotonic()))
        times.append((vin, b, time.time()))
        infos.append(client.publish(topic, payload, qos=1))
        sent += count
    for info in infos:
        info.wait_for_publish(600)
    job.out.put(times)
    client.disconnect()
    client.loop_stop()


class _AckListener:
    def __init__(self, mqtt_url: str) -> None:
        address = parse_mqtt_url(mqtt_url)
        self.acked: dict[tuple[str, int], float] = {}
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"revline-bench-acks-{os.getpid()}",
            protocol=paho.MQTTv5,
        )
        self.client.on_connect = lambda c, *_: c.subscribe("ack/+", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("could not subscribe to ack/+")

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        ack = decode_ack(bytes(msg.payload))
        with self.lock:
            for b in ack.batches:
                self.acked.setdefault((ack.vin, b), now)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _admin(url: str, sql: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@contextlib.contextmanager
def _scratch_database(server_url: str, name: str) -> Iterator[str]:
    from revline.storage.migrate import MigrateSettings, migrate_dsn  # noqa: PLC0415

    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = urlsplit(server_url)._replace(path=f"/{name}").geturl()
    try:
        report = asyncio.run(migrate_dsn(url, MigrateSettings(database_url=url)))
        print(f"# scratch database {name}: mode {report.mode}", file=sys.stderr)
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Mosquitto's default of 1000 silently drops QoS 1 messages queued beyond it: a burst of many
# small messages would lose some and the bench would wait for acks that never come.
_BROKER_CONFIG = (
    "persistence false",
    "max_queued_messages 0",
    "max_queued_bytes 0",
    "max_inflight_messages 1000",
)


@contextlib.contextmanager
def _private_broker() -> Iterator[str]:
    """A Mosquitto of our own on a free port, configured like broker/mosquitto.conf's queues."""
    with MosquittoService(use_docker=False, extra_config=_BROKER_CONFIG) as broker:
        yield broker.url


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


def _ceiling(
    url: str, plan: list[tuple[str, int, int, int]], t0: int, per_tx: int, connections: int
) -> float:
    """Samples/s of a plain staged COPY + cold insert of the same rows, per_tx rows a commit,
    on as many connections at once as the consumer writes with."""
    from revline.consumer.writer import (  # noqa: PLC0415
        INSERT_SAMPLES_SQL,
        STAGING_COLUMNS,
        STAGING_TABLE,
        Writer,
        records,
    )

    batches = [_batch(vin, b, first, n, t0) for vin, b, first, n in plan]
    groups: list[list[Batch]] = [[]]
    size = 0
    for batch in batches:
        if size + len(batch.samples) > per_tx and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(batch)
        size += len(batch.samples)
    rows = [records(group) for group in groups]  # built before the clock starts

    async def copy(connection: Any, chunks: list[list[tuple[Any, ...]]]) -> None:
        for chunk in chunks:
            async with connection.transaction():
                await connection.copy_records_to_table(
                    STAGING_TABLE, records=chunk, columns=STAGING_COLUMNS
                )
                await connection.execute(INSERT_SAMPLES_SQL)

    async def run() -> float:
        async with Writer(url, pool_size=connections) as writer:
            pool = writer._require_pool()
            held = [await pool.acquire() for _ in range(connections)]
            try:
                began = time.perf_counter()
                async with asyncio.TaskGroup() as tg:
                    for i, connection in enumerate(held):
                        tg.create_task(copy(connection, rows[i::connections]))
                return time.perf_counter() - began
            finally:
                for connection in held:
                    await pool.release(connection)

    seconds = asyncio.run(run())
    return sum(len(r) for r in rows) / seconds


def _start_consumer(args: argparse.Namespace, url: str, client_id: str) -> tuple[Any, Path]:
    port = free_port()
    log_file = Path(tempfile.gettempdir()) / f"{client_id}.log"
    command = [sys.executable]
    if args.profile:
        command += ["-m", "cProfile", "-o", str(args.profile)]
    command += [
        *("-m", "revline.cli", "consumer", "--mqtt-url", args.mqtt_url, "--database-url", url),
        *("--client-id", client_id, "--metrics-host", "127.0.0.1", "--metrics-port", str(port)),
        *("--batch-max-samples", str(args.batch_max_samples), "--session-expiry-s", "60"),
        *("--write-concurrency", str(args.write_concurrency)),
    ]
    with log_file.open("wb") as log:
        consumer = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not _healthy(port):
        if consumer.poll() is not None or time.monotonic() > deadline:
            consumer.kill()
            raise RuntimeError(f"consumer did not start; see {log_file}")
        time.sleep(0.1)
    return consumer, log_file


def _publish(
    args: argparse.Namespace, plan: list[tuple[str, int, int, int]], t0: int
) -> dict[tuple[str, int], float]:
    """Publish the plan from publisher processes; the publish time of every message."""
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    jobs = [
        _PublisherJob(
            args.mqtt_url,
            plan[i :: args.publishers],
            t0,
            ctx.Event(),
            go,
            out,
            rate=args.rate / args.publishers,
        )
        for i in range(args.publishers)
    ]
    procs = [ctx.Process(target=_publisher, args=(job,)) for job in jobs]
    for proc in procs:
        proc.start()
    for job in jobs:
        if not job.ready.wait(600):
            raise RuntimeError("publishers did not get ready")
    go.set()
    published: dict[tuple[str, int], float] = {}
    for _ in procs:
        for vin, b, when in out.get(timeout=3600):
            published[(vin, b)] = when
    for proc in procs:
        proc.join()
    return published


def _end_to_end(
    args: argparse.Namespace, url: str, plan: list[tuple[str, int, int, int]], t0: int
) -> tuple[float, list[float], int]:
    """(samples/s, sorted per-message latencies, samples stored) through the real consumer."""
    client_id = f"revline-bench-consumer-{os.getpid()}"
    acks = _AckListener(args.mqtt_url)
    consumer, log_file = _start_consumer(args, url, client_id)
    try:
        published = _publish(args, plan, t0)
        seen, progress = 0, time.monotonic()
        while (count := acks.count()) < len(plan):
            if count > seen:
                seen, progress = count, time.monotonic()
            if consumer.poll() is not None or time.monotonic() - progress > 60:
                raise RuntimeError(
                    f"stalled: {count:,} of {len(plan):,} messages acked end to end, none for "
                    f"60 s (did the broker drop queued messages? see max_queued_messages); "
                    f"consumer log: {log_file}"
                )
            time.sleep(0.05)
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(60)
        acks.close()
        with contextlib.suppress(OSError):
            drop_session(parse_mqtt_url(args.mqtt_url), client_id)
    with acks.lock:
        done = dict(acks.acked)
    total = sum(n for *_, n in plan)
    rate = total / (max(done.values()) - min(published.values()))
    latencies = sorted(done[key] - published[key] for key in published)
    return rate, latencies, asyncio.run(_count(url))


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print one table of figures."""
    per_vehicle = -(-args.samples // args.vehicles)
    plan = [
        (vin, b, first, min(args.per_message, per_vehicle - first))
        for vin, b, first in _plan(args.samples, args.per_message, args.vehicles)
    ]
    total = sum(n for *_, n in plan)
    t0 = int((time.time() - 3600) * 1e6)  # an hour ago: inside today's partition, not future
    stem = f"revline_bench_{os.getpid()}"
    print(
        f"# {total:,} samples in {len(plan):,} messages of {args.per_message}, "
        f"{args.vehicles} vehicles, {args.publishers} publisher process(es), "
        f"write batches of {args.batch_max_samples:,}, {args.write_concurrency} at once",
        file=sys.stderr,
    )
    with contextlib.ExitStack() as stack:
        if args.mqtt_url is None:
            args.mqtt_url = stack.enter_context(_private_broker())
        print(f"# broker {args.mqtt_url}", file=sys.stderr)
        url = stack.enter_context(_scratch_database(args.database_url, f"{stem}_e2e"))
        rate, latencies, stored = _end_to_end(args, url, plan, t0)
    with _scratch_database(args.database_url, f"{stem}_copy") as url:
        ceiling = _ceiling(url, plan, t0, args.batch_max_samples, args.write_concurrency)
    mode = f"paced at {args.rate:,.0f}/s" if args.rate else "burst"
    p50 = statistics.median(latencies) * 1e3
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
    print(f"{'':34} {'samples/s':>10} {'p50 ms':>7} {'p99 ms':>7}")
    print(f"{'end to end, ' + mode:34} {rate:>10,.0f} {p50:>7.0f} {p99:>7.0f}")
    print(f"{'plain staged COPY (ceiling)':34} {ceiling:>10,.0f}")
    print(f"(ceiling: same rows, same transaction size, {args.write_concurrency} connection(s))")
    print(f"end to end / ceiling = {rate / ceiling:.0%}; stored {stored:,} of {total:,} samples")
    if args.profile:
        print(f"consumer profile written to {args.profile}", file=sys.stderr)
    return 0 if stored == total else 1


async def _count(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM samples WHERE vin LIKE '1RVBENCH%'")
        )
    finally:
        await connection.close()
