"""The consumer's audit: accounting in every write, and a background task for the rest.

:class:`Audit` is one of the consumer's derivations (:mod:`revline.consumer.derive`):

* inside each write, :class:`revline.audit.accounting.Accounting` merges the stored sequence
  numbers of each vehicle;
* after commits, :meth:`Audit.run` (a :class:`revline.storage.derive.Background`) listens on an
  MQTT client of its own, apart from the telemetry path, to ``status/+`` (each device's status
  and last will, stored in ``audit_status``; a payload that does not decode goes to ``rejected``
  with its raw bytes) and to Mosquitto's ``$SYS`` counters (dropped, stored messages, clients:
  exported as metrics, a drop logged as a warning and counted in ``audit_broker``), and every
  ``every_s`` checks runs against the cold table, follows the gaps
  (:func:`revline.audit.policy.reconcile`) and asks devices to resend what is missing on
  ``cmd/<vin>`` (:func:`revline.audit.policy.requests_due`: rate-limited and bounded).

Nothing here stops the consumer: a failure is logged (one line per kind per minute) and retried
at the next pass. Status messages are not retained (the shipped broker refuses retained
messages): a device repeats its status every ``status_every_s`` and on connect, and the latest
one is in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, Counter, Gauge

from revline.audit import store
from revline.audit.accounting import Accounting, verify
from revline.audit.policy import reconcile, requests_due
from revline.contract import (
    SCHEMA_VERSION,
    STATUS_PREFIX,
    Command,
    ContractError,
    Status,
    cmd_topic,
    decode_status,
    encode,
    printable,
)
from revline.logs import kv
from revline.mqtt import make_client, parse_mqtt_url

if TYPE_CHECKING:
    from revline.storage.derive import Staged

__all__ = ["SYS_TOPICS", "Audit", "AuditConfig", "AuditMetrics"]

log = logging.getLogger("revline.audit")

SYS_TOPICS: Final = {
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/store/messages/count": "stored",
    "$SYS/broker/clients/connected": "clients",
}
"""Mosquitto's counters read: QoS 1/2 messages dropped past a queue limit (since the broker
started), messages held (queued, retained, in flight), clients connected."""

_INBOUND_MAX: Final = 10_000
_STATUS_BATCH: Final = 500
"""Statuses stored in one transaction at most (100k devices every minute: ~1,700 a second)."""
_LOG_EVERY_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """How the audit runs; built by the consumer from its settings."""

    mqtt_url: str = ""
    """Broker for status/, $SYS and cmd/; empty: accounting only (no login of its own)."""
    client_id: str = "revline-audit"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    every_s: float = 30.0
    """A pass (check, follow gaps, ask for repairs, refresh metrics) this often."""
    repair_after_s: float = 120.0
    """A gap is asked for once it has been open this long (live-first backlogs fill holes)."""
    retry_s: float = 300.0
    max_requests: int = 5
    max_vehicles_per_pass: int = 100
    verify_vehicles: int = 10
    """Vehicles whose runs are checked against the cold table per pass."""
    verify_window_s: float = 2 * 86_400.0
    """Only runs with samples this recent are checked (older ones may be under retention)."""
    grace_s: float = 900.0
    """An undeclared gap open longer than this counts in ``revline_audit_gaps_overdue``."""


class AuditMetrics:
    """The audit's figures, in a registry that the consumer's ``/metrics`` includes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.vehicles = Gauge("revline_audit_vehicles", "Vehicles with samples stored", registry=r)
        self.stored = Gauge("revline_audit_samples_stored", "Distinct samples stored", registry=r)
        self.duplicates = Gauge(
            "revline_audit_duplicates", "Samples received again and absorbed", registry=r
        )
        self.gaps = Gauge("revline_audit_gaps", "Gaps by state", ["state"], registry=r)
        self.gap_samples = Gauge(
            "revline_audit_gap_samples", "Samples in gaps by state", ["state"], registry=r
        )
        self.overdue = Gauge(
            "revline_audit_gaps_overdue",
            "Undeclared gaps open past the grace period (revline audit exits 1)",
            registry=r,
        )
        self.lost = Gauge(
            "revline_audit_lost_samples", "Samples declared lost, by cause", ["cause"], registry=r
        )
        self.backlog = Gauge(
            "revline_audit_device_backlog_samples",
            "Samples waiting in the devices' spools, as they last reported",
            registry=r,
        )
        self.requests = Counter(
            "revline_audit_repair_requests", "Repair commands sent on cmd/<vin>", registry=r
        )
        self.statuses = Counter("revline_audit_statuses", "Device statuses stored", registry=r)
        self.status_rejected = Counter(
            "revline_audit_statuses_rejected", "Statuses dead-lettered", registry=r
        )
        self.broker_dropped = Gauge(
            "revline_audit_broker_dropped",
            "Mosquitto $SYS/broker/publish/messages/dropped (since the broker started)",
            registry=r,
        )
        self.broker_drops = Counter(
            "revline_audit_broker_drops",
            "Messages the broker dropped while the audit watched",
            registry=r,
        )
        self.broker_stored = Gauge(
            "revline_audit_broker_stored",
            "Mosquitto $SYS/broker/store/messages/count",
            registry=r,
        )
        self.broker_clients = Gauge(
            "revline_audit_broker_clients",
            "Mosquitto $SYS/broker/clients/connected",
            registry=r,
        )


class _Throttled:
    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -_LOG_EVERY_S) < _LOG_EVERY_S:
            return False
        self._last[key] = now
        return True


class Audit:
    """Sequence accounting in every write (a Derivation) and the audit task (a Background)."""

    name = "audit"

    def __init__(self, config: AuditConfig | None = None) -> None:
        self.config = config or AuditConfig()
        self.accounting = Accounting()
        self.metrics = AuditMetrics()
        self.registry = self.metrics.registry
        self._warn = _Throttled()
        self._sys: dict[str, int] = {}
        self._client: paho.Client | None = None
        self._broker = ""

    async def prepare(self, connection: Any) -> None:
        """Per connection: what the accounting needs."""
        await self.accounting.prepare(connection)

    async def apply(self, connection: Any, write: Staged) -> None:
        """Inside each write: merge the stored sequence numbers."""
        await self.accounting.apply(connection, write)

    # --- the task ---

    async def run(self, pool: Any) -> None:
        """Listen to status/ and $SYS, and make a pass every ``every_s``, until cancelled."""
        loop = asyncio.get_running_loop()
        inbound: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=_INBOUND_MAX)
        dropped = [0]

        def deliver(topic: str, payload: bytes) -> None:
            try:
                inbound.put_nowait((topic, payload))
            except asyncio.QueueFull:
                dropped[0] += 1  # a flood: the devices repeat their status anyway

        self._start_client(loop, deliver)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume(pool, inbound), name="audit-inbound")
                while True:
                    await self._pass_safely(pool)
                    if dropped[0] and self._warn("flood"):
                        log.warning(
                            "audit: status messages dropped (flood)", extra=kv(count=dropped[0])
                        )
                        dropped[0] = 0
                    await asyncio.sleep(self.config.every_s)
        finally:
            self._stop_client()

    def _start_client(self, loop: asyncio.AbstractEventLoop, deliver: Any) -> None:
        c = self.config
        if not c.mqtt_url:
            log.info("audit: accounting only (no audit_mqtt_url: no status, $SYS or repairs)")
            return
        address = parse_mqtt_url(c.mqtt_url, key="audit_mqtt_url")
        self._broker = f"{address.host}:{address.port}"
        client = make_client(
            address, c.client_id, ca_file=c.ca_file, cert_file=c.cert_file, key_file=c.key_file
        )

        def on_connect(cl: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
            if reason.is_failure:
                if self._warn("refused"):
                    log.error("audit: broker refused the connection", extra=kv(reason=str(reason)))
                return
            cl.subscribe([(STATUS_PREFIX + "+", 1), *((t, 0) for t in SYS_TOPICS)])
            log.info("audit: listening", extra=kv(broker=str(address)))

        def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(deliver, str(message.topic), bytes(message.payload))

        client.on_connect = on_connect
        client.on_message = on_message
        client.reconnect_delay_set(1, 30)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0  # status is repeated: nothing needs queueing for us
        try:
            client.connect_async(address.host, address.port, 30, clean_start=True, properties=props)
        except (OSError, ValueError) as exc:
            log.error("audit: cannot reach the broker", extra=kv(error=str(exc)))  # noqa: TRY400
        client.loop_start()
        self._client = client

    def _stop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    async def _consume(self, pool: Any, inbound: asyncio.Queue[tuple[str, bytes]]) -> None:
        while True:
            got = [await inbound.get()]
            while len(got) < _STATUS_BATCH and not inbound.empty():
                got.append(inbound.get_nowait())
            try:
                for topic, payload in got:
                    if topic in SYS_TOPICS:
                        await self._sys_counter(pool, SYS_TOPICS[topic], payload)
                statuses = [(t, p) for t, p in got if t not in SYS_TOPICS]
                if statuses:
                    await self._statuses(pool, statuses)
            except Exception as exc:  # noqa: BLE001 - an outage: the device repeats its status
                if self._warn("store"):
                    log.warning(
                        "audit: could not store statuses or counters; later ones will",
                        extra=kv(error=printable(f"{type(exc).__name__}: {exc}", 200)),
                    )
            del got

    async def _statuses(self, pool: Any, messages: list[tuple[str, bytes]]) -> None:
        """Decode statuses; store the latest of each device and dead-letter the refused ones,
        in one transaction."""
        latest: dict[str, tuple[Status, bytes]] = {}
        refused: list[tuple[str, ContractError, bytes]] = []
        for topic, payload in messages:
            try:
                status = decode_status(payload, topic)
            except ContractError as error:
                refused.append((topic, error, payload))
                continue
            latest[status.vin] = (status, payload)
        for topic, why, _ in refused:
            self.metrics.status_rejected.inc()
            if self._warn("bad-status"):
                log.warning(
                    "audit: status rejected",
                    extra=kv(
                        topic=printable(topic, 100), reason=why.reason, detail=why.detail[:200]
                    ),
                )
        async with pool.acquire() as connection, connection.transaction():
            for topic, why, payload in refused:
                await store.dead_letter(connection, topic, why.reason, why.detail, payload)
            for status, payload in latest.values():
                await store.record_status(
                    connection, status, payload[: store.MAX_DEAD_LETTER_BYTES]
                )
        self.metrics.statuses.inc(len(latest))

    async def _sys_counter(self, pool: Any, what: str, payload: bytes) -> None:
        text = payload[:32].decode("ascii", "replace").strip()
        if len(payload) > 32 or not text.isdigit():
            return  # not a counter: nothing to learn from it
        value = int(text)
        before = self._sys.get(what)
        self._sys[what] = value
        m = self.metrics
        if what == "stored":
            m.broker_stored.set(value)
        elif what == "clients":
            m.broker_clients.set(value)
        else:
            m.broker_dropped.set(value)
            delta = value if before is None or value < before else value - before
            if delta:
                m.broker_drops.inc(delta)
                log.warning(
                    "broker dropped messages past its queue limit (devices resend them)",
                    extra=kv(broker=self._broker, dropped=delta, broker_total=value),
                )
        async with pool.acquire() as connection:
            await store.record_broker(
                connection,
                self._broker,
                dropped=value if what == "dropped" else None,
                stored=value if what == "stored" else None,
                clients=value if what == "clients" else None,
            )

    async def _pass_safely(self, pool: Any) -> None:
        try:
            await self.audit_pass(pool)
        except Exception as exc:  # noqa: BLE001 - an outage: the next pass tries again
            if self._warn("pass"):
                log.warning(
                    "audit: pass failed; retrying at the next one",
                    extra=kv(error=printable(f"{type(exc).__name__}: {exc}", 200)),
                )

    async def audit_pass(self, pool: Any) -> dict[str, list[tuple[int, int]]]:
        """Check runs against the cold table, follow the gaps, ask for repairs, refresh the
        metrics; returns the ranges asked for, per vehicle."""
        c = self.config
        since_us = int((time.time() - c.verify_window_s) * 1e6)
        checked = await verify(pool, since_us=since_us, vehicles=c.verify_vehicles)
        if checked.missing:
            log.warning(
                "audit: samples counted as stored are gone from the cold table",
                extra=kv(missing=checked.missing, vehicles=checked.vehicles),
            )
        now = time.time()
        async with pool.acquire() as connection:
            async with connection.transaction():
                current = await store.now_holes(connection)
                declared = await store.declared_losses(connection)
                changes = reconcile(await store.gaps_open(connection), current, declared)
                await store.save_changes(connection, changes)
            asked: dict[str, list[tuple[int, int]]] = {}
            if self._client is not None and self._client.is_connected():
                asked = requests_due(
                    await store.gaps_open(connection),
                    current,
                    now=now,
                    settle_s=c.repair_after_s,
                    retry_s=c.retry_s,
                    max_requests=c.max_requests,
                    durable_below=await store.durable_floors(connection),
                    declared=declared,
                    max_vehicles=c.max_vehicles_per_pass,
                )
                for vin, ranges in asked.items():
                    command = Command(
                        v=SCHEMA_VERSION, vin=vin, resend=[[lo, hi] for lo, hi in ranges]
                    )
                    self._client.publish(cmd_topic(vin), encode(command), qos=1)
                    self.metrics.requests.inc()
                    log.info(
                        "audit: asked a device to resend missing samples",
                        extra=kv(
                            vin=vin, ranges=len(ranges), samples=sum(b - a + 1 for a, b in ranges)
                        ),
                    )
                await store.record_requests(connection, asked)
            await self._refresh(connection, now)
        return asked

    async def _refresh(self, connection: Any, now: float) -> None:
        m = self.metrics
        row = await connection.fetchrow(
            "SELECT count(*), coalesce(sum(samples), 0), coalesce(sum(duplicates), 0) "
            "FROM audit_vehicles"
        )
        m.vehicles.set(row[0])
        m.stored.set(row[1])
        m.duplicates.set(row[2])
        for state in ("open", "repaired", "lost"):
            m.gaps.labels(state).set(0)
            m.gap_samples.labels(state).set(0)
        for state, count, samples in await connection.fetch(
            "SELECT state, count(*), coalesce(sum(missing), 0) FROM audit_gaps GROUP BY state"
        ):
            m.gaps.labels(state).set(count)
            m.gap_samples.labels(state).set(samples)
        for cause, samples in await connection.fetch(
            "SELECT cause, coalesce(sum(samples), 0) FROM audit_losses GROUP BY cause"
        ):
            m.lost.labels(cause).set(samples)
        m.overdue.set(
            await connection.fetchval(
                "SELECT count(*) FROM audit_gaps g LEFT JOIN audit_status s USING (vin) "
                "WHERE g.state = 'open' AND g.opened_at < to_timestamp($1) "
                "AND (s.durable_below IS NULL OR g.lo < s.durable_below)",
                now - self.config.grace_s,
            )
        )
        m.backlog.set(
            await connection.fetchval(
                "SELECT coalesce(sum(backlog), 0) FROM audit_status WHERE online"
            )
        )
