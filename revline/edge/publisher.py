"""Spool -> MQTT: batches with QoS 1, a bounded window, end-to-end acks, resends, live first.

Runs in one thread of its own that calls paho's ``client.loop()`` between publishes (measured ~2x
faster here than ``loop_start()`` plus a semaphore) so the event loop that samples is never held.

* A batch is created in the spool (ids fixed) before it is published; a resend rebuilds the same
  bytes from the spool, so the database deduplicates by sample identity.
* What to send next, when to resend and which acks to believe is decided by the pure
  :class:`revline.edge.window.SendWindow`; this module is its shell: paho and the spool. At most
  ``inflight_max`` messages wait for a PUBACK and at most ``unacked_max`` batches for the
  end-to-end ack on ``ack/<vin>``; everything else stays in the spool, not in paho's queue.
  Each fill first sends the live tail (newest samples), then the backlog oldest first, resends
  due after ``ack_timeout_s`` interleaved by age.
* Every connection is a fresh paho client on the same persistent session: paho would otherwise
  replay its un-PUBACKed messages ahead of the live data on reconnect. We resend those ourselves.
* No message stops it. Whatever arrives on ``ack/<vin>`` is untrusted: a payload that does not
  decode, or names another car, is dead-lettered in the spool with its raw bytes
  (:meth:`revline.edge.spool.Spool.dead_letter`); an ack is believed only for batches the broker has
  PUBACKed, so a forged ack cannot make unsent samples look durable. No paho callback can raise
  into the loop; every such event is logged at most once per :data:`LOG_EVERY_S`, with a count.
* Reconnects wait :func:`revline.backoff.backoff_delay`, scheduled here so that a stop is
  noticed at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, ParamSpec

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from revline.backoff import backoff_delay
from revline.contract import (
    MAX_PAYLOAD_BYTES,
    ContractError,
    ack_topic,
    decode_ack,
    printable,
    telemetry_topic,
)
from revline.edge.config import EdgeSettings
from revline.edge.report import Reporter
from revline.edge.spool import (
    DEAD_LETTER_MAX_BYTES,
    DURABLE,
    PUBLISHED,
    DeadLetter,
    Spool,
    SpoolBatch,
    encode_batch,
)
from revline.edge.window import BACKLOG, SendWindow, resend_timeout
from revline.logs import ThrottledLog, kv
from revline.mqtt import make_client, parse_mqtt_url

__all__ = [
    "LOG_EVERY_S",
    "Publisher",
    "PublisherStats",
    "ThrottledLog",
    "guarded",
    "resend_timeout",
]

log = logging.getLogger("revline.edge.publisher")

LOG_EVERY_S: Final = 60.0
"""A recurring problem (bad acks, failed connects) is logged at most once per this interval."""

_MAX_PACKET_BYTES: Final = MAX_PAYLOAD_BYTES + 64 * 1024
"""Told to the broker (MQTT 5 Maximum Packet Size): it drops bigger messages for us instead of
making a Pi allocate them. Anything bigger than the contract allows is refused anyway."""

_DEAD_LETTER_FLUSH_S: Final = 1.0
_DEAD_LETTER_QUEUE_MAX: Final = 100

_P = ParamSpec("_P")


def guarded(
    on_error: Callable[[str, Exception], None],
) -> Callable[[Callable[_P, None]], Callable[_P, None]]:
    """Make a paho callback unable to raise: paho would let it out of ``loop()`` and end us."""

    def wrap(callback: Callable[_P, None]) -> Callable[_P, None]:
        @functools.wraps(callback)
        def call(*args: _P.args, **kwargs: _P.kwargs) -> None:
            try:
                callback(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - no callback may stop the network loop
                on_error(callback.__name__, exc)

        return call

    return wrap


@dataclass
class PublisherStats:
    """Counters for logs and status."""

    batches: int = 0
    samples: int = 0
    resent: int = 0
    acked: int = 0
    connects: int = 0
    dead_letters: int = 0
    """Messages on ``ack/<vin>`` refused and kept in the spool's ``rejected`` table."""
    acks_ignored: int = 0
    """Batch ids named by acks but not believed: unknown, or not yet PUBACKed."""
    callback_errors: int = 0


class Publisher:
    """Feeds the broker from the spool; :meth:`run` blocks until :meth:`stop`."""

    def __init__(self, settings: EdgeSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.vin = settings.vin
        self.topic = telemetry_topic(settings.vin)
        self.ack_topic = ack_topic(settings.vin)
        self.address = parse_mqtt_url(settings.mqtt_url)
        self.client_id = f"revline-edge-{settings.vin}"
        self.report = Reporter(settings, spool)
        """status/<vin> and cmd/<vin> (revline.edge.report)."""
        self.stats = PublisherStats()
        self.connected = False
        self._stop = threading.Event()
        self._client: paho.Client | None = None
        self._lost = False
        self._answered = False  # a CONNACK came on this connection, success or not
        self.window = SendWindow(
            inflight_max=settings.inflight_max,
            unacked_max=settings.unacked_max,
            ack_timeout_s=settings.ack_timeout_s,
        )
        self._letters: list[DeadLetter] = []
        self._letters_since: float | None = None
        self._letters_bytes = 0
        self._letters_dropped = 0
        self._ignored: dict[str, int] = {}  # reason -> batch ids not believed, not yet counted
        self._failures = 0  # connection attempts failed in a row
        self._next_try = 0.0
        self._log_bad_ack = ThrottledLog(log, logging.WARNING, "bad ack dead-lettered")
        self._log_ignored = ThrottledLog(
            log, logging.WARNING, "ack ignored: batch unknown or not yet PUBACKed"
        )
        self._log_unreachable = ThrottledLog(log, logging.WARNING, "broker unreachable; retrying")
        self._log_refused = ThrottledLog(log, logging.ERROR, "broker refused the connection")
        self._log_publish_refused = ThrottledLog(log, logging.ERROR, "publish refused")
        self._log_callback = ThrottledLog(log, logging.ERROR, "error in an MQTT callback")
        self._log_spool = ThrottledLog(log, logging.ERROR, "spool error; retrying")
        self._log_loop = ThrottledLog(log, logging.ERROR, "MQTT loop failed; reconnecting")
        self._throttled = (
            self._log_bad_ack,
            self._log_ignored,
            self._log_unreachable,
            self._log_refused,
            self._log_publish_refused,
            self._log_callback,
            self._log_spool,
            self._log_loop,
        )

    def stop(self) -> None:
        """Make :meth:`run` publish what is open (within ``shutdown_timeout_s``) and return."""
        self._stop.set()

    # --- paho callbacks (called from client.loop() in this thread; each one guarded) ---

    def _callback_failed(self, name: str, exc: Exception) -> None:
        # What the callback should have recorded is unknown: start this connection over, which
        # puts every batch waiting for a PUBACK back in the queue (resent, deduplicated).
        self.stats.callback_errors += 1
        self._lost = True
        self._log_callback(exc, callback=name, error=printable(f"{type(exc).__name__}: {exc}"))

    def _on_connect(
        self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any = None
    ) -> None:
        self._answered = True
        if reason.is_failure:
            self._log_refused(reason=str(reason))
            self._lost = True
            return
        client.subscribe([(self.ack_topic, 1), (self.report.cmd_topic, 1)])
        self.report.connected()
        self.connected = True
        self.stats.connects += 1
        log.info(
            "connected",
            extra=kv(broker=str(self.address), session=bool(flags.session_present)),
        )

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any = None
    ) -> None:
        # paho may report one loss twice (e.g. a keepalive timeout): log it once.
        if self.connected:
            log.warning("disconnected", extra=kv(reason=str(reason)))
        self.connected = False
        self._lost = True

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            # The broker did not take it (ACL, quota): send it again after the ack timeout.
            self._log_publish_refused(reason=str(reason))
            self.window.refused(mid)
            return
        self.window.puback(mid)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        payload = b""
        topic = self.ack_topic
        try:
            payload = bytes(message.payload)
            topic = message.topic
            if topic == self.report.cmd_topic:
                self._take_command(topic, payload)
            else:
                self._take_ack(topic, payload)
        except Exception as exc:  # noqa: BLE001 - no message may stop the edge
            self._reject(topic, "internal_error", f"{type(exc).__name__}: {exc}", payload)

    def _take_ack(self, topic: str, payload: bytes) -> None:
        """Believe an ack only for batches in flight that the broker has PUBACKed."""
        try:
            ack = decode_ack(payload)
        except ContractError as exc:
            self._reject(topic, exc.reason, exc.detail, payload)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. RecursionError, MemoryError: same verdict
            self._reject(topic, "undecodable", f"{type(exc).__name__}: {exc}", payload)
            return
        if ack.vin != self.vin:
            self._reject(topic, "vin_mismatch", f"ack for {ack.vin} on {topic}", payload)
            return
        verdict = self.window.ack(ack.batches, self.spool.next_batch)
        if verdict.not_pubacked:
            self._ignore("not_pubacked", verdict.not_pubacked)
        if verdict.unknown:
            self._ignore("unknown_batch", verdict.unknown)
            # Never a batch of ours: whoever sent it is not the consumer. Keep it for an operator.
            detail = f"batch ids never created: {verdict.unknown[:10]}"
            self._reject(topic, "unknown_batch", detail, payload)

    def _take_command(self, topic: str, payload: bytes) -> None:
        """A repair command: queue resends (revline.edge.report); a bad one is dead-lettered."""
        try:
            self.report.command(payload)
        except ContractError as exc:
            self._reject(topic, exc.reason, exc.detail, payload)

    def _ignore(self, reason: str, batch_ids: list[int]) -> None:
        self.stats.acks_ignored += len(batch_ids)
        self._ignored[reason] = self._ignored.get(reason, 0) + len(batch_ids)
        self._log_ignored(reason=reason, batches=printable(str(batch_ids[:10]), 100))

    def _reject(self, topic: str, reason: str, detail: str, payload: bytes) -> None:
        detail = printable(detail)
        self.stats.dead_letters += 1
        self._log_bad_ack(topic=printable(topic, 100), reason=reason, detail=detail[:200])
        kept = payload[: self.spool.dead_letter_budget()]
        if (
            len(self._letters) >= _DEAD_LETTER_QUEUE_MAX
            or self._letters_bytes + len(kept) > DEAD_LETTER_MAX_BYTES
        ):
            self._letters_dropped += 1  # a flood within one flush interval: counted, not kept
            return
        if self._letters_since is None:
            self._letters_since = time.monotonic()
        self._letters_bytes += len(kept)
        self._letters.append(
            DeadLetter(
                received_at=time.time(),
                topic=printable(topic, 300),
                reason=reason,
                detail=detail,
                payload=kept,
                size=len(payload),
            )
        )

    # --- connection ---

    def _connect(self) -> paho.Client:
        s = self.settings
        client = make_client(
            self.address,
            self.client_id,
            ca_file=s.ca_file or None,
            cert_file=s.cert_file or None,
            key_file=s.key_file or None,
        )
        client.max_inflight_messages_set(s.inflight_max)
        guard = guarded(self._callback_failed)
        client.on_connect = guard(self._on_connect)
        client.on_disconnect = guard(self._on_disconnect)
        client.on_publish = guard(self._on_publish)
        client.on_message = guard(self._on_message)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry_s
        props.MaximumPacketSize = _MAX_PACKET_BYTES
        client.will_set(self.report.topic, self.report.offline(), qos=1)
        self._lost = False
        self._answered = False
        self.connected = False
        client.connect(
            self.address.host,
            self.address.port,
            s.keepalive_s,
            clean_start=False,
            properties=props,
        )
        return client

    def _drop_connection(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError):
                self._client.disconnect()
            self._client.loop(0)  # let paho close the socket
        self._client = None
        self.connected = False
        # Whatever waited for a PUBACK goes back to the queue: sent again, after live data.
        self.window.lost()

    # --- the loop ---

    def run(self) -> None:
        """Connect, publish and reconnect until stopped; then flush within the shutdown timeout."""
        for batch_id, lo, n, state in self.spool.pending_batches_info():
            self.window.resume(batch_id, lo, n, pubacked=state >= PUBLISHED)
        if self.window.unacked:
            log.info("resuming unacked batches", extra=kv(batches=self.window.unacked))
        deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stop.is_set() and deadline is None:
                deadline = now + self.settings.shutdown_timeout_s
            if deadline is not None and (now >= deadline or self._flushed()):
                break
            if self._client is None:
                self._try_connect(now)
            else:
                self._round(now, final=deadline is not None)
        if self._client is not None:
            with contextlib.suppress(sqlite3.Error):
                self._apply()
            self.connected = False
            try:
                goodbye = self.report.status(now, online=False)  # what is left in the spool
            except sqlite3.Error:
                goodbye = self.report.offline()
            self._client.publish(self.report.topic, goodbye, qos=1)
            self._client.disconnect()
            self._client.loop(0.1)
            self._client = None
        self.connected = False
        if self._letters or self._letters_dropped:
            with contextlib.suppress(sqlite3.Error):
                self._flush_dead_letters()
        for throttled in self._throttled:  # what was counted but not yet said
            throttled.tick(force=True)

    def _try_connect(self, now: float) -> None:
        if now < self._next_try:
            self._stop.wait(min(0.2, self._next_try - now))
            return
        try:
            self._client = self._connect()
        except OSError as exc:  # refused, unresolvable, TLS verification failed, ...
            delay = self._backoff(now)
            self._log_unreachable(
                broker=str(self.address), error=str(exc), retry_in_s=round(delay, 2)
            )

    def _round(self, now: float, *, final: bool) -> None:
        """One pass: let paho read and write, then record what came back and fill the window."""
        assert self._client is not None
        try:
            rc = self._client.loop(timeout=0.02 if self.window.inflight else 0.1)
        except Exception as exc:  # noqa: BLE001 - paho itself failing: reconnect, never stop
            self._log_loop(exc, error=printable(f"{type(exc).__name__}: {exc}"))
            rc = paho.MQTT_ERR_UNKNOWN
        for throttled in self._throttled:
            throttled.tick()
        if rc != paho.MQTT_ERR_SUCCESS or self._lost:
            answered = self._answered
            self._drop_connection()
            delay = self._backoff(now)
            if not answered:  # e.g. mqtt:// to a TLS port: the socket opened, MQTT never spoke
                error = f"connection closed before CONNACK: {paho.error_string(rc)}"
                self._log_unreachable(
                    broker=str(self.address), error=error, retry_in_s=round(delay, 2)
                )
            return
        if not self.connected:
            return
        self._failures = 0
        try:
            self._apply()
            self._fill(final=final)
            self._report(now)
        except sqlite3.Error as exc:
            # The device's disk, not the data: keep everything, start over after a pause.
            # What was not recorded is sent again and deduplicated by the consumer.
            self._log_spool(error=str(exc))
            self._drop_connection()
            self._backoff(now)

    def _backoff(self, now: float) -> float:
        """Schedule the next connection attempt; returns the delay."""
        self._failures += 1
        delay = backoff_delay(
            self._failures,
            initial=self.settings.reconnect_min_s,
            maximum=self.settings.reconnect_max_s,
        )
        self._next_try = now + delay
        return delay

    def _flushed(self) -> bool:
        # Done when everything is PUBACKed and acked end to end; what is not stays in the spool.
        return self.window.empty and self.spool.unbatched() == 0

    def _apply(self) -> None:
        """Record PUBACKs, end-to-end acks and refused acks in the spool, a transaction each.

        The spool is written before memory forgets: if a write fails, nothing is lost, the batch
        is just sent again.
        """
        window = self.window
        window.forget(self.spool.take_dropped())
        self.spool.mark(window.unrecorded_pubacks(), PUBLISHED)
        window.pubacks_recorded()
        self.spool.mark(window.unrecorded_acks(), DURABLE)
        self.stats.acked += window.acks_recorded()
        if self._ignored:
            ignored, self._ignored = self._ignored, {}
            for reason, count in ignored.items():
                self.spool.count_ignored_acks(count, reason)
        if (self._letters or self._letters_dropped) and (
            len(self._letters) >= _DEAD_LETTER_QUEUE_MAX
            or time.monotonic() - (self._letters_since or 0.0) >= _DEAD_LETTER_FLUSH_S
            or self._stop.is_set()
        ):
            self._flush_dead_letters()

    def _flush_dead_letters(self) -> None:
        letters, dropped = self._letters, self._letters_dropped
        self._letters = []
        self._letters_since = None
        self._letters_bytes = self._letters_dropped = 0
        try:
            self.spool.dead_letter(letters, unkept=dropped)
        except sqlite3.Error as exc:
            # Dead letters are evidence, not data: under disk trouble they may go, counted.
            self._log_spool(error=str(exc), dead_letters_lost=len(letters) + dropped)

    def _report(self, now: float) -> None:
        """Queue the resends a repair command asked for; publish the status when due."""
        assert self._client is not None
        for batch_id, lo, samples in self.report.take_repairs():
            if batch_id not in self.window:  # due at once; sent by the next fills, oldest first
                self.window.resume(batch_id, lo, samples, pubacked=False)
        if self.report.due(now):
            try:
                status = self.report.status(now)
            except sqlite3.Error as exc:  # a report is not worth the connection: next one
                self._log_spool(error=str(exc), what="status")
                return
            self._client.publish(self.report.topic, status, qos=1)

    def _send(self, batch: SpoolBatch, now: float) -> None:
        assert self._client is not None
        payload = encode_batch(self.vin, batch, self.settings.wire_version)
        info = self._client.publish(self.topic, payload, qos=1)
        if self.window.sent(batch.id, batch.lo, len(batch.rows), info.mid, now):
            self.stats.resent += 1
        self.stats.batches += 1
        self.stats.samples += len(batch.rows)

    def _fill(self, *, final: bool = False) -> None:
        """Send what the window allows: the live tail, then due resends and backlog by age."""
        s, window = self.settings, self.window
        now = time.monotonic()
        if window.may_send_live(final=final):
            live = self.spool.take_live(s.batch_max_samples, 0.0 if final else s.batch_max_age_s)
            if live is not None:
                self._send(live, now)
        while (step := window.next_send(now, self.spool.backlog_start())) is not None:
            if step == BACKLOG:
                batch = self.spool.take_backlog(s.batch_max_samples)
                if batch is None:
                    break
            else:
                batch = self.spool.load_batch(step)
                if batch is None:  # evicted under the size cap
                    window.forget([step])
                    continue
            self._send(batch, now)
