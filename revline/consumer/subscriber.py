"""The MQTT side of the consumer: a persistent session, QoS 1 subscription and manual PUBACKs.

An asyncio-native MQTT 5 / 3.1.1 client on the consumer's own event loop (no thread): each read
from the socket is split into every complete packet it holds (:mod:`revline.consumer.mqttwire`)
and each PUBLISH goes into ``inbound`` as an :class:`Inbound`. Nothing is acknowledged until
:meth:`Subscriber.ack` is called, which the service does only after the database transaction
holding the message has committed; all of a commit's PUBACKs go out as one write. If the
consumer dies first, the broker redelivers every unacked message when the same client id
reconnects (clean start false and a session expiry; 3.1.1: clean session false).

Why not paho: its network thread costs ~100-200 µs per received message whatever its size (a
``select`` and a loop iteration per packet, a hand-over to the event loop, its message objects),
about 40 % of the consumer with 1-sample messages.

Packet ids are only meaningful on the connection that delivered them: after a reconnect the
broker resends whatever was unacked (same ids, DUP set). So every :class:`Inbound` carries the
connection ``generation`` it came on, and acks for an older generation are dropped; the resent
copies are written again (idempotently) and acked instead.

Memory is bounded by bytes, not only by the broker's Receive Maximum (see consumer/budget.py):
while ``max_inflight_bytes`` are held for unacked messages, the socket is not read
(``transport.pause_reading``) and TCP holds the broker back; reading resumes when acks free
room. PINGREQs still go out meanwhile, so the connection survives a long wait (the database
down with the budget full). A wait longer than 5 s is logged.

Every failed connection attempt is logged with its reason (refused, host not found, TLS, not
authorized, closed before CONNACK), the first at once and then one line per 30 s with a count.
A broker that sends something malformed loses the connection (logged), never the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from revline.consumer import mqttwire as wire
from revline.consumer.budget import ByteBudget, return_memory, tune_allocator
from revline.consumer.mqttwire import MQTT_5, MQTT_311, ProtocolError, puback_packets
from revline.logs import Throttle, kv
from revline.mqtt import BrokerAddress, connect_error_reason, tls_context

__all__ = ["Inbound", "Subscriber", "puback_packets"]

log = logging.getLogger("revline.consumer.mqtt")

# CONNACK codes for "I do not speak this protocol version": 1 from an MQTT 3.1.1 broker that
# answered our v5 CONNECT in its own dialect, 132 from a v5-aware broker.
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})

DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
_PAUSE_LOGGED_AFTER_S = 5.0
"""A wait for the byte budget longer than this is a stall (the database), not a burst: log it."""
_TRIM_AFTER_IDLE_S = 1.0
"""Return memory once nothing was held for this long after a peak of a quarter of the budget."""
_RECONNECT_MIN_S = 1.0
_RECONNECT_MAX_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
"""For the TCP (and TLS) connect, and again for the CONNACK."""
_MAX_OUTGOING = 60_000
"""End-to-end acks kept for sending or resending at QoS 1 (packet ids are 16 bits); beyond, a new
one is dropped: the vehicle re-sends the batch it does not see acked, and gets it acked again."""
_OUT_INFLIGHT = 1_000
"""Our QoS 1 PUBLISHes unacked by the broker at once, at most (and at most its Receive Maximum)."""


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
    """Wall-clock time (``time.time()``) when it was read from the socket."""
    generation: int
    """Which connection delivered it; acks are only valid on that one."""
    dup: bool = False
    held: int = 0
    """Bytes charged to the budget for it once decoded (:meth:`Subscriber.hold`)."""


class _ClosedBeforeConnackError(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One connection to the broker: splits what arrives into packets, hands PUBLISHes to the
    subscriber, answers nothing by itself but PINGREQs on its timer."""

    def __init__(self, sub: Subscriber, version: int) -> None:
        self.sub = sub
        self.version = version
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.connack: asyncio.Future[wire.Connack] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.generation = 0
        self.last_in = loop.time()
        self.paused = False
        """Reading stopped: the byte budget is full; ``_chunks`` hold what is not yet parsed."""
        self.disconnect_reason: str | None = None
        self.pings = 0
        """PINGREQs written; the broker answers each in order, after what was written before."""
        self.pongs = 0
        self.answered: asyncio.Future[None] | None = None
        """Set once ``pongs`` reaches :attr:`_answered_at`: the broker has handled everything
        written before that PINGREQ (:meth:`barrier`)."""
        self._answered_at = 0
        self.keepalive_s = sub.keepalive_s
        self._chunks: list[bytes] = []
        """Received, not yet handled: the start of an incomplete packet, or all while paused."""
        self._have = 0
        self._need = 0
        """Bytes the packet at the start of ``_chunks`` needs (0: not known yet)."""

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(_ClosedBeforeConnackError(str(exc) if exc else ""))
            self.connack.exception()  # retrieved: the attempt may have given up waiting already
        if self.disconnect_reason is None:
            self.disconnect_reason = str(exc) if exc else "connection closed by the broker"
        self._chunks = []
        if not self.lost.done():
            self.lost.set_result(None)
        self.sub._connection_lost(self)

    def data_received(self, data: bytes) -> None:
        self.last_in = self.loop.time()
        chunks = self._chunks
        if not chunks and not self.paused:
            self.parse(data)
            return
        # A large packet arriving in pieces: keep them and join once, not on every read.
        chunks.append(data)
        self._have += len(data)
        if self.paused or self._have < self._need:
            return
        self._take_and_parse()

    def _take_and_parse(self) -> None:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._have = 0
        self.parse(data)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def ping(self) -> None:
        self.write(wire.PINGREQ_PACKET)
        self.pings += 1

    async def barrier(self, timeout_s: float) -> None:
        """A PINGREQ, then wait (at most ``timeout_s``, or until the link is lost) for its own
        PINGRESP, not an earlier keepalive's: everything written before is then handled."""
        self.ping()
        self._answered_at = self.pings
        self.answered = self.loop.create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.wait({self.answered, self.lost}, return_when=asyncio.FIRST_COMPLETED)

    def abort(self, reason: str) -> None:
        """Drop the connection (the broker keeps the session and redelivers)."""
        self.disconnect_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # -- receiving ------------------------------------------------------------------------------

    def parse(self, buf: bytes) -> None:
        """Handle every complete packet in ``buf``; keep the rest (an incomplete packet, or all
        from where the byte budget is full: reading pauses)."""
        n = len(buf)
        pos = 0
        self._need = 0
        sub = self.sub
        budget = sub.budget
        put = sub.inbound.put_nowait
        split, read_publish = wire.split, wire.read_publish
        version = self.version
        generation = self.generation
        now = time.time()
        freed = False
        try:
            while pos < n:
                packet = split(buf, pos)
                if packet is None:
                    break
                first, i, end = packet
                if end > n:
                    self._need = end - pos
                    break
                if first >> 4 == wire.PUBLISH:
                    if not sub.delivering:
                        pos = end  # stopping: left unacked, the broker redelivers it
                        continue
                    topic, payload, qos, mid, dup = read_publish(first, buf, i, end, version)
                    if not budget.admit(len(payload)):
                        self._pause()
                        break
                    put(Inbound(mid, qos, topic, payload, now, generation, dup))
                else:
                    freed |= self._control(first, buf[i:end])
                    # A CONNACK opens a generation: the PUBLISHes right behind it (a kept
                    # session's backlog, often in the same read) belong to it.
                    generation = self.generation
                pos = end
        except ProtocolError as exc:
            log.warning(
                "malformed packet from the broker; reconnecting",
                extra=kv(broker=str(sub.address), error=str(exc)),
            )
            self.abort(f"malformed packet: {exc}")
            return
        if pos < n:
            self._chunks = [buf[pos:] if pos else buf]
            self._have = n - pos
        if freed:
            sub._send_queued()

    def _control(self, first: int, body: bytes) -> bool:
        """Any packet but PUBLISH; True when one of our PUBLISHes was acked (room to send)."""
        kind = first >> 4
        sub = self.sub
        if kind == wire.PUBACK:
            sub._published(wire.read_puback(body))
            return True
        if kind == wire.PINGRESP:
            self.pongs += 1
            waiting = self.answered
            if waiting is not None and not waiting.done() and self.pongs >= self._answered_at:
                waiting.set_result(None)
            return False
        if kind == wire.CONNACK:
            if self.connack.done():
                raise ProtocolError("a second CONNACK")
            connack = wire.read_connack(body, self.version)
            self.connack.set_result(connack)
            if connack.code == 0:
                sub._connected(self, connack)
            return False
        if kind == wire.SUBACK:
            _, codes = wire.read_suback(body, self.version)
            if any(code >= 0x80 for code in codes):
                name, code = wire.connack_reason(codes[0], MQTT_5)
                log.error(
                    "the broker refused the subscription; nothing will arrive",
                    extra=kv(subscription=sub.subscription, reason=name, code=code),
                )
            return False
        if kind == wire.DISCONNECT:
            code = wire.read_disconnect(body, self.version)
            self.disconnect_reason = f"{wire.disconnect_reason(code)} (code {code})"
            if self.transport is not None:
                self.transport.close()
            return False
        raise ProtocolError(f"unexpected packet type {kind}")

    def _pause(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        self.sub._paused(self)

    def resume(self) -> None:
        """The budget has room again (or we are stopping): go on where :meth:`parse` stopped."""
        if not self.paused:
            return
        self.paused = False
        self.last_in = self.loop.time()
        if self._chunks:
            self._take_and_parse()
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class Subscriber:
    """A persistent MQTT session subscribed to telemetry, delivering into an asyncio queue.

    ``async with Subscriber(...) as sub:`` starts connecting (retrying with backoff while the
    broker is away); messages arrive on ``sub.inbound``. Leaving disconnects cleanly, which keeps
    the session (and any unacked messages) on the broker for the next start.

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
        self.protocol = MQTT_5
        """The MQTT version spoken: 5, or 4 (3.1.1) once a broker refused 5."""
        self.generation = 0
        self.connected = False
        self.connects = 0
        self.delivering = True
        self.budget = ByteBudget(max_inflight_bytes)
        self._conn: _Connection | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._closing = False
        self._room = asyncio.Event()
        self._trim: asyncio.TimerHandle | None = None
        self._failures = Throttle(30.0)
        self._attempt_failed = False
        self._pause_log: asyncio.TimerHandle | None = None
        self._paused_at: float | None = None
        self._pause_logged = False
        # Our QoS 1 PUBLISHes (end-to-end acks): packet id -> (topic, payload), in order, kept
        # until the broker PUBACKs them; sent at most _inflight at once, resent after a reconnect.
        self._outgoing: dict[int, tuple[str, bytes]] = {}
        self._unsent: deque[int] = deque()
        self._inflight: set[int] = set()
        self._sent_before: set[int] = set()
        self._quota = _OUT_INFLIGHT
        self._next_mid = 0
        self._dropped_acks = 0
        self._v5_refused = False
        self._flush_scheduled = False
        self._out_qos0: list[bytes] = []
        """QoS 0 PUBLISHes waiting for :meth:`_flush` (dropped if the connection goes)."""
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        ca_file, cert_file, key_file = self._tls_files
        self._ssl = (
            tls_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            if self.address.tls
            else None
        )
        tune_allocator()
        self._run_task = asyncio.create_task(self._run(), name="mqtt")
        # Wait briefly for the first attempt only so that "consumer started" follows the first
        # CONNACK when the broker is there; if it is down we carry on and keep retrying.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._first_attempt.wait()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        if self._pause_log is not None:
            self._pause_log.cancel()
            self._pause_log = None
        conn = self._conn
        if conn is not None and conn.transport is not None:
            # A normal DISCONNECT with the session expiry from CONNECT keeps the session. Before
            # it, a PINGREQ and its PINGRESP: the broker has then handled the last PUBACKs (seen:
            # Mosquitto 2.0 in MQTT 3.1.1 dropping the second of two PUBACKs written right
            # before a DISCONNECT and the close; those messages came back, DUP, on the next
            # connection). Not while reading is paused: the answer would not be read.
            if self.connected:
                if not conn.paused:
                    await conn.barrier(2.0)
                conn.write(wire.disconnect_packet())
            conn.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(conn.lost)
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
            self._run_task = None
        self._set_connected(value=False)

    # -- connecting ----------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve the connection until it is lost, wait (backoff), again; forever."""
        delay = _RECONNECT_MIN_S
        while not self._closing:
            conn = await self._attempt()
            self._first_attempt.set()
            if conn is None and self._refused_protocol():
                continue  # at once, in 3.1.1
            if conn is not None:
                delay = _RECONNECT_MIN_S
                keepalive = asyncio.create_task(self._keepalive(conn), name="mqtt-keepalive")
                try:
                    await asyncio.shield(conn.lost)
                finally:
                    keepalive.cancel()
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(_RECONNECT_MAX_S, delay * 2)

    def _refused_protocol(self) -> bool:
        refused, self._v5_refused = self._v5_refused, False
        return refused

    async def _attempt(self) -> _Connection | None:
        """One connection attempt: the connection once the broker said yes, else None (logged)."""
        self._attempt_failed = False  # a new attempt: its failure, if any, is counted once
        loop = asyncio.get_running_loop()
        version = self.protocol
        address = self.address
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, version),
                    address.host,
                    address.port,
                    ssl=self._ssl,
                    server_hostname=address.host if self._ssl is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            self._attempt_failure(connect_error_reason(exc, address))
            return None
        try:
            return await self._handshake(conn, version)
        except BaseException:
            conn.abort("stopping")  # cancelled (leaving) while waiting for the CONNACK
            raise

    async def _handshake(self, conn: _Connection, version: int) -> _Connection | None:
        """CONNECT and wait for the CONNACK: the connection if accepted, else None (logged)."""
        address = self.address
        conn.write(
            wire.connect_packet(
                client_id=self.client_id,
                version=version,
                keepalive_s=self.keepalive_s,
                username=address.username,
                password=address.password,
                session_expiry_s=self.session_expiry_s,
                receive_maximum=self.receive_maximum,
            )
        )
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                connack = await asyncio.shield(conn.connack)
        except _ClosedBeforeConnackError:
            # The socket opened but closed before any CONNACK: typically a TLS listener that
            # got plain MQTT (mqtt:// to a TLS port), or a broker refusing at the TCP level.
            hint = "" if address.tls else " (a TLS port? use mqtts://)"
            self._attempt_failure(f"connection closed before CONNACK{hint}")
            return None
        except TimeoutError:
            conn.abort("no CONNACK")
            self._attempt_failure(connect_error_reason(TimeoutError(), address))
            return None
        if connack.code == 0:
            return conn  # connected by then: _Connection._control saw its CONNACK
        conn.abort("refused")
        if version == MQTT_5 and connack.code in _UNSUPPORTED_PROTOCOL:
            log.warning("broker refused MQTT 5; falling back to 3.1.1 (no receive maximum)")
            self.protocol = MQTT_311
            self._v5_refused = True
        else:
            name, code = wire.connack_reason(connack.code, version)
            self._attempt_failure(f"refused by the broker: {name} (code {code})")
        return None

    def _connected(self, conn: _Connection, connack: wire.Connack) -> None:
        self.generation += 1
        self.connects += 1
        conn.generation = self.generation
        self._conn = conn
        if connack.server_keepalive_s is not None:
            conn.keepalive_s = connack.server_keepalive_s
        self._quota = max(1, min(_OUT_INFLIGHT, connack.receive_maximum))
        # Always (re)subscribe: a broker that crashed has lost the session and its
        # subscriptions (session_present false); on a kept session this is a harmless no-op.
        conn.write(wire.subscribe_packet(self._mid(), self.subscription, version=conn.version))
        # Our unacked PUBLISHes again, in order, DUP where they had been sent (MQTT 4.4).
        self._sent_before |= self._inflight
        self._inflight.clear()
        self._unsent = deque(self._outgoing)
        self._set_connected(value=True)
        self._send_queued()
        failed = self._failures.total
        self._failures.reset()
        log.info(
            "connected to broker",
            extra=kv(
                broker=str(self.address),
                client_id=self.client_id,
                subscription=self.subscription,
                session_present=connack.session_present,
                protocol="5" if conn.version == MQTT_5 else "3.1.1",
                **({"after_failed_attempts": failed} if failed else {}),
            ),
        )

    async def _keepalive(self, conn: _Connection) -> None:
        """PINGREQ every half keepalive (also while reading is paused, so that a long wait for
        the budget does not cost the connection); a silent broker (no packet for 1.5 keepalives
        while we read) loses it."""
        keepalive = conn.keepalive_s
        if keepalive <= 0:
            return
        loop = asyncio.get_running_loop()
        while not conn.lost.done():
            await asyncio.sleep(keepalive / 2)
            conn.ping()
            if not conn.paused and loop.time() - conn.last_in > keepalive * 1.5:
                conn.abort(f"no answer from the broker for {keepalive * 1.5:g} s")

    def _attempt_failure(self, reason: str) -> None:
        """Count a failed attempt and log it, rate-limited."""
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

    def _connection_lost(self, conn: _Connection) -> None:
        if conn is not self._conn:
            return  # an attempt that never got its CONNACK
        self._conn = None
        was = self.connected
        self._set_connected(value=False)
        self._sent_before |= self._inflight
        self._inflight.clear()
        self._unpaused()
        if was and not self._closing:
            log.warning(
                "disconnected from broker; reconnecting",
                extra=kv(reason=conn.disconnect_reason or "connection lost"),
            )

    def _set_connected(self, *, value: bool) -> None:
        if self.connected == value:
            return
        self.connected = value
        if self._on_state is not None:
            self._on_state(value)

    # -- the byte budget -----------------------------------------------------------------------

    def _paused(self, conn: _Connection) -> None:
        """Reading stopped for the budget: log it if it lasts (a stall, not a burst)."""
        if self._paused_at is None:
            self._paused_at = time.monotonic()
        if self._pause_log is None:
            loop = asyncio.get_running_loop()
            self._pause_log = loop.call_later(_PAUSE_LOGGED_AFTER_S, self._log_pause)

    def _log_pause(self) -> None:
        self._pause_log = None
        self._pause_logged = True
        budget = self.budget
        log.warning(
            "reading from the broker paused: the byte budget is full of unacked messages",
            extra=kv(
                held_bytes=budget.in_flight,
                max_inflight_bytes=budget.limit,
                keepalive_s=self.keepalive_s,
            ),
        )

    def _unpaused(self) -> None:
        if self._pause_log is not None:
            self._pause_log.cancel()
            self._pause_log = None
        if self._pause_logged and self._paused_at is not None:
            log.info(
                "reading from the broker resumed",
                extra=kv(paused_s=round(time.monotonic() - self._paused_at, 1)),
            )
        self._pause_logged = False
        self._paused_at = None

    def _resume(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
            if not conn.paused:
                self._unpaused()

    # -- used by the service -------------------------------------------------------------------

    def stop_delivering(self) -> None:
        """Stop handing over messages; what arrives from now on stays unacked on the broker."""
        self.delivering = False
        self._resume()

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
        """PUBACK committed messages, in the order given, as one write; how many were sent.

        Messages from an earlier connection are skipped: the broker has resent them on the
        current one, and those copies are acked when they commit. Either way their bytes are
        given back to the budget.
        """
        conn = self._conn
        generation = self.generation if self.connected else -1
        released = 0
        mids: list[int] = []
        for item in items:
            released += item.held
            item.held = 0
            if item.qos == 1 and item.generation == generation:
                mids.append(item.mid)
        sent = 0
        if conn is not None and mids:
            conn.write(puback_packets(mids))
            sent = len(mids)
        if released:
            self.budget.release(released)
            self._room.set()
            self._resume()
            if self.budget.in_flight == 0 and self._trim is None:
                self._trim = asyncio.get_running_loop().call_later(
                    _TRIM_AFTER_IDLE_S, self._trim_when_idle
                )
        return sent

    def _trim_when_idle(self) -> None:
        self._trim = None
        budget = self.budget
        if budget.in_flight == 0 and budget.high_water() >= budget.limit // 4:
            budget.high_water(reset=True)
            return_memory()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish (the end-to-end acks); at QoS 1 kept while disconnected and sent after
        reconnecting, at QoS 0 sent only if connected."""
        conn = self._conn
        if not qos:
            if conn is not None and self.connected:
                self._out_qos0.append(
                    wire.publish_packet(topic, payload, qos=0, mid=0, version=conn.version)
                )
                self._flush_soon()
            return
        if len(self._outgoing) >= _MAX_OUTGOING:
            self._dropped_acks += 1
            if self._dropped_acks == 1 or self._dropped_acks % 10_000 == 0:
                log.warning(
                    "end-to-end acks dropped: too many waiting for the broker",
                    extra=kv(dropped=self._dropped_acks, waiting=len(self._outgoing)),
                )
            return
        mid = self._mid()
        self._outgoing[mid] = (topic, payload)
        self._unsent.append(mid)
        if conn is not None and self.connected and len(self._inflight) < self._quota:
            self._flush_soon()

    def _flush_soon(self) -> None:
        """Send what was published in this pass of the event loop as one write, not one each (a
        commit publishes one ack per vehicle: ~1,000 syscalls saved per commit at fleet scale)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._send_queued()

    def _mid(self) -> int:
        """A packet id not in use by one of our PUBLISHes."""
        outgoing = self._outgoing
        mid = self._next_mid
        while True:
            mid = mid % 0xFFFF + 1
            if mid not in outgoing:
                self._next_mid = mid
                return mid

    def _send_queued(self) -> None:
        """Send what waits, as far as the broker's quota allows, as one write."""
        conn = self._conn
        if conn is None or not self.connected:
            self._out_qos0.clear()
            return
        if not self._unsent and not self._out_qos0:
            return
        unsent, inflight, outgoing, sent_before = (
            self._unsent,
            self._inflight,
            self._outgoing,
            self._sent_before,
        )
        packets, self._out_qos0 = self._out_qos0, []
        version = conn.version
        while unsent and len(inflight) < self._quota:
            mid = unsent.popleft()
            message = outgoing.get(mid)
            if message is None:
                continue
            topic, payload = message
            packets.append(
                wire.publish_packet(
                    topic, payload, qos=1, mid=mid, version=version, dup=mid in sent_before
                )
            )
            inflight.add(mid)
        if packets:
            conn.write(b"".join(packets))

    def _published(self, mid: int) -> None:
        """The broker PUBACKed our PUBLISH ``mid``."""
        if self._outgoing.pop(mid, None) is not None:
            self._inflight.discard(mid)
            self._sent_before.discard(mid)
