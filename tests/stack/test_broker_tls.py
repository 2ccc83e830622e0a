"""The shipped broker's TLS listener, with the certificates of ``revline init``: clients verify it
with the generated CA (and refuse it under a wrong name or without that CA), cars log in through
it, and their telemetry reaches the consumer on the plain compose-network listener."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from revline.edge.config import EdgeSettings
from revline.edge.spool import SpoolReader
from tests.fixtures.broker import OBSERVER, MqttClient, ShippedBroker, shipped_broker
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import running_edge, spool_read
from tests.fixtures.services import wait_until

CAR = "1HGCM82633A004352"
CONSUMER = "revline-consumer-1"


@pytest.fixture
def broker() -> Iterator[ShippedBroker]:
    """The shipped broker, both listeners, one car and one consumer as logins."""
    with shipped_broker(vehicles=(CAR,), consumers=(CONSUMER,)) as started:
        yield started


def _handshake(port: int, context: ssl.SSLContext, name: str) -> dict[str, object]:
    """A TLS handshake with the listener as ``name``; the verified peer certificate."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        cert = tls.getpeercert()
        assert cert is not None
        return dict(cert)


def test_the_tls_listener_verifies_with_the_ca_that_revline_init_made(
    broker: ShippedBroker,
) -> None:
    """A client trusting only the generated CA accepts the broker as 127.0.0.1 and localhost."""
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    for name in ("127.0.0.1", "localhost"):
        cert = _handshake(broker.tls_port, context, name)
        assert ("DNS", "localhost") in cert["subjectAltName"]  # type: ignore[operator]


def test_the_tls_listener_is_refused_under_a_wrong_name_or_without_the_ca(
    broker: ShippedBroker,
) -> None:
    """Another host name, or the system's CAs alone, fail verification: no silent trust."""
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        _handshake(
            broker.tls_port,
            ssl.create_default_context(cafile=str(broker.ca_file)),
            "broker.example.org",
        )
    with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed|unable to get local"):
        _handshake(broker.tls_port, ssl.create_default_context(), "127.0.0.1")


def test_plain_mqtt_on_the_tls_port_gets_no_session(broker: ShippedBroker) -> None:
    """A client that skips TLS on 8883 never gets a CONNACK: the port speaks only TLS."""
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=10) as raw:
        # MQTT 3.1.1 CONNECT, client id "x", clean session, no login.
        raw.sendall(bytes([0x10, 13, 0, 4, *b"MQTT", 4, 2, 0, 60, 0, 1, *b"x"]))
        try:
            answer = raw.recv(64)
        except ConnectionResetError:
            answer = b""  # the broker dropped the non-TLS bytes
    assert not answer.startswith(b"\x20")  # not a CONNACK: a TLS alert, or the socket closed


def test_logins_and_the_acl_hold_on_the_tls_listener(broker: ShippedBroker) -> None:
    """Over TLS an anonymous client is refused, and the car's own telemetry reaches the consumer
    on the plain listener while its forged ack reaches nobody."""
    anonymous = broker.tls_client(None)
    car = broker.tls_client(CAR)
    consumer = broker.client(CONSUMER)
    try:
        assert anonymous.refused
        assert not car.refused
        consumer.subscribe("$share/revline/telemetry/+")
        listener = broker.client(OBSERVER)  # not the car's login: that would take it over
        listener.subscribe(f"ack/{CAR}")
        car.publish(f"ack/{CAR}", b"forged over TLS")
        car.publish(f"telemetry/{CAR}", b"over TLS")
        consumer.publish(f"ack/{CAR}", b"from the consumer")
        wait_until(lambda: bool(consumer.received), what="the car's telemetry", timeout=10)
        wait_until(lambda: bool(listener.received), what="the consumer's ack", timeout=10)
        assert consumer.payloads() == [b"over TLS"]
        assert listener.payloads() == [b"from the consumer"]
        listener.close()
    finally:
        _close(anonymous, car, consumer)


def _close(*clients: MqttClient) -> None:
    for client in clients:
        client.close()


def test_the_real_edge_over_mqtts_with_the_generated_ca_lands_every_sample(
    broker: ShippedBroker, tmp_path: Path, database_url: str, make_consumer: ConsumerFactory
) -> None:
    """An edge configured as edge.toml.example says (mqtts://<VIN>:...@host:8883, ca_file) stores
    and gets acked through the TLS listener; the consumer uses the plain one, as in compose."""
    spool = str(tmp_path / "spool.db")
    password = quote(broker.passwords[CAR], safe="")
    settings = EdgeSettings(
        vin=CAR,
        mqtt_url=f"mqtts://{CAR}:{password}@127.0.0.1:{broker.tls_port}",
        ca_file=str(broker.ca_file),
        spool_path=spool,
        clock="trusted",
        sim_hz=10.0,
        sim_speedup=20.0,
        batch_max_age_s=0.3,
        shutdown_timeout_s=10.0,
    )
    make_consumer(mqtt_url=broker.url(CONSUMER), client_id=CONSUMER, args=["--group", "revline"])
    with running_edge(settings):
        wait_until(lambda: cold_counts(database_url, CAR)[0] >= 300, what="300 rows")
    total = spool_read(spool, SpoolReader.sample_count)
    wait_until(lambda: cold_counts(database_url, CAR)[0] >= total, what="every sample")
    assert cold_counts(database_url, CAR) == (total, total)
    assert spool_read(spool, SpoolReader.open_batches) == 0
