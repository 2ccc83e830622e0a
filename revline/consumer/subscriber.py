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

Memory is bounded by bytes, not only by the broker's Receive Maximum (see consumer/budget.py):
paho's thread waits in ``on_message`` while ``max_inflight_bytes`` are held for unacked
messages, so the socket is not read and TCP holds the broker back. While it waits, paho sends no
PINGREQ either: a wait longer than 1.5 keepalives (the database down with the budget full)
costs the connection, which paho re-establishes once the wait ends; the broker keeps the session
and redelivers what was not acked, and the writes are idempotent. The wait is logged.

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

from revline.consumer.budget import ByteBudget, return_memory, tune_allocator
from revline.logs import Throttle, kv
from revline.mqtt import BrokerAddress, Client, connect_error_reason, make_client

__all__ = ["Inbound", "Subscriber"]

log = logging.getLogger("revline.consumer.mqtt")

# CONNACK codes for "I do not speak this protocol version": 1 from an MQTT 3.1.1 broker that
# answered our v5 CONNECT in its own dialect, 132 from a v5-aware broker.
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})

DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
_PAUSE_LOGGED_AFTER_S = 5.0
"""A wait for the byte budget longer than this is a stall (the database), not a burst: log it."""
_TRIM_AFTER_IDLE_S = 1.0
"""Return memory once nothing was held for this long after a peak of a quarter of the budget."""


@dataclass(slots=True)
class Inbound:
    """One PUBLISH as received: enough to decode it, dead-letter it and ack it later.

    Mutable only in ``held``: the bytes charged to the byte budget once decoded.
    """

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    """Wall-clock time (``time.time()``) when paho handed it over."""
    generation: int
    """Which connection delivered it; acks are only valid on that one."""
    dup: bool = False
    held: int = 0
    """Bytes charged to the budget for it once decoded (:meth:`Subscriber.hold`)."""


class Subscriber:
    """A persistent MQTT session subscribed to telemetry, delivering into an asyncio queue.

    ``async with Subscriber(...) as sub:`` starts connecting (paho retries with backoff by itself
    while the broker is away); messages arrive on ``sub.inbound``. Leaving disconnects cleanly,
    which keeps the session (and any unacked messages) on the broker for the next start.

    The reader of ``inbound`` calls :meth:`hold` once it has decoded a message and, before
    decoding the next, waits in :meth:`room`; :meth:`ack` gives the bytes back.
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
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
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
        self.budget = ByteBudget(max_inflight_bytes)
        self._room = asyncio.Event()
        self._trim: asyncio.TimerHandle | None = None
        self._failures = Throttle(30.0)
        self._attempt_failed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        tune_allocator()
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
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        await asyncio.to_thread(self._stop_client)

    def _stop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self.budget.wake()  # a network thread waiting for room gives up (see _on_message)
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
        failed = self._failures.total
        self._failures.reset()
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
        count = self._failures.event(time.monotonic())
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

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if not self._delivering or self._loop is None:
            return  # stopping: left unacked, so the broker redelivers it to the next session
        payload = bytes(msg.payload)
        if not self._admit(client, len(payload)):
            return  # stopping while waiting: left unacked, as above
        item = Inbound(
            mid=msg.mid,
            qos=msg.qos,
            topic=msg.topic,
            payload=payload,
            received_at=time.time(),
            generation=self.generation,
            dup=bool(msg.dup),
        )
        self._loop.call_soon_threadsafe(self.inbound.put_nowait, item)

    def _admit(self, client: paho.Client, size: int) -> bool:
        """Wait (paho's thread) until ``size`` more bytes fit in the budget; False if stopping."""
        budget = self.budget
        if budget.admit(size, timeout=0):
            return True
        started = time.monotonic()
        logged = False
        while not budget.admit(size, timeout=1.0):
            if not self._delivering or self._client is not client:
                return False
            if not logged and time.monotonic() - started >= _PAUSE_LOGGED_AFTER_S:
                logged = True
                log.warning(
                    "reading from the broker paused: the byte budget is full of unacked messages",
                    extra=kv(
                        held_bytes=budget.in_flight,
                        max_inflight_bytes=budget.limit,
                        keepalive_s=self.keepalive_s,
                    ),
                )
        if logged:
            log.info(
                "reading from the broker resumed",
                extra=kv(paused_s=round(time.monotonic() - started, 1)),
            )
        return True

    def _set_connected(self, *, value: bool) -> None:
        self.connected = value
        if self._on_state is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_state, value)

    # -- used by the service (asyncio thread) --------------------------------------------------

    def stop_delivering(self) -> None:
        """Stop handing over messages; what arrives from now on stays unacked on the broker."""
        self._delivering = False
        self.budget.wake()

    def hold(self, item: Inbound, size: int) -> None:
        """``item`` was decoded: it now holds ``size`` bytes (raw payload included) until acked."""
        self.budget.decoded(len(item.payload), size)
        item.held = size

    async def room(self) -> None:
        """Wait until the next message may be decoded: the byte budget has room, or nothing
        decoded is held. The caller must first hand over what it holds, or wait forever."""
        while True:
            self._room.clear()
            if self.budget.may_decode():
                return
            await self._room.wait()

    def ack(self, items: Iterable[Inbound]) -> int:
        """PUBACK committed messages, in the order given; returns how many were sent.

        Messages from an earlier connection are skipped: the broker has resent them on the
        current one, and those copies are acked when they commit. Either way their bytes are
        given back to the budget.
        """
        client = self._client
        generation = self.generation
        sent = released = 0
        for item in items:
            released += item.held
            item.held = 0
            if client is not None and item.qos > 0 and item.generation == generation:
                rc = client.ack(item.mid, item.qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    sent += 1
        if released:
            self.budget.release(released)
            self._room.set()
            if self.budget.in_flight == 0 and self._trim is None and self._loop is not None:
                self._trim = self._loop.call_later(_TRIM_AFTER_IDLE_S, self._trim_when_idle)
        return sent

    def _trim_when_idle(self) -> None:
        self._trim = None
        budget = self.budget
        if budget.in_flight == 0 and budget.high_water() >= budget.limit // 4:
            budget.high_water(reset=True)
            return_memory()

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish QoS 1 (used for the end-to-end acks); queued by paho while disconnected."""
        if self._client is not None:
            self._client.publish(topic, payload, qos=1)
