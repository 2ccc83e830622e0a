"""The broker as shipped (broker/mosquitto.conf + broker/acl) refuses anonymous clients, forged
acks, another car's topics, client-id takeovers and retained messages; the real edge and consumer
work through it with their own logins.

Each check of "never delivered" ends with a message that is allowed, published after the refused
ones were PUBACKed: once it has arrived, anything wrongly let through would have arrived first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.edge.config import EdgeSettings
from revline.edge.spool import SpoolReader
from tests.fixtures.broker import OBSERVER, MqttClient, ShippedBroker, shipped_broker
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import running_edge, spool_read
from tests.fixtures.services import wait_until

CAR_A = "1HGCM82633A004352"
CAR_B = "2HGCM82633A004353"
CONSUMER = "revline-consumer-1"
TELEMETRY = "$share/revline/telemetry/+"


@pytest.fixture
def broker() -> Iterator[ShippedBroker]:
    """The shipped broker with two cars, one consumer and the test observer as logins."""
    with shipped_broker(vehicles=(CAR_A, CAR_B), consumers=(CONSUMER,)) as started:
        yield started


def _close(*clients: MqttClient) -> None:
    for client in clients:
        client.close()


def test_anonymous_clients_and_wrong_passwords_are_refused(broker: ShippedBroker) -> None:
    """No login, or a wrong password, gets no connection; the car's own login does."""
    anonymous = broker.client(None)
    wrong = MqttClient(broker.port, CAR_A, "not-the-password")
    car = broker.client(CAR_A)
    try:
        assert anonymous.refused
        assert wrong.refused
        assert not car.refused
    finally:
        _close(anonymous, wrong, car)


def test_a_device_cannot_send_an_ack_for_itself_or_another_car(broker: ShippedBroker) -> None:
    """A car's ack/<own vin> and ack/<other vin> reach nobody; the consumer's acks do."""
    observer = broker.client(OBSERVER)
    car_a = broker.client(CAR_A)
    car_b = broker.client(CAR_B)
    consumer = broker.client(CONSUMER)
    try:
        observer.subscribe("ack/#")
        car_a.subscribe("ack/#")  # granted, but only ack/<its vin> is delivered to it
        car_b.subscribe(f"ack/{CAR_B}")
        car_a.publish(f"ack/{CAR_A}", b"forged by A for A")
        car_a.publish(f"ack/{CAR_B}", b"forged by A for B")
        consumer.publish(f"ack/{CAR_B}", b"consumer for B")
        consumer.publish(f"ack/{CAR_A}", b"consumer for A")
        wait_until(lambda: len(observer.received) >= 2, what="the consumer's acks", timeout=10)
        wait_until(lambda: bool(car_a.received and car_b.received), what="acks", timeout=10)
        assert observer.payloads() == [b"consumer for B", b"consumer for A"]
        assert car_a.payloads() == [b"consumer for A"]
        assert car_b.payloads() == [b"consumer for B"]
    finally:
        _close(observer, car_a, car_b, consumer)


def test_a_device_cannot_publish_another_cars_telemetry(broker: ShippedBroker) -> None:
    """A car's publish on telemetry/<other vin> never reaches the consumer; its own does."""
    consumer = broker.client(CONSUMER)
    car_a = broker.client(CAR_A)
    try:
        consumer.subscribe(TELEMETRY)
        car_a.publish(f"telemetry/{CAR_B}", b"forged")
        car_a.publish(f"telemetry/{CAR_A}", b"own")
        wait_until(lambda: bool(consumer.received), what="the car's own telemetry", timeout=10)
        assert consumer.topics() == [f"telemetry/{CAR_A}"]
    finally:
        _close(consumer, car_a)


def test_the_consumer_cannot_publish_telemetry(broker: ShippedBroker) -> None:
    """A consumer login's publish on telemetry/<vin> reaches nobody: it may only send acks."""
    observer = broker.client(OBSERVER)
    consumer = broker.client(CONSUMER)
    car = broker.client(CAR_A)
    try:
        observer.subscribe("telemetry/#")
        consumer.publish(f"telemetry/{CAR_A}", b"forged by the consumer")
        car.publish(f"telemetry/{CAR_A}", b"the car's own")
        wait_until(lambda: bool(observer.received), what="the car's telemetry", timeout=10)
        assert observer.payloads() == [b"the car's own"]
    finally:
        _close(observer, consumer, car)


def test_a_device_with_the_consumers_client_id_neither_drops_it_nor_wipes_its_session(
    broker: ShippedBroker,
) -> None:
    """A car connecting as client id revline-consumer-1 gets its own id: the consumer stays."""

    def connect_consumer() -> MqttClient:
        return broker.client(CONSUMER, client_id=CONSUMER, clean_start=False, session_expiry_s=600)

    consumer = connect_consumer()
    car = broker.client(CAR_A)
    intruder = broker.client(CAR_B, client_id=CONSUMER)  # clean start: would wipe the session
    try:
        consumer.subscribe(TELEMETRY)
        car.publish(f"telemetry/{CAR_A}", b"while the intruder is connected")
        wait_until(lambda: bool(consumer.received), what="delivery to the consumer", timeout=10)
        assert consumer.disconnects == []
        consumer.close()  # away for a while; the broker keeps its session and queues for it
        intruder.close()
        broker.client(CAR_B, client_id=CONSUMER).close()  # a clean start while it is away
        car.publish(f"telemetry/{CAR_A}", b"while the consumer is away")
        back = connect_consumer()
        try:
            assert back.session_present
            wait_until(lambda: bool(back.received), what="the queued message", timeout=10)
            assert back.payloads() == [b"while the consumer is away"]
        finally:
            back.close()
    finally:
        _close(car, intruder)


def test_a_car_with_another_cars_client_id_does_not_drop_it(broker: ShippedBroker) -> None:
    """Car B connecting as revline-edge-<A> (or as <A>) leaves car A connected, getting its acks."""
    car_a = broker.client(
        CAR_A, client_id=f"revline-edge-{CAR_A}", clean_start=False, session_expiry_s=600
    )
    consumer = broker.client(CONSUMER)
    try:
        car_a.subscribe(f"ack/{CAR_A}")
        for stolen in (f"revline-edge-{CAR_A}", CAR_A):
            broker.client(CAR_B, client_id=stolen).close()
        consumer.publish(f"ack/{CAR_A}", b"ack")
        wait_until(lambda: bool(car_a.received), what="car A's ack", timeout=10)
        assert car_a.disconnects == []
        assert car_a.payloads() == [b"ack"]
    finally:
        _close(car_a, consumer)


def test_a_retained_message_is_refused_and_never_reaches_a_new_consumer(
    broker: ShippedBroker,
) -> None:
    """A car publishing retained is disconnected; a consumer subscribing later gets nothing old."""
    car = broker.client(CAR_A)
    car.publish(f"telemetry/{CAR_A}", b"poison", retain=True, wait=False)
    wait_until(lambda: bool(car.disconnects), what="the broker dropping the car", timeout=10)
    car.close()
    consumer = broker.client(CONSUMER)
    car = broker.client(CAR_A)
    try:
        consumer.subscribe("telemetry/+")  # a lone consumer: retained messages come on SUBSCRIBE
        car.publish(f"telemetry/{CAR_A}", b"live")
        wait_until(lambda: bool(consumer.received), what="the live message", timeout=10)
        assert consumer.payloads() == [b"live"]
    finally:
        _close(consumer, car)


def test_the_staged_password_file_and_acl_are_the_brokers_alone(broker: ShippedBroker) -> None:
    """broker/start.sh leaves both files mode 0600 in a 0700 directory, owned by the broker."""
    assert broker.staged.stat().st_mode & 0o777 == 0o700
    for name in ("passwd", "acl"):
        assert (broker.staged / name).stat().st_mode & 0o777 == 0o600
    # The broker read them after dropping root: its logins work (the other tests), so the
    # owner is right; here only that no one else can read them.


def test_the_real_edge_and_consumer_work_through_the_shipped_broker_with_their_logins(
    broker: ShippedBroker, tmp_path: Path, database_url: str, make_consumer: ConsumerFactory
) -> None:
    """Edge (login = VIN) -> broker -> consumer (its login, in a group) -> database -> ack."""
    spool = str(tmp_path / "spool.db")
    settings = EdgeSettings(
        vin=CAR_A,
        mqtt_url=broker.url(CAR_A),
        spool_path=spool,
        clock="trusted",
        sim_hz=10.0,
        sim_speedup=20.0,
        batch_max_age_s=0.3,
        shutdown_timeout_s=10.0,
    )
    make_consumer(mqtt_url=broker.url(CONSUMER), client_id=CONSUMER, args=["--group", "revline"])
    with running_edge(settings):
        wait_until(lambda: cold_counts(database_url, CAR_A)[0] >= 500, what="500 rows")
    total = spool_read(spool, SpoolReader.sample_count)
    wait_until(lambda: cold_counts(database_url, CAR_A)[0] >= total, what="every sample")
    assert cold_counts(database_url, CAR_A) == (total, total)
    # Stopping the edge waits for the end-to-end acks: the consumer's login could send them.
    open_ = spool_read(spool, SpoolReader.open_batches)
    assert open_ == 0
