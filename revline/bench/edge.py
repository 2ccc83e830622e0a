"""``revline bench edge``: spool appends/s, backlog drain samples/s, bytes on disk per sample.

Each figure is printed next to a baseline measured in the same run on the same machine:

* appends: ``Spool.write`` of simulator readings (packing included) vs a bare
  ``sqlite3.executemany`` of the already packed rows into the same table;
* bytes/sample: the spool file vs a plain table with one REAL column per field;
* drain: the publisher emptying a backlog to the broker, with every batch acked end to end by an
  acker process (subscribe, decode, publish ``Ack``), vs raw paho QoS 1 publishes of the same
  payloads with the same window and no acks at all;
* wire bytes/sample: contract v1 vs v2 (raw columns, DEFLATE for comparison, zstd with and
  without the shipped dictionary) of the same simulator drives, MQTT 5 PUBLISH header and topic
  included, the encode cost per sample of each, and the batching table (1-10 s at 1-10 Hz); no
  broker needed (:mod:`revline.bench.wire`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from revline.bench.wire import SENT, WireRow, batching_table, wire_table
from revline.contract import NUMERIC_FIELDS, Ack, ack_topic, encode, telemetry_topic
from revline.edge.config import EdgeSettings
from revline.edge.publisher import Publisher
from revline.edge.sim import simulate_readings
from revline.edge.spool import DURABLE, Spool, SpoolBatch, encode_batch, pack_values
from revline.mqtt import make_client, parse_mqtt_url
from revline.wire_v2 import decode_any_rows

__all__ = ["run_bench"]

_VIN = "1RVBENCH0EDGE0001"
_T0 = 1_750_000_000_000_000
_CHUNK = 500  # samples per spool transaction: 10 Hz x 0.5 s would be 5; bigger is the worst case


def _acker(url: str, vin: str, ready: multiprocessing.synchronize.Event) -> None:
    """Stand-in for the consumer: ack every batch it receives (runs in its own process)."""
    address = parse_mqtt_url(url)
    client = make_client(address, f"bench-acker-{uuid.uuid4().hex[:6]}")

    def on_connect(c: paho.Client, *_: Any) -> None:
        c.subscribe(telemetry_topic(vin), qos=1)

    def on_subscribe(*_: Any) -> None:
        ready.set()

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        batch = decode_any_rows(bytes(msg.payload), msg.topic)  # v1 or v2, no Sample objects
        c.publish(ack_topic(vin), encode(Ack(v=1, vin=vin, batches=[batch.batch])), qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(address.host, address.port)
    client.loop_forever()


def _rows(n: int) -> list[tuple[int, bytes, int | None]]:
    return [
        (_T0 + i * 100_000, pack_values(r.values), None)
        for i, r in enumerate(simulate_readings(1, n, 10.0))
    ]


def _bench_appends(directory: Path, n: int) -> tuple[float, float, float, float]:
    readings = list(simulate_readings(1, n, 10.0))
    spool_path = directory / "bench-spool.db"
    start = time.perf_counter()
    with Spool(spool_path) as spool:
        for k in range(0, n, _CHUNK):
            spool.write(
                [
                    (_T0 + (k + i) * 100_000, pack_values(r.values), None)
                    for i, r in enumerate(readings[k : k + _CHUNK])
                ]
            )
        ours = n / (time.perf_counter() - start)
        per_sample = spool.used_bytes() / n
    packed = _rows(n)
    raw_path = directory / "bench-raw.db"
    db = sqlite3.connect(raw_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE samples (seq INTEGER PRIMARY KEY, ts INTEGER, data BLOB, m, b)")
    start = time.perf_counter()
    for k in range(0, n, _CHUNK):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO samples VALUES (?, ?, ?, ?, NULL)",
            [(k + i, ts, data, mono) for i, (ts, data, mono) in enumerate(packed[k : k + _CHUNK])],
        )
        db.execute("COMMIT")
    raw = n / (time.perf_counter() - start)
    db.close()
    # What a naive layout costs: one REAL column per field.
    wide_path = directory / "bench-wide.db"
    db = sqlite3.connect(wide_path, isolation_level=None)
    cols = ", ".join(f"{name} REAL" for name in NUMERIC_FIELDS)
    db.execute(f"CREATE TABLE samples (seq INTEGER PRIMARY KEY, ts INTEGER, {cols})")
    marks = ", ".join("?" for _ in range(len(NUMERIC_FIELDS) + 2))
    db.execute("BEGIN")
    db.executemany(
        f"INSERT INTO samples VALUES ({marks})",
        [
            (i, _T0 + i, *(r.values.get(name) for name in NUMERIC_FIELDS))
            for i, r in enumerate(readings)
        ],
    )
    db.execute("COMMIT")
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    return ours, raw, per_sample, pages * size / n


def _drain_until(publisher: Publisher, spool: Spool, n: int) -> float:
    thread = threading.Thread(target=publisher.run, name="publisher")
    start = time.perf_counter()
    thread.start()
    try:
        while True:
            time.sleep(0.01)
            if spool.unbatched() == 0 and spool.open_batches() == 0:
                return n / (time.perf_counter() - start)
            if not thread.is_alive():
                raise RuntimeError("publisher stopped early")
    finally:
        publisher.stop()
        thread.join()


def _bench_drain(directory: Path, url: str, n: int) -> tuple[float, float, float]:
    spool_path = directory / "bench-drain.db"
    settings = EdgeSettings(vin=_VIN, mqtt_url=url, spool_path=str(spool_path), clock="trusted")
    rows = _rows(n)
    with Spool(spool_path) as spool:
        spool.write(rows)
        # One live batch, counted as done, makes the rest a backlog, as after an outage.
        live = spool.take_live(settings.batch_max_samples, 0.0)
        assert live is not None
        spool.mark([live.id], DURABLE)
        n -= len(live.rows)
        ours = _drain_until(Publisher(settings, spool), spool, n)
    payloads = [
        encode_batch(
            _VIN,
            SpoolBatch(
                id=k,
                rows=[(k + i, ts, data, None) for i, (ts, data, _) in enumerate(rows[k : k + 500])],
            ),
            settings.wire_version,  # what the publisher sends
        )
        for k in range(0, n, 500)
    ]
    wire = sum(len(p) for p in payloads) / n
    # Baseline: raw paho, same payloads, same window of 20 in flight, PUBACK only.
    address = parse_mqtt_url(url)
    client = make_client(address, f"bench-raw-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(settings.inflight_max)
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    client.connect(address.host, address.port)
    while not client.is_connected():
        client.loop(0.01)
    start = time.perf_counter()
    sent = 0
    topic = telemetry_topic("1RVBENCH0EDGE0002")
    while acked < len(payloads):
        while sent < len(payloads) and sent - acked < settings.inflight_max:
            client.publish(topic, payloads[sent], qos=1)
            sent += 1
        client.loop(0.01)
    raw = n / (time.perf_counter() - start)
    client.disconnect()
    return ours, raw, wire


def goals_met(rows: list[WireRow]) -> bool:
    """The issue's goals for what the edge sends (v2 with the dictionary) at 10 Hz: <= 20 B a
    sample in 1-s batches, <= 10 B in 5-s batches, MQTT header and topic included."""
    sent = {row.seconds: row.bytes_per_sample for row in rows if row.label == SENT}
    return sent[1] <= 20 and sent[5] <= 10


def run_bench(
    *, mqtt_url: str, samples: int, directory: Path | None, wire_only: bool = False
) -> int:
    """Print the figures; 0 when every goal is met, 1 otherwise. ``wire_only``: only the wire
    tables, which need no broker."""
    wire_ok = goals_met(wire_table())
    batching_table()
    print("wire goals met (<= 20 B at 1 s, <= 10 B at 5 s)" if wire_ok else "WIRE GOAL MISSED")
    if wire_only:
        return 0 if wire_ok else 1
    samples -= samples % 500
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        where = Path(tmp)
        print(f"revline bench edge: {samples} simulator samples, pid {os.getpid()}, in {where}")
        ours, raw, per_sample, wide = _bench_appends(where, samples)
        print(
            f"spool appends     {ours:>10,.0f} /s   (packing included; "
            f"raw executemany of packed rows: {raw:,.0f} /s)"
            f"   goal >= 50,000"
        )
        print(
            f"bytes on disk     {per_sample:>10.1f} B/sample (one REAL column per field: "
            f"{wide:.1f})   goal <= 100"
        )
        ready = multiprocessing.get_context("spawn").Event()
        acker = multiprocessing.get_context("spawn").Process(
            target=_acker, args=(mqtt_url, _VIN, ready), daemon=True
        )
        acker.start()
        try:
            if not ready.wait(30):
                print("acker could not subscribe; is the broker at", mqtt_url, "running?")
                return 1
            drain, raw_drain, wire = _bench_drain(where, mqtt_url, samples)
        finally:
            acker.terminate()
            acker.join()
        print(
            f"backlog drain     {drain:>10,.0f} samples/s with end-to-end acks "
            f"(raw paho QoS 1, no acks: {raw_drain:,.0f})   goal >= 20,000"
        )
        print(f"wire size         {wire:>10.1f} B/sample (payload only, v2 batches of 500)")
    ok = wire_ok and ours >= 50_000 and per_sample <= 100 and drain >= 20_000
    print("all goals met" if ok else "GOAL MISSED")
    return 0 if ok else 1
