"""The shipped broker's ACL for the audit's topics: a device writes only its own status/ and
reads only its own cmd/; a consumer login reads status/+ and $SYS and writes cmd/+; and the real
edge and consumer (with an audit login of its own) work through it.

As in tests/stack/test_broker_security.py, each "never delivered" check ends with an allowed
message published after the refused ones: once it has arrived, a refused one would have too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.audit import settled, status_stored
from tests.fixtures.broker import ShippedBroker, shipped_broker
from tests.fixtures.consumer import ConsumerFactory
from tests.fixtures.edge import StoppableSim, edge_settings, running_edge, spooled_so_far
from tests.fixtures.services import wait_until

CAR_A = "1HGCM82633A004352"
CAR_B = "2HGCM82633A004353"
CONSUMER = "revline-consumer-1"
AUDIT = "revline-audit-1"


@pytest.fixture
def broker() -> Iterator[ShippedBroker]:
    """The shipped broker with two cars, the consumer and an audit login."""
    with shipped_broker(vehicles=(CAR_A, CAR_B), consumers=(CONSUMER, AUDIT)) as started:
        yield started


def test_a_device_writes_only_its_own_status_and_the_consumer_reads_them(
    broker: ShippedBroker,
) -> None:
    """status/<own vin> reaches the consumer login; status/<other vin> does not."""
    audit = broker.client(AUDIT)
    car_a = broker.client(CAR_A)
    try:
        audit.subscribe("status/+")
        car_a.publish(f"status/{CAR_B}", b"forged")
        car_a.publish(f"status/{CAR_A}", b"own")
        wait_until(lambda: bool(audit.received), what="the car's own status", timeout=10)
        assert audit.topics() == [f"status/{CAR_A}"]
    finally:
        audit.close()
        car_a.close()


def test_only_a_consumer_login_commands_a_device_and_only_that_device_reads_it(
    broker: ShippedBroker,
) -> None:
    """A car cannot write cmd/ (its own or another's) nor read another car's; the consumer
    login's command reaches its car."""
    car_a = broker.client(CAR_A)
    car_b = broker.client(CAR_B)
    audit = broker.client(AUDIT)
    try:
        car_a.subscribe("cmd/#")  # granted, but only cmd/<its vin> is delivered to it
        car_b.publish(f"cmd/{CAR_A}", b"forged by B")
        car_a.publish(f"cmd/{CAR_A}", b"forged by A")
        audit.publish(f"cmd/{CAR_B}", b"for B")
        audit.publish(f"cmd/{CAR_A}", b"for A")
        wait_until(lambda: bool(car_a.received), what="the consumer's command", timeout=10)
        assert car_a.payloads() == [b"for A"]
    finally:
        car_a.close()
        car_b.close()
        audit.close()


def test_the_consumer_login_reads_sys_and_a_device_does_not(broker: ShippedBroker) -> None:
    """$SYS counters reach the consumer login and never a car's."""
    audit = broker.client(AUDIT)
    car = broker.client(CAR_A)
    try:
        car.subscribe("$SYS/#")
        audit.subscribe("$SYS/#")
        wait_until(lambda: bool(audit.received), what="a $SYS counter", timeout=30)
        car.subscribe(f"cmd/{CAR_A}")
        audit.publish(f"cmd/{CAR_A}", b"after")
        wait_until(lambda: bool(car.received), what="the command", timeout=10)
        assert car.topics() == [f"cmd/{CAR_A}"]
    finally:
        audit.close()
        car.close()


def test_the_edge_and_the_consumers_audit_login_work_through_the_shipped_broker(
    broker: ShippedBroker, tmp_path: Path, migrated_db: str, make_consumer: ConsumerFactory
) -> None:
    """With its own login (audit_mqtt_url), the audit stores the device's status; the
    consumer's telemetry connection is not taken over by it."""
    consumer = make_consumer(
        mqtt_url=broker.url(CONSUMER),
        client_id=CONSUMER,
        args=["--audit-mqtt-url", broker.url(AUDIT), "--audit-every-s", "0.5"],
    )
    stop = threading.Event()
    settings = edge_settings(tmp_path, CAR_A, broker.url(CAR_A), status_every_s=0.5)
    with running_edge(settings, source=StoppableSim(stop, hz=10.0, speedup=10.0)):
        wait_until(lambda: spooled_so_far(settings.spool_path) >= 100, what="samples", timeout=60)
        stop.set()
        wait_until(lambda: settled(settings.spool_path, migrated_db, CAR_A), what="stored")
        wait_until(lambda: status_stored(migrated_db, CAR_A), what="the status stored")
    assert "already connected" not in broker.service.logs()
    assert "audit: listening" in consumer.log_text()
