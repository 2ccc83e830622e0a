"""The test harness itself: real services that work, and that survive being killed."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from secrets import token_hex

import asyncpg
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage, MQTTv5
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.fixtures.services import MosquittoService, PostgresService, mqtt_answers, parse_mqtt_url


@contextmanager
def _connected(
    url: str, *, client_id: str | None = None, session_expiry: int = 0
) -> Iterator[tuple[Client, queue.Queue[MQTTMessage]]]:
    """A connected MQTT v5 paho client and the queue its received messages land in."""
    host, port = parse_mqtt_url(url)
    received: queue.Queue[MQTTMessage] = queue.Queue()
    connected = threading.Event()
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"harness-{token_hex(4)}",
        protocol=MQTTv5,
    )

    def on_connect(
        client: Client,
        userdata: object,
        flags: ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            connected.set()

    def on_message(client: Client, userdata: object, message: MQTTMessage) -> None:
        received.put(message)

    client.on_connect = on_connect
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: unannotated
    properties.SessionExpiryInterval = session_expiry
    client.connect(host, port, keepalive=30, clean_start=session_expiry == 0, properties=properties)
    client.loop_start()
    try:
        assert connected.wait(10), f"no CONNACK from {url}"
        yield client, received
    finally:
        client.disconnect()
        client.loop_stop()


def _subscribe(client: Client, topic: str) -> None:
    """Subscribe at QoS 1 and wait for the SUBACK."""
    subscribed = threading.Event()

    def on_subscribe(
        client: Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    assert subscribed.wait(10), f"no SUBACK for {topic}"


def test_a_qos1_message_reaches_a_subscriber(mqtt_url: str, unique_vin: str) -> None:
    """A QoS 1 message published by one client arrives at another subscribed to the topic."""
    topic = f"revline/test/{unique_vin}/harness"
    with _connected(mqtt_url) as (subscriber, received), _connected(mqtt_url) as (publisher, _):
        _subscribe(subscriber, topic)
        publisher.publish(topic, b"hello", qos=1).wait_for_publish(timeout=10)
        message = received.get(timeout=10)
    assert (message.topic, message.payload, message.qos) == (topic, b"hello", 1)


def test_a_fresh_database_answers(database_url: str) -> None:
    """asyncpg connects to the per-test database, which is empty and answers queries."""

    async def check() -> tuple[int, str, int]:
        connection = await asyncpg.connect(database_url)
        try:
            return (
                await connection.fetchval("select 1"),
                await connection.fetchval("select current_database()"),
                await connection.fetchval(
                    "select count(*) from pg_tables where schemaname = 'public'"
                ),
            )
        finally:
            await connection.close()

    one, name, tables = asyncio.run(check())
    assert (one, name, tables) == (1, database_url.rsplit("/", 1)[1], 0)


def test_a_killed_broker_restarts_on_the_same_port(fresh_mosquitto: MosquittoService) -> None:
    """After SIGKILL and restart, the broker accepts clients again at the same URL."""
    url = fresh_mosquitto.url
    fresh_mosquitto.kill()
    assert not fresh_mosquitto.is_running()
    assert not mqtt_answers(fresh_mosquitto.host, fresh_mosquitto.port)
    fresh_mosquitto.restart()
    assert fresh_mosquitto.url == url
    with _connected(url) as (client, _):
        assert client.is_connected()


def test_a_gracefully_restarted_broker_keeps_queued_messages(
    fresh_mosquitto: MosquittoService, unique_vin: str
) -> None:
    """A QoS 1 message queued for an offline persistent session survives a graceful restart."""
    topic = f"revline/test/{unique_vin}/persisted"
    client_id = f"harness-persistent-{unique_vin}"
    with _connected(fresh_mosquitto.url, client_id=client_id, session_expiry=300) as (client, _):
        _subscribe(client, topic)
    with _connected(fresh_mosquitto.url) as (publisher, _):
        publisher.publish(topic, b"kept", qos=1).wait_for_publish(timeout=10)
    fresh_mosquitto.restart()
    with _connected(fresh_mosquitto.url, client_id=client_id, session_expiry=300) as (_, received):
        message = received.get(timeout=10)
    assert (message.topic, message.payload) == (topic, b"kept")


def test_a_killed_database_restarts_with_committed_rows(
    fresh_postgres: PostgresService, database_url: str
) -> None:
    """After SIGKILL and restart, PostgreSQL answers at the same URL with committed rows intact."""

    async def write() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("create table t (n int)")
            await connection.execute("insert into t values (42)")
        finally:
            await connection.close()

    async def read() -> int:
        connection = await asyncpg.connect(database_url)
        try:
            return int(await connection.fetchval("select sum(n) from t"))
        finally:
            await connection.close()

    url = fresh_postgres.url
    asyncio.run(write())
    fresh_postgres.kill()
    assert not fresh_postgres.is_running()
    fresh_postgres.restart()
    assert fresh_postgres.url == url
    assert asyncio.run(read()) == 42
