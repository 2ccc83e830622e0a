"""Spool -> HTTPS: the edge's transport for networks that allow no MQTT session (``transport =
"http"``), with the MQTT publisher's spool semantics.

Each batch is built in the spool (ids fixed) and POSTed as the very bytes MQTT would carry to
``<api_url>/v1/vehicles/<vin>/batches`` (``revline api``). The server answers 200 only after the
commit, with the end-to-end :class:`~revline.contract.Ack` naming the batch: only then is the batch
marked durable. The same :class:`~revline.edge.window.SendWindow` decides what goes next (live
tail first, then backlog, resends after ``ack_timeout_s``); one request at a time, so "sent" and
"PUBACKed" are one step here. Whatever comes back is untrusted: an answer that does not decode,
names another vehicle or another batch acks nothing and is dead-lettered in the spool.

- 200 with the batch's ack: durable.
- 4xx with an ``ack`` in the error body: the server kept the batch in its dead-letter table
  (sending the same bytes again cannot help), as the consumer acks such a batch on MQTT.
- 401/403, other 4xx, 5xx, 429, no connection: nothing acked, the batch is sent again after a
  backoff (``Retry-After`` when given). Standard library only (``urllib``): the edge side brings
  no HTTP dependency.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Final

from revline.backoff import backoff_delay
from revline.contract import MAX_PAYLOAD_BYTES, ContractError, decode_ack, printable
from revline.edge.config import EdgeSettings
from revline.edge.publisher import PublisherStats, ThrottledLog
from revline.edge.spool import DURABLE, PUBLISHED, DeadLetter, Spool, SpoolBatch, encode_batch
from revline.edge.window import BACKLOG, SendWindow
from revline.logs import kv

__all__ = ["HttpPublisher"]

log = logging.getLogger("revline.edge.http")

_MAX_ANSWER: Final = 64 * 1024
"""Bytes of an answer read at most: an ack of one batch is a few dozen."""
_TIMEOUT_S: Final = 30.0


class _RefusedError(Exception):
    """The server did not take the batch; retry after ``wait_s`` (None: the backoff)."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class HttpPublisher:
    """Feeds ``revline api`` from the spool; :meth:`run` blocks until :meth:`stop`."""

    def __init__(self, settings: EdgeSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.vin = settings.vin
        self.url = f"{settings.api_url.rstrip('/')}/v1/vehicles/{settings.vin}/batches"
        self.stats = PublisherStats()
        self.connected = False
        self.window = SendWindow(
            inflight_max=1, unacked_max=1, ack_timeout_s=settings.ack_timeout_s
        )
        self._stop = threading.Event()
        self._failures = 0
        self._next_try = 0.0
        self._mid = 0
        self._log_failed = ThrottledLog(log, logging.WARNING, "API did not take the batch")
        self._log_bad = ThrottledLog(log, logging.WARNING, "bad answer dead-lettered")

    def stop(self) -> None:
        """Make :meth:`run` send what is open (within ``shutdown_timeout_s``) and return."""
        self._stop.set()

    def run(self) -> None:
        """Send and resend until stopped; then flush within the shutdown timeout."""
        for batch_id, lo, n, _state in self.spool.pending_batches_info():
            self.window.resume(batch_id, lo, n, pubacked=False)
        deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stop.is_set() and deadline is None:
                deadline = now + self.settings.shutdown_timeout_s
            if deadline is not None and (now >= deadline or self._flushed()):
                break
            if now < self._next_try:
                self._stop.wait(min(0.2, self._next_try - now))
                continue
            batch = self._next(now, final=deadline is not None)
            if batch is None:
                self._stop.wait(0.05)
                continue
            self._send(batch, now)
        for throttled in (self._log_failed, self._log_bad):
            throttled.tick(force=True)

    def _flushed(self) -> bool:
        return self.window.empty and self.spool.unbatched() == 0

    def _next(self, now: float, *, final: bool) -> SpoolBatch | None:
        s, window = self.settings, self.window
        window.forget(self.spool.take_dropped())
        if window.may_send_live(final=final):  # live first, as the MQTT publisher
            live = self.spool.take_live(s.batch_max_samples, 0.0 if final else s.batch_max_age_s)
            if live is not None:
                return live
        step = window.next_send(now, self.spool.backlog_start())
        if step == BACKLOG:
            return self.spool.take_backlog(s.batch_max_samples)
        if step is not None:
            batch = self.spool.load_batch(step)
            if batch is None:  # evicted under the size cap
                window.forget([step])
            return batch
        return None

    def _send(self, batch: SpoolBatch, now: float) -> None:
        payload = encode_batch(self.vin, batch, self.settings.wire_version)
        self._mid += 1
        if self.window.sent(batch.id, batch.lo, len(batch.rows), self._mid, now):
            self.stats.resent += 1
        self.stats.batches += 1
        self.stats.samples += len(batch.rows)
        try:
            answer = self._post(payload)
        except _RefusedError as exc:
            self.connected = False
            self.window.lost()  # sent again, after the backoff
            self._failures += 1
            delay = exc.wait_s or backoff_delay(
                self._failures,
                initial=self.settings.reconnect_min_s,
                maximum=self.settings.reconnect_max_s,
            )
            self._next_try = time.monotonic() + delay
            self._log_failed(url=self.url, error=str(exc), retry_in_s=round(delay, 2))
            return
        self.connected = True
        self._failures = 0
        self._take_ack(batch.id, answer)

    def _post(self, payload: bytes) -> bytes:
        """The ack bytes of a committed (or server-side dead-lettered) batch; _RefusedError else."""
        request = urllib.request.Request(  # noqa: S310 - the configured http(s):// URL
            self.url,
            data=payload,
            method="POST",
            headers={
                "Authorization": f"Bearer {self.settings.api_key}",
                "Content-Type": "application/msgpack",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310
                return bytes(response.read(_MAX_ANSWER))
        except urllib.error.HTTPError as exc:
            body = exc.read(_MAX_ANSWER)
            retry = exc.headers.get("Retry-After", "")
            wait = float(retry) if retry.isdigit() else None
            if 400 <= exc.code < 500 and exc.code not in {401, 403, 408, 429}:
                ack = _error_ack(body)
                if ack is not None:
                    return ack  # the server kept it as a dead letter: acked, like on MQTT
            detail = printable(body.decode("utf-8", "replace"), 200)
            raise _RefusedError(f"HTTP {exc.code}: {detail}", wait) from None
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS, timeouts
            raise _RefusedError(f"{type(exc).__name__}: {exc}") from None

    def _take_ack(self, batch_id: int, answer: bytes) -> None:
        try:
            ack = decode_ack(answer)
        except ContractError as exc:
            self._bad(exc.reason, exc.detail, answer)
            return
        if ack.vin != self.vin or batch_id not in ack.batches:
            reason = "vin_mismatch" if ack.vin != self.vin else "unknown_batch"
            self._bad(reason, f"ack for {ack.vin} {ack.batches[:5]}", answer)
            return
        self.window.puback(self._mid)
        self.window.ack([batch_id], self.spool.next_batch)
        self.spool.mark(self.window.unrecorded_pubacks(), PUBLISHED)
        self.window.pubacks_recorded()
        self.spool.mark(self.window.unrecorded_acks(), DURABLE)
        self.stats.acked += self.window.acks_recorded()

    def _bad(self, reason: str, detail: str, answer: bytes) -> None:
        # Not believed: the batch stays unacked and is sent again after the ack timeout.
        self.window.refused(self._mid)
        self.stats.dead_letters += 1
        self._log_bad(reason=reason, detail=printable(detail, 200))
        letter = DeadLetter(
            received_at=time.time(),
            topic=printable(self.url, 300),
            reason=reason,
            detail=printable(detail),
            payload=answer[: self.spool.dead_letter_budget()],
            size=len(answer),
        )
        self.spool.dead_letter([letter])
        log.debug("answer dead-lettered", extra=kv(reason=reason))


def _error_ack(body: bytes) -> bytes | None:
    """The ``ack`` of an error body (JSON), re-encoded as an ack message; None if none."""
    if len(body) > MAX_PAYLOAD_BYTES:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    ack = parsed.get("ack") if isinstance(parsed, dict) else None
    return json.dumps(ack).encode() if isinstance(ack, dict) else None
