"""The MQTT side of the consumer: a persistent session, QoS 1 subscription and manual PUBACKs.

paho-mqtt runs its network loop in its own thread. Each PUBLISH is handed to the asyncio loop as
an :class:`Inbound`; nothing is acknowledged until :meth:`Subscriber.ack` is called, which the
service does only after the database transaction holding the message has committed
(``manual_ack=True``; paho then never sends a PUBACK on its own). If the consumer dies first, the
broker redelivers every unacked message when the same client id reconnects.

Packet ids are only meaningful on the connection that delivered them: after a reconnect the
broker resends whatever was unacked (same ids, DUP set). So every :class:`Inbound` carries the
connection ``generation`` it came on, and acks for an older generation are dropped; the resent
copies are written again (idempotently) and acked instead.

Every failed connection attempt is logged with its reason (refused, host not found, TLS, not
authorized, closed before CONNACK), the first at once and then one line per 30 s with a count.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from revline.logs import kv
from revline.mqtt import BrokerAddress, Client, FailureLog, connect_error_reason, make_client

__all__ = ["Inbound", "Subscriber"]

log = logging.getLogger("revline.consumer.mqtt")

# CONNACK codes for "I do not speak this protocol version": 1 from an MQTT 3.1.1 broker that
# answered our v5 CONNECT in its own dialect, 132 from a v5-aware broker.
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})


@dataclass(frozen=True, slots=True)
class Inbound:
    """One PUBLISH as received: enough to decode it, dead-letter it and ack it later."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    """Wall-clock time (``time.time()``) when paho handed it over."""
    generation: int
    """Which connection delivered it; acks are only valid on that one."""
    dup: bool = False


class Subscriber:
    """A persistent MQTT session subscribed to telemetry, delivering into an asyncio queue.

    ``async with Subscriber(...) as sub:`` starts connecting (paho retries with backoff by itself
    while the broker is away); messages arrive on ``sub.inbound``. Leaving disconnects cleanly,
    which keeps the session (and any unacked messages) on the broker for the next start.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        subscription: str,
        session_expiry_s: int = 86_400,
        receive_maximum: int = 1_000,
        keepalive_s: int = 30,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.subscription = subscription
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.keepalive_s = keepalive_s
        self._tls_files = (ca_file, cert_file, key_file)
        self._on_state = on_state
        self.inbound: asyncio.Queue[Inbound | None] = asyncio.Queue()
        """Received messages; ``None`` is put by the service to wake its reader when stopping."""
        self.protocol: MQTTProtocolVersion = paho.MQTTv5
        self.generation = 0
        self.connected = False
        self.connects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._first_connack = threading.Event()
        self._refused_protocol = False
        self._delivering = True
        self._failures = FailureLog()
        self._attempt_failed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._start(paho.MQTTv5)
        # Wait briefly for the first CONNACK only to learn whether the broker speaks MQTT 5;
        # if the broker is down, paho keeps retrying in the background and we carry on.
        await asyncio.to_thread(self._first_connack.wait, 5.0)
        if self._refused_protocol:
            log.warning("broker refused MQTT 5; falling back to 3.1.1 (no receive maximum)")
            await asyncio.to_thread(self._stop_client)
            self._refused_protocol = False
            self._start(paho.MQTTv311)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._stop_client)

    def _stop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # A normal DISCONNECT with the session expiry from CONNECT keeps the session.
        client.disconnect()
        client.loop_stop()
        self._set_connected(value=False)

    def _start(self, protocol: MQTTProtocolVersion) -> None:
        self.protocol = protocol
        client = self._make_client(protocol)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        # Our own e2e acks may queue while disconnected; paho sends them after reconnecting.
        client.max_queued_messages_set(0)
        if protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry_s
            # Backpressure: the broker keeps at most this many unacked QoS 1 messages in
            # flight to us, so when we stop acking (database down) it stops sending and queues.
            props.ReceiveMaximum = self.receive_maximum
            client.connect_async(
                self.address.host,
                self.address.port,
                keepalive=self.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            client.connect_async(self.address.host, self.address.port, keepalive=self.keepalive_s)
        self._client = client
        client.loop_start()

    def _make_client(self, protocol: MQTTProtocolVersion) -> Client:
        ca_file, cert_file, key_file = self._tls_files
        return make_client(
            self.address,
            self.client_id,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            protocol=protocol,
            manual_ack=True,  # PUBACK only after commit: see Subscriber.ack
        )

    # -- paho callbacks (paho's thread) --------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: Any,
        reason_code: Any,
        _properties: Any = None,
    ) -> None:
        code = int(getattr(reason_code, "value", reason_code))
        if code != 0:
            if self.protocol == paho.MQTTv5 and code in _UNSUPPORTED_PROTOCOL:
                self._refused_protocol = True
            else:
                self._attempt_failure(f"refused by the broker: {reason_code} (code {code})")
            self._first_connack.set()
            return
        self.generation += 1
        self.connects += 1
        session_present = bool(getattr(flags, "session_present", False))
        # Always (re)subscribe: a broker that crashed has lost the session and its
        # subscriptions (session_present false); on a kept session this is a harmless no-op.
        client.subscribe(self.subscription, qos=1)
        self._set_connected(value=True)
        failed = self._failures.connected()
        log.info(
            "connected to broker",
            extra=kv(
                broker=str(self.address),
                client_id=self.client_id,
                subscription=self.subscription,
                session_present=session_present,
                protocol="5" if self.protocol == paho.MQTTv5 else "3.1.1",
                **({"after_failed_attempts": failed} if failed else {}),
            ),
        )
        self._first_connack.set()

    def _on_pre_connect(self, _client: paho.Client, _userdata: Any) -> None:
        self._attempt_failed = False  # a new attempt: its failure, if any, is counted once

    def _on_connect_fail(self, client: paho.Client, _userdata: Any) -> None:
        error = client.connect_error if isinstance(client, Client) else None
        self._attempt_failure(connect_error_reason(error, self.address))

    def _attempt_failure(self, reason: str) -> None:
        """Count a failed attempt and log it, rate-limited (paho's thread)."""
        if self._attempt_failed:
            return
        self._attempt_failed = True
        count = self._failures.failed(time.monotonic())
        if count:
            log.warning(
                "cannot connect to broker; retrying",
                extra=kv(
                    broker=str(self.address),
                    reason=reason,
                    failed_attempts=count,
                    every_s=self._failures.every_s,
                ),
            )

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason_code: Any,
        _properties: Any = None,
    ) -> None:
        was = self.connected
        self._set_connected(value=False)
        if self._client is None:
            return  # we are leaving
        if was:
            log.warning("disconnected from broker; reconnecting", extra=kv(reason=str(reason_code)))
        elif not self._refused_protocol:
            # The socket opened but closed before any CONNACK: typically a TLS listener that
            # got plain MQTT (mqtt:// to a TLS port), or a broker refusing at the TCP level.
            hint = "" if self.address.tls else " (a TLS port? use mqtts://)"
            self._attempt_failure(f"connection closed before CONNACK{hint}")

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if not self._delivering or self._loop is None:
            return  # stopping: left unacked, so the broker redelivers it to the next session
        item = Inbound(
            mid=msg.mid,
            qos=msg.qos,
            topic=msg.topic,
            payload=bytes(msg.payload),
            received_at=time.time(),
            generation=self.generation,
            dup=bool(msg.dup),
        )
        self._loop.call_soon_threadsafe(self.inbound.put_nowait, item)

    def _set_connected(self, *, value: bool) -> None:
        self.connected = value
        if self._on_state is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_state, value)

    # -- used by the service (asyncio thread) --------------------------------------------------

    def stop_delivering(self) -> None:
        """Stop handing over messages; what arrives from now on stays unacked on the broker."""
        self._delivering = False

    def ack(self, items: Iterable[Inbound]) -> int:
        """PUBACK committed messages, in the order given; returns how many were sent.

        Messages from an earlier connection are skipped: the broker has resent them on the
        current one, and those copies are acked when they commit.
        """
        client = self._client
        if client is None:
            return 0
        generation = self.generation
        sent = 0
        for item in items:
            if item.qos > 0 and item.generation == generation:
                rc = client.ack(item.mid, item.qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    sent += 1
        return sent

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 (used for the end-to-end acks); queued by paho while disconnected."""
        if self._client is not None:
            self._client.publish(topic, payload, qos=1)
