"""``revline bench consumer``: end-to-end ingest rate and latency against a plain staged COPY.

1. Starts its own Mosquitto and its own PostgreSQL (initdb in a temporary directory), never a
   shared server, and creates scratch databases there, migrated, one per run (dropped after).
2. Starts ``revline consumer`` (``--workers N``, one shared group) as a subprocess.
3. Publisher processes pre-encode every message (outside the timing), then publish them QoS 1
   as fast as the broker takes them, noting each message's publish time.
4. The bench listens on ``ack/+``: a message is done when its end-to-end ack arrives (the consumer
   publishes it after commit). Rate = samples / (last ack - first publish); latency per message =
   ack receipt - publish.
5. Ceiling: the same rows, COPYed into the staging table and inserted into ``samples`` in
   transactions of the same size on a database of its own (no MQTT, no decoding, no hot upsert).

Several message sizes (``--per-message 1,10,500``) and worker counts (``--workers 1,2,4``) run
in one invocation, each size beside its own ceiling, so every figure has its baseline from the
same run on the same servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import socket
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
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg

from revline.bench.proc import cpu_seconds, listener_pid
from revline.consumer.mqttwire import (
    MQTT_311,
    PUBLISH,
    puback_packets,
    read_publish,
    split,
    subscribe_packet,
)
from revline.contract import Batch, ContractError, Sample, decode_ack, encode, telemetry_topic
from revline.mqtt import drop_session, parse_mqtt_url
from revline.tools.localservices import MosquittoService, PostgresService, free_port
from revline.wire_v2 import columns_from_batch, encode_v2

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
    wire: int = 1
    """Contract version of the payloads: 1 (MessagePack samples) or 2 (columns, the edge's)."""


def _payload(vin: str, batch: int, first: int, count: int, t0: int, wire: int) -> bytes:
    """One message's payload in contract ``wire`` (v2 as the edge sends it: zstd, dictionary)."""
    decoded = _batch(vin, batch, first, count, t0)
    return encode_v2(vin, batch, columns_from_batch(decoded)) if wire == 2 else encode(decoded)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _publish_packet(topic: str, mid: int, payload: bytes) -> bytes:
    body = _string(topic) + mid.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body  # PUBLISH, QoS 1


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise RuntimeError("broker closed the bench's connection")
        data += more
    return data


def _connect(mqtt_url: str, client_id: str) -> socket.socket:
    """A plain socket with an accepted MQTT 3.1.1 CONNECT: clean session, keepalive 0 (none: the
    run is short, and a keepalive would need a PINGREQ timer)."""
    address = parse_mqtt_url(mqtt_url)
    sock = socket.create_connection((address.host, address.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    variable = _string("MQTT") + bytes([MQTT_311, 0x02]) + (0).to_bytes(2, "big")
    body = variable + _string(client_id)
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    connack = _recv_exact(sock, 4)
    if connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise RuntimeError(f"broker refused {client_id}: {connack!r}")
    return sock


_WINDOW = 2_000
"""PUBLISHes the load generator keeps unacknowledged by the broker, at most."""
_CHUNK = 200
"""PUBLISHes written with one sendall."""


class _RawPublisher:
    """A minimal MQTT 3.1.1 QoS 1 publisher on a plain socket: pre-built packets written many
    at a time, PUBACKs counted by a reader thread. The load generator must cost far less than
    the consumer it feeds on the same 2 cores: paho spends ~50 µs of Python per publish, this
    ~1 µs, so that small-message figures measure the consumer, not the publisher."""

    def __init__(self, mqtt_url: str) -> None:
        self.sock = _connect(mqtt_url, f"revline-bench-pub-{os.getpid()}")
        self.acked = 0
        self.done = threading.Condition()
        self.reader = threading.Thread(target=self._read_acks, daemon=True)
        self.reader.start()

    def _read_acks(self) -> None:
        rest = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            rest += data
            whole = len(rest) // 4 * 4  # every packet a pure publisher gets is a 4-byte PUBACK
            count, rest = whole // 4, rest[whole:]
            with self.done:
                self.acked += count
                self.done.notify_all()

    def publish(self, packets: list[bytes], sent: int) -> None:
        """Write ``packets`` once no more than the window is unacknowledged."""
        with self.done:
            while sent + len(packets) - self.acked > _WINDOW:
                self.done.wait(1)
        self.sock.sendall(b"".join(packets))

    def finish(self, total: int, timeout: float = 600) -> None:
        """Wait for every PUBACK, then disconnect."""
        deadline = time.monotonic() + timeout
        with self.done:
            while self.acked < total and time.monotonic() < deadline:
                self.done.wait(1)
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()


def _publisher(job: _PublisherJob) -> None:
    """Pre-encode, wait for the go, publish everything QoS 1, report publish times."""
    packets = [
        _publish_packet(
            telemetry_topic(vin), i % 65535 + 1, _payload(vin, b, first, n, job.t0, job.wire)
        )
        for i, (vin, b, first, n) in enumerate(job.work)
    ]
    client = _RawPublisher(job.mqtt_url)
    job.ready.set()
    job.go.wait()
    times: list[tuple[str, int, float]] = []
    began = time.monotonic()
    sent = samples = 0
    while sent < len(packets):
        size = _CHUNK
        if job.rate:
            # Paced, 10 ms worth at a time: latency then measures the pipeline, not the queue
            # of a burst.
            time.sleep(max(0.0, began + samples / job.rate - time.monotonic()))
            size = max(1, min(_CHUNK, int(job.rate * 0.01) // max(1, job.work[sent][3])))
        chunk = job.work[sent : sent + size]
        now = time.time()
        times.extend((vin, b, now) for vin, b, _, _ in chunk)
        client.publish(packets[sent : sent + len(chunk)], sent)
        sent += len(chunk)
        samples += sum(n for *_, n in chunk)
    client.finish(len(packets))
    job.out.put(times)


def _publishes(buf: bytes) -> tuple[list[bytes], list[int], int]:
    """The complete packets at the start of ``buf``: the payloads of the PUBLISHes, the packet
    ids of those at QoS 1 (to PUBACK), and how many bytes they took; other packets (PINGRESP...)
    are skipped, and an incomplete last packet is left for the next read."""
    payloads: list[bytes] = []
    mids: list[int] = []
    pos = 0
    while (packet := split(buf, pos)) is not None and packet[2] <= len(buf):
        first, start, pos = packet
        if first >> 4 == PUBLISH:
            _, payload, qos, mid, _ = read_publish(first, buf, start, pos, MQTT_311)
            payloads.append(payload)
            if qos:
                mids.append(mid)
    return payloads, mids, pos


class _AckListener:
    """The end-to-end acks on ``ack/+``, QoS 1: when each (vin, batch) was first acked.

    A plain socket and a reader thread, like :class:`_RawPublisher` and for the same reason: paho
    spent ~1 µs of CPU per sample here, a quarter of what the consumer it measures spends on the
    same 2 cores. Acks that do not decode are counted (``bad``), never dropped in silence."""

    def __init__(self, mqtt_url: str) -> None:
        self.acked: dict[tuple[str, int], float] = {}
        self.lock = threading.Lock()
        self.bad = 0
        """Ack payloads that did not decode."""
        self.first_bad = ""
        self.failed = ""
        """Why the reader stopped before :meth:`close`, if it did."""
        self._closing = False
        self.sock = _connect(mqtt_url, f"revline-bench-acks-{os.getpid()}")
        self.sock.sendall(subscribe_packet(1, "ack/+", version=MQTT_311, qos=1))
        # Nothing else can come first: the consumer that publishes acks is not started yet.
        suback = _recv_exact(self.sock, 5)
        if suback != b"\x90\x03\x00\x01\x01":
            self.sock.close()
            raise RuntimeError(f"could not subscribe to ack/+ at QoS 1: SUBACK {suback!r}")
        self.sock.settimeout(None)  # the consumer may take longer than 30 s to send a first ack
        self.reader = threading.Thread(target=self._read, name="bench-acks", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        try:
            while data := self.sock.recv(65536):
                now = time.time()
                buf += data
                payloads, mids, used = _publishes(buf)
                buf = buf[used:]
                if mids:
                    self.sock.sendall(puback_packets(mids))
                self._record(payloads, now)
        except Exception as exc:  # noqa: BLE001 - reported by _end_to_end, not lost with the thread
            self.failed = repr(exc)
        else:
            if not self._closing:
                self.failed = "the broker closed the connection"

    def _record(self, payloads: list[bytes], now: float) -> None:
        acks = []
        for payload in payloads:
            try:
                acks.append(decode_ack(payload))
            except ContractError as exc:
                self.bad += 1
                self.first_bad = self.first_bad or f"{exc} (payload {payload[:32]!r})"
        with self.lock:
            for ack in acks:
                for b in ack.batches:
                    self.acked.setdefault((ack.vin, b), now)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def check(self) -> None:
        """Raise if the reader stopped or any ack did not decode: garbage among the acks is a
        bug somewhere, not noise for a benchmark to average over."""
        if self.failed and not self._closing:
            raise RuntimeError(f"ack listener stopped: {self.failed}")
        if self.bad:
            raise RuntimeError(
                f"{self.bad:,} end-to-end acks did not decode; the first: {self.first_bad}"
            )

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)  # wakes the reader's recv with end of stream
        self.reader.join(10)
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT, written once the reader is done
        self.sock.close()


@contextlib.contextmanager
def _scratch_database(server: PostgresService, name: str) -> Iterator[str]:
    from revline.storage.migrate import MigrateSettings, migrate_dsn  # noqa: PLC0415

    server.drop_database(name)
    url = server.create_database(name)
    try:
        report = asyncio.run(migrate_dsn(url, MigrateSettings(database_url=url)))
        print(f"# scratch database {name}: mode {report.mode}", file=sys.stderr)
        yield url
    finally:
        server.drop_database(name)


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
) -> tuple[float, float]:
    """Samples/s of a plain staged COPY + cold insert of the same rows, per_tx rows a commit,
    on as many connections at once as the consumer writes with; and the database server's CPU
    seconds per sample (NaN if it runs elsewhere)."""
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

    database = urlsplit(url)
    server = _local_server(database.hostname, database.port or 5432)
    before = _tree_cpu(server)
    seconds = asyncio.run(run())
    total = sum(len(r) for r in rows)
    return total / seconds, (_tree_cpu(server) - before) / total


def _start_consumer(
    args: argparse.Namespace,
    mqtt_url: str,
    url: str,
    client_id: str,
    workers: int,
    tree: Path | None = None,
) -> tuple[Any, Path, int]:
    port = free_port()
    label = "before" if tree is not None else f"w{workers}"
    log_file = Path(tempfile.gettempdir()) / f"{client_id}-{label}-{port}.log"
    command = [sys.executable]
    if args.profile and workers == 1:
        command += ["-m", "cProfile", "-o", str(args.profile)]
    command += [
        *("-m", "revline.cli", "--log-level", "debug", "consumer"),
        *("--mqtt-url", mqtt_url, "--database-url", url),
        *("--client-id", client_id, "--metrics-host", "127.0.0.1", "--metrics-port", str(port)),
        *("--batch-max-samples", str(args.batch_max_samples), "--session-expiry-s", "60"),
        *("--write-concurrency", str(args.write_concurrency)),
    ]
    env = None
    if tree is not None:
        # The consumer of another checkout (e.g. main), with its own defaults, for a before/after
        # in the same run on the same servers.
        env = {**os.environ, "PYTHONPATH": str(tree)}
    else:
        command += ["--ack-qos", str(args.ack_qos)]
    if args.receive_maximum and tree is None:
        command += ["--receive-maximum", str(args.receive_maximum)]
    if workers > 1:
        command += ["--workers", str(workers), "--group", "revline-bench"]
    with log_file.open("wb") as log:
        consumer = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=tree)
    deadline = time.monotonic() + 60
    while not _healthy(port):
        if consumer.poll() is not None or time.monotonic() > deadline:
            consumer.kill()
            raise RuntimeError(f"consumer did not start; see {log_file}")
        time.sleep(0.1)
    return consumer, log_file, port


def _publish(
    args: argparse.Namespace,
    mqtt_url: str,
    plan: list[tuple[str, int, int, int]],
    t0: int,
    wire: int = 1,
) -> dict[tuple[str, int], float]:
    """Publish the plan from publisher processes; the publish time of every message."""
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    jobs = [
        _PublisherJob(
            mqtt_url,
            plan[i :: args.publishers],
            t0,
            ctx.Event(),
            go,
            out,
            rate=args.rate / args.publishers,
            wire=wire,
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


@dataclass(frozen=True)
class _Run:
    """One end-to-end run: rate, per-message latencies (publish to end-to-end ack), stored."""

    rate: float
    latencies: list[float]
    stored: int
    cpu_s: float
    """CPU seconds the consumer's processes used (all workers and the supervisor)."""
    broker_cpu_s: float
    """CPU seconds of the broker's process (NaN if it runs elsewhere)."""
    database_cpu_s: float
    """CPU seconds of the database server's processes (NaN if it runs elsewhere)."""
    commit_p99_s: float
    """The consumer's own p99 commit latency (receipt of a batch's first message to its commit),
    as the upper bound of its histogram bucket; NaN if not read."""

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the latencies, in ms."""
        index = min(len(self.latencies) - 1, int(len(self.latencies) * q))
        return self.latencies[index] * 1e3


def _end_to_end(
    args: argparse.Namespace,
    mqtt_url: str,
    url: str,
    plan: list[tuple[str, int, int, int]],
    t0: int,
    workers: int,
    tree: Path | None = None,
    wire: int = 1,
) -> _Run:
    """One run through the real consumer (``workers`` processes in one group)."""
    client_id = f"revline-bench-consumer-{os.getpid()}"
    acks = _AckListener(mqtt_url)
    consumer, log_file, port = _start_consumer(args, mqtt_url, url, client_id, workers, tree)
    broker, database = parse_mqtt_url(mqtt_url), urlsplit(url)
    servers = {
        "broker": _local_server(broker.host, broker.port),
        "database": _local_server(database.hostname, database.port or 5432),
    }
    server_cpu = {name: _tree_cpu(pid) for name, pid in servers.items()}
    cpu_before = cpu_seconds(consumer.pid)
    cpu = 0.0
    commit_p99 = float("nan")
    try:
        published = _publish(args, mqtt_url, plan, t0, wire)
        seen, progress = 0, time.monotonic()
        while (count := acks.count()) < len(plan):
            if count > seen:
                seen, progress = count, time.monotonic()
            acks.check()
            if consumer.poll() is not None or time.monotonic() - progress > 60:
                raise RuntimeError(
                    f"stalled: {count:,} of {len(plan):,} messages acked end to end, none for "
                    f"60 s (did the broker drop queued messages? see max_queued_messages); "
                    f"consumer log: {log_file}"
                )
            time.sleep(0.05)
        acks.check()
        cpu = cpu_seconds(consumer.pid) - cpu_before
        server_cpu = {name: _tree_cpu(pid) - server_cpu[name] for name, pid in servers.items()}
        commit_p99 = _commit_p99(port)
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(60)
        acks.close()
        ids = [client_id] if workers == 1 else [f"{client_id}-w{i}" for i in range(1, workers + 1)]
        for member in ids:
            with contextlib.suppress(OSError):
                drop_session(broker, member)
    with acks.lock:
        done = dict(acks.acked)
    total = sum(n for *_, n in plan)
    rate = total / (max(done.values()) - min(published.values()))
    latencies = sorted(done[key] - published[key] for key in published)
    stored = asyncio.run(_count(url))
    return _Run(
        rate, latencies, stored, cpu, server_cpu["broker"], server_cpu["database"], commit_p99
    )


_HERE: Final = frozenset({"127.0.0.1", "localhost", "::1"})


def _local_server(host: str | None, port: int) -> int | None:
    """The process serving ``host:port`` if it is this machine (None elsewhere: a port here
    would be somebody else's)."""
    return listener_pid(port) if host in _HERE else None


def _tree_cpu(pid: int | None) -> float:
    """CPU seconds of a server's process tree so far (NaN if not found on this machine)."""
    return cpu_seconds(pid) if pid is not None else float("nan")


def _commit_p99(port: int) -> float:
    """The bucket bound under which 99 % of the consumer's commits fell
    (``revline_consumer_commit_seconds``, summed over workers by its endpoint)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return float("nan")
    buckets: list[tuple[float, float]] = []
    count = 0.0
    for line in text.splitlines():
        if line.startswith("revline_consumer_commit_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
        elif line.startswith("revline_consumer_commit_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    for bound, cumulative in sorted(buckets):
        if count and cumulative >= 0.99 * count:
            return bound
    return float("nan")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _copy_connections(args: argparse.Namespace, counts: list[int]) -> int:
    """Only the plain staged COPY, on 1, 2, 4... connections at once: what the database takes."""
    size = _ints(str(args.per_message))[0]
    samples = args.samples or 300_000
    per_vehicle = -(-samples // args.vehicles)
    plan = [
        (vin, b, first, min(size, per_vehicle - first))
        for vin, b, first in _plan(samples, size, args.vehicles)
    ]
    t0 = int((time.time() - 3600) * 1e6)
    with PostgresService(url=args.database_url, use_docker=False) as server:
        per_tx = args.batch_max_samples
        print(f"plain staged COPY + insert of {samples:,} rows, {per_tx:,} a commit")
        for n in counts:
            with _scratch_database(server, f"revline_bench_{os.getpid()}_copy") as url:
                rate, cpu = _ceiling(url, plan, t0, args.batch_max_samples, n)
            print(
                f"{n:>3} connection(s) {rate:>10,.0f} rows/s, database CPU {cpu * 1e6:.1f} µs/row",
                flush=True,
            )
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the benchmark matrix and print one table of figures."""
    if args.copy_connections:
        return _copy_connections(args, _ints(args.copy_connections))
    sizes, worker_counts = _ints(str(args.per_message)), _ints(str(args.workers))
    t0 = int((time.time() - 3600) * 1e6)  # an hour ago: inside today's partition, not future
    stem = f"revline_bench_{os.getpid()}"
    mode = f"paced at {args.rate:,.0f} samples/s" if args.rate else "burst"
    ok = True
    rows: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.mqtt_url is None:
            mqtt_url = stack.enter_context(_private_broker())
        else:
            mqtt_url = args.mqtt_url
        server = stack.enter_context(PostgresService(url=args.database_url, use_docker=False))
        print(f"# broker {mqtt_url}, database server {server.url}", file=sys.stderr)
        for size in sizes:
            samples = args.samples or min(1_000_000, size * 50_000)
            per_vehicle = -(-samples // args.vehicles)
            plan = [
                (vin, b, first, min(size, per_vehicle - first))
                for vin, b, first in _plan(samples, size, args.vehicles)
            ]
            total = sum(n for *_, n in plan)
            print(
                f"# {total:,} samples in {len(plan):,} messages of {size}, {args.vehicles} "
                f"vehicles, {mode}, write batches of {args.batch_max_samples:,}, "
                f"{args.write_concurrency} at once per worker",
                file=sys.stderr,
            )
            with _scratch_database(server, f"{stem}_copy") as url:
                ceiling, copy_cpu = _ceiling(
                    url, plan, t0, args.batch_max_samples, args.write_concurrency
                )
            blank = ""
            rows.append(
                f"{size:>4} {'COPY':>7} {ceiling:>10,.0f} {blank:>6} {blank:>7} {blank:>7} "
                f"{blank:>8} {blank:>7} {copy_cpu * 1e6:>7.1f}"
            )
            wires = _ints(str(args.wire))
            runs: list[tuple[str, int, Path | None, int]] = [
                (str(w) if len(wires) == 1 else f"{w} v{v}", w, None, v)
                for v in wires
                for w in worker_counts
            ]
            if args.compare_tree is not None:
                runs.insert(0, ("before", 1, args.compare_tree, 1))
            for label, workers, tree, wire in runs:
                with _scratch_database(server, f"{stem}_e2e") as url:
                    run = _end_to_end(args, mqtt_url, url, plan, t0, workers, tree, wire)
                ok = ok and run.stored == total
                rows.append(
                    f"{size:>4} {label:>7} {run.rate:>10,.0f} {run.rate / ceiling:>6.0%} "
                    f"{run.percentile(0.5):>7.0f} {run.percentile(0.99):>7.0f} "
                    f"{run.cpu_s * 1e6 / total:>8.1f} {run.broker_cpu_s * 1e6 / total:>7.1f} "
                    f"{run.database_cpu_s * 1e6 / total:>7.1f} {run.commit_p99_s * 1e3:>9.0f}"
                    + ("" if run.stored == total else f"  STORED {run.stored:,} OF {total:,}")
                )
                print(rows[-1], file=sys.stderr)
    print(f"end to end ({mode}), {args.vehicles} vehicles, vs a plain staged COPY of the same rows")
    print(
        f"{'per':>4} {'workers':>7} {'samples/s':>10} {'/COPY':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'cpu µs/s':>8} {'broker':>7} {'db':>7} {'commit<=':>9}"
    )
    print("\n".join(rows))
    print(
        f"(COPY: same rows, same transaction size, {args.write_concurrency} connection(s); "
        "latency: publish to end-to-end ack; cpu: consumer CPU per sample, all its processes; "
        "broker, db: the broker's and the database server's CPU per sample (µs, all their "
        "processes; nan when they run elsewhere); "
        "commit<=: the consumer's p99 receipt-to-commit, as its histogram's bucket bound, ms)"
    )
    if args.profile:
        print(f"consumer profile written to {args.profile}", file=sys.stderr)
    return 0 if ok else 1


async def _count(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM samples WHERE vin LIKE '1RVBENCH%'")
        )
    finally:
        await connection.close()
