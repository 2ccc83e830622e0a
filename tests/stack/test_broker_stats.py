"""``revline broker-stats`` turns the shipped broker's own counters ($SYS) into Prometheus
metrics: what it holds for a consumer that is away, and what it drops when that queue is full."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from revline.tools.brokerstats import MONITOR_LOGIN, SYS_METRICS, BrokerStats
from tests.fixtures.broker import OBSERVER, ShippedBroker, shipped_broker
from tests.fixtures.services import free_port, wait_until

CAR = "1HGCM82633A004352"
CONSUMER = "revline-consumer-1"


def _metrics(port: int) -> dict[str, float]:
    """The unlabelled samples of ``/metrics``, by name; none while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except urllib.error.URLError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+) (\S+)", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


@pytest.fixture
def broker() -> Iterator[ShippedBroker]:
    """The shipped broker with per-client queues of 32 KiB, so that an absent consumer's fills."""
    with shipped_broker(
        vehicles=(CAR,), consumers=(CONSUMER,), replace={"max_queued_bytes": "32768"}
    ) as started:
        yield started


def test_the_exporter_shows_the_queue_and_the_drops_of_an_absent_consumer(
    broker: ShippedBroker,
) -> None:
    """With the consumer's session away and its queue full, the broker's held messages and its
    drops appear on /metrics, and revline_broker_up is 1; SIGTERM stops the exporter cleanly."""
    consumer = broker.client(CONSUMER, client_id=CONSUMER, clean_start=False, session_expiry_s=600)
    consumer.subscribe("$share/revline/telemetry/+")
    consumer.close()  # away: the broker queues for it, up to max_queued_bytes
    car = broker.client(CAR)
    for _ in range(64):
        car.publish(f"telemetry/{CAR}", b"x" * 2048)  # 128 KiB: four times the queue
    car.close()
    port = free_port()
    password = quote(broker.passwords[MONITOR_LOGIN], safe="")
    url = f"mqtt://{MONITOR_LOGIN}:{password}@127.0.0.1:{broker.port}"
    exporter = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "revline"),
            "broker-stats",
            "--mqtt-url",
            url,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # Mosquitto publishes $SYS every sys_interval (10 s by default, as shipped).
        wait_until(
            lambda: _metrics(port).get("revline_broker_dropped_total", 0) > 0,
            what="the broker's drop counter on /metrics",
            timeout=40,
        )
        metrics = _metrics(port)
        assert metrics["revline_broker_up"] == 1
        assert metrics["revline_broker_store_messages"] >= 1
        assert 0 < metrics["revline_broker_store_bytes"] <= 64 * 2048
        assert metrics["revline_broker_clients_connected"] >= 1  # the exporter itself
        assert metrics["revline_broker_stats_ignored_total"] == 0
    finally:
        exporter.send_signal(signal.SIGTERM)
        output, _ = exporter.communicate(timeout=20)
    assert exporter.returncode == 0, output
    assert b"Traceback" not in output


def test_the_monitor_login_reads_the_brokers_counters_and_nothing_else(
    broker: ShippedBroker,
) -> None:
    """revline-monitor gets no telemetry or acks, and what it publishes reaches nobody."""
    monitor = broker.client(MONITOR_LOGIN)
    observer = broker.client(OBSERVER)
    car = broker.client(CAR)
    try:
        monitor.subscribe("telemetry/#")
        monitor.subscribe("ack/#")
        observer.subscribe("#")
        monitor.publish(f"telemetry/{CAR}", b"forged by the monitor")
        monitor.publish(f"ack/{CAR}", b"forged ack")
        car.publish(f"telemetry/{CAR}", b"the car's own")
        wait_until(lambda: bool(observer.received), what="the car's telemetry", timeout=10)
        assert observer.payloads() == [b"the car's own"]
        assert [m.topic for m in monitor.received if not m.topic.startswith("$SYS")] == []
    finally:
        for client in (monitor, observer, car):
            client.close()


def test_only_short_numbers_on_known_topics_are_taken() -> None:
    """Junk on $SYS (text, huge, NaN, negative, unknown topic) is counted and skipped."""
    stats = BrokerStats()
    topic = "$SYS/broker/store/messages/count"
    assert stats.update(topic, b"42")
    for junk in (b"many", b"9" * 100, b"nan", b"inf", b"-1", b"\xff\xfe", b""):
        assert not stats.update(topic, junk)
    assert not stats.update("$SYS/broker/version", b"1")
    assert stats.values() == {"revline_broker_store_messages": 42.0}
    names = {family.name: family for family in stats.collect()}
    assert names["revline_broker_stats_ignored"].samples[0].value == 8
    assert math.isfinite(names["revline_broker_stats_age_seconds"].samples[0].value)
    assert set(SYS_METRICS) >= {topic, "$SYS/broker/publish/messages/dropped"}
