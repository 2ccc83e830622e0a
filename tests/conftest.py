"""Fixtures: the real MQTT broker and PostgreSQL every integration test runs against.

Each service starts once per session, on first use (see revline/tools/localservices.py for how it
is found: ``MQTT_URL``/``DATABASE_URL``, else Docker, else local binaries). A missing binary fails
the test with an install hint; nothing is skipped silently.

On top of them, what the integration tests share: a migrated database, a listener on the test
vehicle's ack topic, and factories of consumer processes and publishers that close what they made
when the test ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence

import pytest

from revline.storage.migrate import MigrateSettings, migrate_dsn
from tests.fixtures.consumer import (
    AckListener,
    ConsumerFactory,
    ConsumerProcess,
    Publisher,
    PublisherFactory,
)
from tests.fixtures.services import MosquittoFactory, MosquittoService, PostgresService

logger = logging.getLogger(__name__)

# VIN characters: digits and capitals except I, O and Q (ISO 3779).
_VIN_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
_VIN_YEARS = "ABCDEFGHJKLMNPRSTVWXY123456789"
# Check-digit transliteration (49 CFR 565.15): digits are themselves, letters per this table.
_VIN_VALUES = {
    **{digit: int(digit) for digit in "0123456789"},
    **{
        c: int(v) for c, v in zip("ABCDEFGHJKLMNPRSTUVWXYZ", "12345678123457923456789", strict=True)
    },
}
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)


def random_vin() -> str:
    """A random VIN that passes every check: alphabet, model-year letter and check digit."""
    chars = [secrets.choice(_VIN_ALPHABET) for _ in range(17)]
    chars[9] = secrets.choice(_VIN_YEARS)
    total = sum(
        weight * _VIN_VALUES[char] for char, weight in zip(chars, _VIN_WEIGHTS, strict=True)
    )
    chars[8] = "X" if total % 11 == 10 else str(total % 11)
    return "".join(chars)


def _ensure_running(service: MosquittoService | PostgresService) -> None:
    """Bring back a service that an earlier test left stopped or killed."""
    if service.controllable and not service.is_running():
        service.restart()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoService]:
    """The session's MQTT broker, started on first use and torn down at session end."""
    with MosquittoService.from_env(os.environ) as service:
        yield service


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresService]:
    """The session's PostgreSQL server, started on first use and torn down at session end."""
    with PostgresService.from_env(os.environ) as service:
        yield service


@pytest.fixture
def fresh_mosquitto(mosquitto: MosquittoService) -> Iterator[MosquittoService]:
    """The session broker for a test that stops or kills it; running again after the test."""
    if not mosquitto.controllable:
        pytest.skip("needs a service the tests started (MQTT_URL is set)")
    _ensure_running(mosquitto)
    yield mosquitto
    _ensure_running(mosquitto)


@pytest.fixture
def fresh_postgres(postgres: PostgresService) -> Iterator[PostgresService]:
    """The session PostgreSQL for a test that stops or kills it; running again after the test."""
    if not postgres.controllable:
        pytest.skip("needs a service the tests started (DATABASE_URL is set)")
    _ensure_running(postgres)
    yield postgres
    _ensure_running(postgres)


@pytest.fixture
def mqtt_url(mosquitto: MosquittoService) -> str:
    """The session broker's URL, ``mqtt://host:port``."""
    _ensure_running(mosquitto)
    return mosquitto.url


@pytest.fixture
def database_url(postgres: PostgresService, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a brand-new empty database for this test alone, dropped afterwards."""
    _ensure_running(postgres)
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t_{stem}_{secrets.token_hex(4)}"
    yield postgres.create_database(name)
    try:
        _ensure_running(postgres)
        postgres.drop_database(name)
    except Exception:  # best effort: a leftover database harms no other test
        logger.warning("could not drop test database %s", name, exc_info=True)


@pytest.fixture
def unique_vin() -> str:
    """A random valid VIN, so this test has its own MQTT topics and rows."""
    return random_vin()


@pytest.fixture
def make_mosquitto() -> Iterator[MosquittoFactory]:
    """Factory for extra brokers with their own config lines, each closed after the test.

    Call as ``make_mosquitto(extra_config=["max_queued_messages 10"])``; it returns a started
    broker the tests control. Skipped when MQTT_URL is set: its config cannot be changed.
    """
    if os.environ.get("MQTT_URL"):
        pytest.skip("needs a broker the tests start (MQTT_URL is set)")
    made: list[MosquittoService] = []

    def make(*, extra_config: Sequence[str] = ()) -> MosquittoService:
        service = MosquittoService(extra_config=extra_config)
        made.append(service)
        service.start()
        return service

    yield make
    for service in reversed(made):
        service.close()


@pytest.fixture
def migrated_db(database_url: str) -> str:
    """This test's own database (:func:`database_url`) with the schema ``revline migrate`` makes."""
    asyncio.run(migrate_dsn(database_url, MigrateSettings(database_url=database_url)))
    return database_url


@pytest.fixture
def ack_listener(mqtt_url: str, unique_vin: str) -> Iterator[AckListener]:
    """The batch ids acked on ``ack/<unique_vin>`` of the session broker, from before the test
    body runs."""
    listener = AckListener(mqtt_url, unique_vin)
    yield listener
    listener.close()


@pytest.fixture
def make_consumer(mqtt_url: str, migrated_db: str) -> Iterator[ConsumerFactory]:
    """Factory of ``revline consumer`` subprocesses, each killed and its broker session dropped
    after the test.

    Call as ``make_consumer(client_id=..., args=[...])``: by default it reads the session broker
    and writes this test's migrated database, under a client id of its own, and it returns once
    the consumer is healthy (``start=False``: not started yet; call ``.start()``, or ``.launch()``
    for one that cannot become healthy). ``drop=False``: no broker session is dropped after the
    test (a consumer that never reaches its broker has none).
    """
    made: list[ConsumerProcess] = []
    session_broker = mqtt_url  # the arguments of make() below shadow the fixture's

    def make(
        *,
        client_id: str | None = None,
        mqtt_url: str | None = None,
        database_url: str | None = None,
        args: Sequence[str] = (),
        start: bool = True,
        drop: bool = True,
    ) -> ConsumerProcess:
        consumer = ConsumerProcess(
            mqtt_url=mqtt_url or session_broker,
            database_url=database_url or migrated_db,
            client_id=client_id or f"c-{secrets.token_hex(4)}",
            args=args,
            drop=drop,
        )
        made.append(consumer)
        if start:
            consumer.start()
        return consumer

    yield make
    for consumer in reversed(made):
        consumer.close()


@pytest.fixture
def make_publisher(mqtt_url: str) -> Iterator[PublisherFactory]:
    """Factory of QoS 1 publishers (clean session), connected to ``mqtt_url`` or the session
    broker; each disconnected after the test."""
    made: list[Publisher] = []

    def make(url: str | None = None) -> Publisher:
        publisher = Publisher(url or mqtt_url)
        made.append(publisher)
        return publisher

    yield make
    for publisher in reversed(made):
        publisher.close()
