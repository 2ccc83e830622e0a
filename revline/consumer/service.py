"""``revline consumer``: MQTT -> decode/validate -> batch -> one transaction -> PUBACK -> e2e ack.

One TaskGroup of named tasks:

* ``collect`` takes messages from the subscriber, validates them and closes batches by size and
  age; a full batch goes to a queue of one, so at most one batch waits while another is written.
* ``write`` commits each batch in one transaction (retrying transient database errors with capped,
  jittered backoff, forever), then PUBACKs its messages in arrival order, then publishes
  ``ack/<vin>``. While it waits, ``collect`` stops taking batches, the broker stops sending once
  ``receive_maximum`` messages are unacked, and memory stays flat.
* ``report`` logs a summary every ``log_every_s``; ``health`` pings the database when idle.

SIGTERM/SIGINT: stop taking messages, commit what was received, ack it, disconnect keeping the
session; a write still failing after ``shutdown_timeout_s`` is abandoned unacked (the broker
redelivers it to the next run), never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from revline.consumer.batcher import Batcher, Pending
from revline.consumer.budget import footprint
from revline.consumer.config import ConsumerSettings
from revline.consumer.metrics import Metrics, MetricsServer
from revline.consumer.subscriber import Inbound, Subscriber
from revline.consumer.validate import Invalid, check
from revline.consumer.writer import Rejected, Writer, WriteResult
from revline.contract import SCHEMA_VERSION, Ack, Batch, ack_topic, encode
from revline.logs import kv
from revline.mqtt import parse_mqtt_url, tls_context
from revline.storage.errors import UnusableDatabaseError, describe, is_data_error, sqlstate

__all__ = ["Consumer", "Item"]

log = logging.getLogger("revline.consumer")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Item:
    """One received message and what became of it: a batch to store, or a dead letter.

    ``batch`` is set whenever the payload decoded, even if it was then refused (future
    timestamps), so that the device still gets its end-to-end ack for it.
    """

    inbound: Inbound
    batch: Batch | None = None
    rejected: Rejected | None = None


@dataclass(slots=True)
class _Totals:
    """Running figures for the periodic summary line."""

    samples: int = 0
    inserted: int = 0
    batches: int = 0
    rejected: int = 0
    lag_s: float = 0.0
    commit_s: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def _rejected(inbound: Inbound, reason: str, detail: str) -> Rejected:
    return Rejected(
        received_at=datetime.fromtimestamp(inbound.received_at, tz=UTC),
        topic=inbound.topic,
        reason=reason,
        detail=detail,
        payload=inbound.payload,
    )


@dataclass(frozen=True, slots=True)
class _Stored:
    """What committing one write batch did: rows written, messages dead-lettered, and the
    newest sample among the batches really stored (not those dead-lettered), for ``lag_s``."""

    result: WriteResult
    rejected: list[Rejected]
    newest_us: int | None


_REJECTIONS_LOGGED_PER_SUMMARY = 10
_OUTAGE_LOG_EVERY_S = 10.0
"""While the database fails, one line per this many seconds (and at once when the error changes)."""


class _Throttle:
    """Rate limit for a repeating log line: each kind of fault (``key``) at most once per
    ``every`` seconds, a new kind at once; counts what it held back. Pure: time is passed in."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self.held = 0

    def __call__(self, key: str, now: float) -> bool:
        """Whether to log a line about ``key`` now."""
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self.held += 1
            return False
        if len(self._last) >= 64:  # keys are SQLSTATEs and type names: a few, but bounded anyway
            self._last.clear()
        self._last[key] = now
        return True

    def reset(self) -> int:
        """Forget every key (the fault is over); return how many lines were held back."""
        held, self.held = self.held, 0
        self._last.clear()
        return held


class Consumer:
    """The ingest service; ``await Consumer(settings).run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: ConsumerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.totals = _Totals()
        self.metrics_port: int | None = None
        self._ready: asyncio.Queue[Pending[Item] | None] = asyncio.Queue(maxsize=1)
        self._last_db_ok = 0.0
        self._rejections_logged = 0
        self._failing = 0
        """Database calls currently failing and being retried: health stays red while > 0."""
        self._outage_since: float | None = None
        self._outage_log = _Throttle(_OUTAGE_LOG_EVERY_S)
        self._health_log = _Throttle(_OUTAGE_LOG_EVERY_S)
        self._maintenance_log = _Throttle(_OUTAGE_LOG_EVERY_S)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down within ``shutdown_timeout_s``."""
        s = self.settings
        if s.ca_file or s.cert_file or s.key_file:
            # A TLS file that cannot be read or used stops us now with one line naming its key,
            # not at the first connect, which comes only once the database is up.
            tls_context(
                ca_file=s.ca_file or None,
                cert_file=s.cert_file or None,
                key_file=s.key_file or None,
            )
        async with contextlib.AsyncExitStack() as stack:
            # The endpoint first: a taken port stops us before we touch anything, and /healthz
            # answers (503) while we wait for the database or the broker.
            if s.metrics_port:
                server = MetricsServer(self.metrics, host=s.metrics_host, port=s.metrics_port)
                await stack.enter_async_context(server)
                self.metrics_port = server.port
            writer = await self._open_writer(stack, stop)
            if writer is None:
                return
            subscriber = Subscriber(
                parse_mqtt_url(s.mqtt_url),
                client_id=s.effective_client_id,
                subscription=s.subscription,
                session_expiry_s=s.effective_session_expiry_s,
                receive_maximum=s.receive_maximum,
                keepalive_s=s.keepalive_s,
                ca_file=s.ca_file or None,
                cert_file=s.cert_file or None,
                key_file=s.key_file or None,
                on_state=lambda up: self.metrics.set_up("broker", up=up),
                max_inflight_bytes=s.max_inflight_mb * 1024 * 1024,
            )
            await stack.enter_async_context(subscriber)
            log.info(
                "consumer started",
                extra=kv(
                    mode=writer.mode,
                    broker=str(subscriber.address),
                    subscription=s.subscription,
                    group=s.group or "-",
                    client_id=s.effective_client_id,
                    metrics=f"http://{s.metrics_host}:{self.metrics_port}"
                    if s.metrics_port
                    else "-",
                ),
            )
            await self._serve(writer, subscriber, stop)
        log.info("consumer stopped", extra=kv(samples=self.totals.samples))

    async def _open_writer(
        self, stack: contextlib.AsyncExitStack, stop: asyncio.Event
    ) -> Writer | None:
        """Enter the writer, waiting for the database while it is down or unusable for now
        (refused connections, missing privileges...). Raises :class:`UnusableDatabaseError` when
        waiting cannot help: no such database, login refused, not migrated."""
        s = self.settings
        attempt = 0
        while not stop.is_set():
            writer = Writer(
                s.database_url, pool_size=s.pool_size, statement_timeout_s=s.statement_timeout_s
            )
            try:
                await stack.enter_async_context(writer)
            except UnusableDatabaseError:
                raise
            except Exception as exc:  # noqa: BLE001 - any other failure: wait for the database
                attempt += 1
                delay = self._backoff(attempt)
                self._database_failed(exc, "database unusable at start; retrying", attempt, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            self._database_recovered(attempt)
            return writer
        return None

    async def _serve(self, writer: Writer, subscriber: Subscriber, stop: asyncio.Event) -> None:
        s = self.settings
        async with asyncio.TaskGroup() as tg:
            collect = tg.create_task(self._collect(subscriber), name="collect")
            write = tg.create_task(self._write_loop(writer, subscriber), name="write")
            background = [
                tg.create_task(self._report(), name="report"),
                tg.create_task(self._health(writer), name="health"),
            ]
            if s.maintenance_every_s > 0:
                background.append(tg.create_task(self._maintain(writer), name="maintenance"))
            await stop.wait()
            log.info(
                "stopping: committing what was received", extra=kv(limit_s=s.shutdown_timeout_s)
            )
            subscriber.stop_delivering()
            subscriber.inbound.put_nowait(None)
            _, late = await asyncio.wait({collect, write}, timeout=s.shutdown_timeout_s)
            if late:
                log.warning(
                    "shutdown timeout: abandoning the batch in hand unacked; "
                    "the broker redelivers it on the next start"
                )
            for task in (*late, *background):
                task.cancel()

    # -- collect -------------------------------------------------------------------------------

    async def _collect(self, subscriber: Subscriber) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        batcher: Batcher[Item] = Batcher(
            max_samples=s.batch_max_samples,
            max_age=s.batch_max_age_ms / 1000,
            # The broker sends at most receive_maximum unacked messages: leave room for the
            # batches being written plus the one being collected, or the pipeline stalls.
            max_items=max(1, s.receive_maximum // (s.write_concurrency + 1)),
            # The same for bytes: the batches being written, the one waiting and the open one
            # share the byte budget, so that it bounds memory without stalling the pipeline.
            max_bytes=max(1, subscriber.budget.limit // (s.write_concurrency + 2)),
        )
        inbound = subscriber.inbound
        max_future_us = int(s.max_future_s * 1e6)
        while True:
            if not subscriber.budget.may_decode():
                # The budget is full: hand over the open batch so that its commit frees bytes,
                # and decode nothing more until then (decoding can multiply a message's size).
                if len(batcher):
                    await self._ready.put(batcher.take())
                await subscriber.room()
            deadline = batcher.deadline()
            try:
                async with asyncio.timeout_at(deadline):
                    got = await inbound.get()
            except TimeoutError:
                await self._ready.put(batcher.take())
                continue
            if got is None:
                break
            await self._hand_over(self._add(batcher, subscriber, got, max_future_us, loop.time()))
            # Not kept alive while waiting for the next one: memory comes back after a burst.
            del got
        # Stopping: what paho already handed over is committed too (it is bounded by
        # receive_maximum and the byte budget); anything later stays unacked on the broker.
        while not inbound.empty():
            got = inbound.get_nowait()
            if got is not None:
                await self._hand_over(
                    self._add(batcher, subscriber, got, max_future_us, loop.time())
                )
        if len(batcher):
            await self._ready.put(batcher.take())
        await self._ready.put(None)

    def _add(
        self,
        batcher: Batcher[Item],
        subscriber: Subscriber,
        got: Inbound,
        max_future_us: int,
        now: float,
    ) -> list[Pending[Item]]:
        """Classify a message, charge what it holds to the byte budget, add it to the batch."""
        item = self._classify(got, max_future_us)
        size = footprint(len(got.payload), item.batch)
        subscriber.hold(got, size)
        samples = len(item.batch.samples) if item.batch is not None else 0
        return batcher.add(item, samples, now, size)

    async def _hand_over(self, closed: list[Pending[Item]]) -> None:
        for pending in closed:
            await self._ready.put(pending)

    def _classify(self, inbound: Inbound, max_future_us: int) -> Item:
        self.metrics.messages.inc()
        verdict = check(
            inbound.payload,
            inbound.topic,
            now_us=int(time.time() * 1e6),
            max_future_us=max_future_us,
            max_age_us=int(self.settings.max_age_s * 1e6),
        )
        if isinstance(verdict, Invalid):
            self._log_rejection(inbound, verdict)
            rejected = _rejected(inbound, verdict.reason, verdict.detail)
            return Item(inbound, batch=verdict.batch, rejected=rejected)
        return Item(inbound, batch=verdict)

    def _log_rejection(self, inbound: Inbound, verdict: Invalid) -> None:
        # One line per bad message helps whoever is publishing by hand; a flood (a broken device,
        # an attack) is capped per summary interval, the rejected table keeps every one anyway.
        self._rejections_logged += 1
        if self._rejections_logged <= _REJECTIONS_LOGGED_PER_SUMMARY:
            log.warning(
                "message rejected",
                extra=kv(
                    topic=inbound.topic,
                    reason=verdict.reason,
                    detail=verdict.detail[:200],
                    bytes=len(inbound.payload),
                ),
            )
        elif self._rejections_logged == _REJECTIONS_LOGGED_PER_SUMMARY + 1:
            log.warning("more messages rejected: see the next summary and the rejected table")

    # -- write ---------------------------------------------------------------------------------

    async def _write_loop(self, writer: Writer, subscriber: Subscriber) -> None:
        """Write up to ``write_concurrency`` batches at once; ack strictly in arrival order.

        MQTT wants PUBACKs in the order the PUBLISHes came, and a later batch must not be acked
        while an earlier one may still fail: so a committed batch waits for its predecessors.
        """
        slots = asyncio.Semaphore(self.settings.write_concurrency)
        inflight: asyncio.Queue[tuple[Pending[Item], float, asyncio.Task[_Stored]] | None]
        inflight = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def acknowledge_in_order() -> None:
            while (entry := await inflight.get()) is not None:
                pending, started, task = entry
                self._acknowledge(subscriber, pending, started, await task)
                slots.release()
                del entry, pending, task  # acked: not kept alive until the next batch

        async with asyncio.TaskGroup() as tg:
            tg.create_task(acknowledge_in_order(), name="ack")
            number = 0
            while (pending := await self._ready.get()) is not None:
                if not pending.items:
                    continue
                await slots.acquire()
                number += 1
                task = tg.create_task(self._store(writer, pending.items), name=f"write-{number}")
                inflight.put_nowait((pending, loop.time(), task))
                del pending, task  # the ack loop has them; freed as soon as it is done
            inflight.put_nowait(None)

    def _acknowledge(
        self, subscriber: Subscriber, pending: Pending[Item], started: float, stored: _Stored
    ) -> None:
        """The batch is committed: PUBACK its messages, publish e2e acks, count and log it."""
        loop = asyncio.get_running_loop()
        result, rejected = stored.result, stored.rejected
        now = time.time()
        # Only now, with the transaction committed, may the broker forget these messages.
        subscriber.ack(item.inbound for item in pending.items)
        self._publish_acks(subscriber, pending.items)

        t = self.totals
        t.samples += result.samples
        t.inserted += result.inserted
        t.batches += 1
        t.rejected += len(rejected)
        for r in rejected:
            t.reasons[r.reason] = t.reasons.get(r.reason, 0) + 1
            self.metrics.rejected.labels(r.reason).inc()
        if stored.newest_us is not None:
            # From stored samples only: a dead-lettered future-dated batch says nothing about how
            # far behind live we are. Clamped: a device clock slightly ahead of ours is not lag.
            t.lag_s = max(0.0, now - stored.newest_us / 1e6)
            self.metrics.lag_seconds.set(t.lag_s)
        t.commit_s = now - pending.items[0].inbound.received_at
        m = self.metrics
        m.samples.inc(result.samples)
        m.inserted.inc(result.inserted)
        m.batches.inc()
        m.commit_seconds.observe(t.commit_s)
        log.debug(
            "batch committed",
            extra=kv(
                messages=len(pending.items),
                samples=result.samples,
                inserted=result.inserted,
                dup=result.samples - result.inserted,
                rejected=len(rejected),
                ms=(loop.time() - started) * 1000,
            ),
        )

    async def _store(self, writer: Writer, items: Sequence[Item]) -> _Stored:
        """Commit the batches, then dead-letter the refused messages; each step is retried until
        it succeeds (:meth:`_retry`), so this returns only when everything is durable.

        The dead letters are written after the samples and retried on their own: a failing
        ``rejected`` insert (a missing privilege...) is an outage like any other, and must not
        make the samples be written again.
        """
        rejected = [item.rejected for item in items if item.rejected is not None]
        todo = [item for item in items if item.batch is not None and item.rejected is None]
        result = WriteResult(batches=0, samples=0, inserted=0)
        newest: int | None = None
        if todo:
            result, refused, stored = await self._retry(
                functools.partial(self._write, writer, todo)
            )
            rejected.extend(refused)
            newest = max((b.samples[-1].ts for b in stored if b.samples), default=None)
        if rejected:
            await self._retry(functools.partial(writer.reject, rejected))
        return _Stored(result, rejected, newest)

    async def _write(
        self, writer: Writer, items: Sequence[Item]
    ) -> tuple[WriteResult, list[Rejected], list[Batch]]:
        """One transaction for all ``items``; if the database refuses their values, one per
        message (:meth:`_store_each`). Any other error propagates: it is an outage."""
        batches = [item.batch for item in items if item.batch is not None]
        try:
            return await writer.write(batches), [], batches
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.warning(
                "batch refused by the database; writing its messages one by one",
                extra=kv(messages=len(items), error=describe(exc)),
            )
        return await self._store_each(writer, items)

    async def _store_each(
        self, writer: Writer, items: Sequence[Item]
    ) -> tuple[WriteResult, list[Rejected], list[Batch]]:
        """Write each message alone; dead-letter one only if its own write raised a data error
        (:func:`is_data_error`) and a probe write of a plain sample works (:meth:`Writer.probe`),
        which proves the fault is in that message's values. Anything else is an outage."""
        batches = samples = inserted = 0
        refused: list[Rejected] = []
        stored: list[Batch] = []
        probed = False
        for item in items:
            if item.batch is None:
                continue
            try:
                one = await writer.write([item.batch])
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                if not probed:
                    await writer.probe()  # raises if the deployment cannot write at all
                    probed = True
                detail = describe(exc)
                detail = f"SQLSTATE {detail}" if getattr(exc, "sqlstate", None) else detail
                refused.append(_rejected(item.inbound, "db_error", detail))
                continue
            stored.append(item.batch)
            batches += one.batches
            samples += one.samples
            inserted += one.inserted
        return WriteResult(batches=batches, samples=samples, inserted=inserted), refused, stored

    def _publish_acks(self, subscriber: Subscriber, items: Sequence[Item]) -> None:
        """Publish one ``ack/<vin>`` per vehicle naming its batches now durable, duplicates too.

        A decoded batch that was dead-lettered (future timestamps, refused by the database) is
        acked as well: its bytes are in ``rejected`` for an operator to replay, and a device
        resending it forever would help nobody.
        """
        per_vin: dict[str, list[int]] = {}
        for item in items:
            batch = item.batch
            if batch is None:
                continue
            ids = per_vin.setdefault(batch.vin, [])
            if batch.batch not in ids:
                ids.append(batch.batch)
        for vin, ids in per_vin.items():
            subscriber.publish(ack_topic(vin), encode(Ack(v=SCHEMA_VERSION, vin=vin, batches=ids)))

    async def _retry(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``op`` until it succeeds, sleeping with capped jittered backoff after each failure.

        Every error that reaches here is an outage (:meth:`_write` has already turned data
        errors into dead letters): the same batch is retried however long it takes, nothing is
        acked meanwhile, ``/healthz`` is red and one line per ``_OUTAGE_LOG_EVERY_S`` says why.
        """
        attempt = 0
        try:
            while True:
                try:
                    value = await op()
                except Exception as exc:  # noqa: BLE001 - an outage, whatever it is (see above)
                    attempt += 1
                    if attempt == 1:
                        self._failing += 1
                    delay = self._backoff(attempt)
                    self._database_failed(
                        exc,
                        "database outage: retrying the same batch, acking nothing",
                        attempt,
                        delay,
                    )
                    # A failed write leaves reference cycles (exception, traceback, frames) that
                    # hold the batch's staging rows; in a long outage they pile up faster than the
                    # cyclic GC's full passes come, and RSS climbs. Collecting here keeps memory
                    # flat, and costs nothing that matters while the database is failing anyway.
                    gc.collect()
                    await asyncio.sleep(delay)
                    continue
                if attempt:
                    self._failing -= 1
                    attempt, retried = 0, attempt
                    self._database_recovered(retried)
                else:
                    self._db_ok()
                return value
        finally:
            if attempt:  # cancelled while failing (shutdown): no longer retrying
                self._failing -= 1

    def _database_failed(self, exc: BaseException, what: str, attempt: int, delay: float) -> None:
        """Count a failed database call, turn health red, log one line (rate-limited)."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        code = sqlstate(exc)
        m = self.metrics
        m.db_errors.inc()
        m.db_error_codes.labels(code).inc()
        m.outage_seconds.set(now - self._outage_since)
        m.set_up("database", up=False)
        if self._outage_log(code, now):
            # A server error: its SQLSTATE and message; any other: its type and message.
            server = getattr(exc, "sqlstate", None)
            error = describe(exc)
            cause = {"sqlstate": server, "error": error.partition(": ")[2]} if server else {}
            log.error(
                what,
                extra=kv(
                    **(cause or {"error": error}),
                    attempt=attempt,
                    retry_in_s=delay,
                    outage_s=now - self._outage_since,
                    lines_held=self._outage_log.held,
                ),
            )

    def _database_recovered(self, attempts: int) -> None:
        if self._outage_since is not None and not self._failing:
            log.warning(
                "database usable again",
                extra=kv(
                    attempts=attempts + 1,
                    outage_s=time.monotonic() - self._outage_since,
                    lines_held=self._outage_log.reset(),
                ),
            )
            self._outage_since = None
            self.metrics.outage_seconds.set(0)
        self._db_ok()

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        cap = min(s.retry_max_s, s.retry_initial_s * 2.0 ** min(attempt - 1, 30))
        return cap / 2 + random.uniform(0, cap / 2)  # jitter: consumers must not retry in step

    def _db_ok(self) -> None:
        self._last_db_ok = time.monotonic()
        if not self._failing:  # a ping that works says nothing while writes keep failing
            self.metrics.set_up("database", up=True)

    # -- background ----------------------------------------------------------------------------

    async def _health(self, writer: Writer) -> None:
        while True:
            await asyncio.sleep(5)
            if time.monotonic() - self._last_db_ok < 5:
                continue
            try:
                await asyncio.wait_for(writer.ping(), 5)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the database is not usable
                self.metrics.set_up("database", up=False)
                # While writes fail they say so themselves; this line is for an idle consumer.
                if not self._failing and self._health_log(sqlstate(exc), time.monotonic()):
                    log.error(  # noqa: TRY400 - one line; a traceback would tell nothing more
                        "database unreachable", extra=kv(error=describe(exc))
                    )
            else:
                self._health_log.reset()
                self._db_ok()

    async def _maintain(self, writer: Writer) -> None:
        # Without this a plain-PostgreSQL database fills its DEFAULT partition once the days
        # created by `revline migrate` run out, and the rollups never move. A failure only
        # postpones it (rows wait in DEFAULT, nothing is lost); writes report outages themselves.
        while True:
            try:
                await writer.maintain()
            except Exception as exc:  # noqa: BLE001 - never a reason to stop ingesting
                if self._maintenance_log(sqlstate(exc), time.monotonic()):
                    log.warning("storage maintenance postponed", extra=kv(error=describe(exc)))
            else:
                self._maintenance_log.reset()
            await asyncio.sleep(self.settings.maintenance_every_s)

    async def _report(self) -> None:
        every = self.settings.log_every_s
        before = (self.totals.samples, self.totals.batches, time.monotonic())
        while True:
            await asyncio.sleep(every)
            t = self.totals
            now = time.monotonic()
            samples, batches, then = before
            log.info(
                "summary",
                extra=kv(
                    samples_per_s=(t.samples - samples) / (now - then),
                    batches=t.batches - batches,
                    samples_total=t.samples,
                    inserted_total=t.inserted,
                    rejected_total=t.rejected,
                    lag_s=t.lag_s,
                    commit_s=t.commit_s,
                    backlog=self._ready.qsize(),
                ),
            )
            before = (t.samples, t.batches, now)
            self._rejections_logged = 0
