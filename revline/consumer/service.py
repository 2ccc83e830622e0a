"""``revline consumer``: MQTT -> decode/validate -> batch -> one transaction -> PUBACK -> e2e ack.

One TaskGroup of named tasks:

* ``collect`` takes messages from the subscriber, validates them and closes batches by size and
  age; a full batch goes to a queue of one, so at most one batch waits while another is written.
* ``write`` commits each batch in one transaction (retrying outages with the project's capped,
  jittered exponential backoff, forever), then PUBACKs its messages in arrival order, then
  publishes ``ack/<vin>``. While it waits, ``collect`` stops taking batches, the broker stops
  sending once ``receive_maximum`` messages are unacked, and memory stays flat.
* ``report`` logs a summary every ``log_every_s``; ``health`` pings the database when idle.

SIGTERM/SIGINT: stop taking messages, commit what was received, ack it, disconnect keeping the
session; a write still failing after ``shutdown_timeout_s`` is abandoned unacked (the broker
redelivers it to the next run), never lost.

What to make of a message, what to store or dead-letter, what a database error means, in which
order to PUBACK and which acks to publish are decided by :mod:`revline.consumer.pipeline`
(pure, tested without servers); this module is the asyncio, MQTT and asyncpg around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from revline.backoff import backoff_delay
from revline.consumer.batcher import Batcher, Pending
from revline.consumer.config import ConsumerSettings
from revline.consumer.derive import derivations
from revline.consumer.metrics import Metrics, MetricsServer
from revline.consumer.pipeline import (
    Fault,
    InOrder,
    Item,
    Split,
    acks,
    classify,
    fault,
    newest_sample,
    plan,
)
from revline.consumer.subscriber import Inbound, Subscriber
from revline.consumer.writer import Rejected, Writer, WriteResult
from revline.contract import ack_topic, encode
from revline.logs import Throttle, kv
from revline.mqtt import parse_mqtt_url, tls_context
from revline.storage.derive import Background
from revline.storage.errors import UnusableDatabaseError, describe, sqlstate
from revline.wire_v2 import AnyBatch

__all__ = ["Consumer", "Item", "serve"]

log = logging.getLogger("revline.consumer")

_T = TypeVar("_T")


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


@dataclass(frozen=True, slots=True)
class _Stored:
    """What committing one write batch did: rows written, messages dead-lettered, and the
    newest sample among the batches really stored (not those dead-lettered), for ``lag_s``."""

    result: WriteResult
    rejected: list[Rejected]
    newest_us: int | None


def _outage(exc: BaseException) -> bool:
    """Retried while writing: every error (what is not an outage became a dead letter)."""
    return isinstance(exc, Exception)


def _waitable(exc: BaseException) -> bool:
    """Retried while opening the database at start: all but what waiting cannot cure."""
    return isinstance(exc, Exception) and not isinstance(exc, UnusableDatabaseError)


_REJECTIONS_LOGGED_PER_SUMMARY = 10
_OUTAGE_LOG_EVERY_S = 10.0
"""While the database fails, one line per this many seconds (and at once when the error changes)."""
_OUTAGE_LINE = "database outage: retrying the same batch, acking nothing"


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
        self._outage_log = Throttle(_OUTAGE_LOG_EVERY_S)
        self._health_log = Throttle(_OUTAGE_LOG_EVERY_S)
        self._maintenance_log = Throttle(_OUTAGE_LOG_EVERY_S)

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
            self.metrics.adopt(writer.derivations)  # their figures on /metrics (revline.audit)
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
        (refused connections, missing privileges...), until ``stop``. Raises
        :class:`UnusableDatabaseError` when waiting cannot help: no such database, login
        refused, not migrated."""
        s = self.settings

        async def enter() -> Writer:
            writer = Writer(
                s.database_url,
                pool_size=s.pool_size,
                statement_timeout_s=s.statement_timeout_s,
                derivations=derivations(s),
            )
            await stack.enter_async_context(writer)
            return writer

        if stop.is_set():
            return None
        retry = self._retry(enter, "database unusable at start; retrying", on=_waitable)
        opening = asyncio.create_task(retry, name="open-writer")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            # A stop ends the wait between attempts (up to retry_max_s) at once.
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await opening
        return None if opening.cancelled() else opening.result()

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
            background.extend(
                tg.create_task(d.run(writer.pool), name=d.name)
                for d in writer.derivations
                if isinstance(d, Background)
            )
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
            if not inbound.empty():
                # Messages are waiting: take one without arming a timer. A timeout per message
                # (a TimerHandle scheduled and cancelled) was ~13 % of the consumer's CPU with
                # 1-sample messages. The batch's age is checked against the clock instead.
                if deadline is not None and loop.time() >= deadline:
                    await self._ready.put(batcher.take())
                    continue
                got = inbound.get_nowait()
            else:
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
        # Stopping: what the subscriber already handed over is committed too (it is bounded by
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
        self.metrics.messages.inc()
        item = classify(
            got,
            now_us=int(time.time() * 1e6),
            max_future_us=max_future_us,
            max_age_us=int(self.settings.max_age_s * 1e6),
        )
        if item.rejected is not None:
            self._log_rejection(item.rejected, len(got.payload))
        subscriber.hold(got, item.size)
        return batcher.add(item, item.samples, now, item.size)

    async def _hand_over(self, closed: list[Pending[Item]]) -> None:
        for pending in closed:
            await self._ready.put(pending)

    def _log_rejection(self, rejected: Rejected, size: int) -> None:
        # One line per bad message helps whoever is publishing by hand; a flood (a broken device,
        # an attack) is capped per summary interval, the rejected table keeps every one anyway.
        self._rejections_logged += 1
        if self._rejections_logged <= _REJECTIONS_LOGGED_PER_SUMMARY:
            log.warning(
                "message rejected",
                extra=kv(
                    topic=rejected.topic,
                    reason=rejected.reason,
                    detail=rejected.detail[:200],
                    bytes=size,
                ),
            )
        elif self._rejections_logged == _REJECTIONS_LOGGED_PER_SUMMARY + 1:
            log.warning("more messages rejected: see the next summary and the rejected table")

    # -- write ---------------------------------------------------------------------------------

    async def _write_loop(self, writer: Writer, subscriber: Subscriber) -> None:
        """Write up to ``write_concurrency`` batches at once; ack strictly in arrival order
        (:class:`InOrder`: a committed batch waits for its predecessors)."""
        slots = asyncio.Semaphore(self.settings.write_concurrency)
        order: InOrder[tuple[Pending[Item], float, _Stored]] = InOrder()
        loop = asyncio.get_running_loop()

        async def write(ticket: int, pending: Pending[Item], started: float) -> None:
            stored = await self._store(writer, pending.items)
            for committed in order.done(ticket, (pending, started, stored)):
                self._acknowledge(subscriber, *committed)
                slots.release()
                del committed  # acked: not kept alive until the next batch

        async with asyncio.TaskGroup() as tg:
            while (pending := await self._ready.get()) is not None:
                if not pending.items:
                    continue
                await slots.acquire()
                ticket = order.start()
                tg.create_task(write(ticket, pending, loop.time()), name=f"write-{ticket + 1}")
                del pending  # the write task has it; freed as soon as it is acked

    def _acknowledge(
        self, subscriber: Subscriber, pending: Pending[Item], started: float, stored: _Stored
    ) -> None:
        """The batch is committed: PUBACK its messages, publish e2e acks, count and log it."""
        loop = asyncio.get_running_loop()
        result, rejected = stored.result, stored.rejected
        now = time.time()
        # Only now, with the transaction committed, may the broker forget these messages.
        subscriber.ack(item.inbound for item in pending.items)
        qos = self.settings.ack_qos
        for ack in acks(pending.items):
            subscriber.publish(ack_topic(ack.vin), encode(ack), qos)

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
        """Commit the batches, then dead-letter the refused messages (:func:`plan`); each step is
        retried until it succeeds (:meth:`_retry`), so this returns only when all is durable.

        The dead letters are written after the samples and retried on their own: a failing
        ``rejected`` insert (a missing privilege...) is an outage like any other, and must not
        make the samples be written again.
        """
        todo = plan(items)
        rejected = list(todo.refused)
        result = WriteResult(batches=0, samples=0, inserted=0)
        newest: int | None = None
        if todo.store:
            result, refused, stored = await self._retry(
                functools.partial(self._write, writer, todo.store), _OUTAGE_LINE
            )
            rejected.extend(refused)
            newest = newest_sample(stored)
        if rejected:
            await self._retry(functools.partial(writer.reject, rejected), _OUTAGE_LINE)
        return _Stored(result, rejected, newest)

    async def _write(
        self, writer: Writer, items: Sequence[Item]
    ) -> tuple[WriteResult, list[Rejected], list[AnyBatch]]:
        """One transaction for all ``items``; if the database refuses their values
        (:attr:`Fault.VALUES`), one per message (:meth:`_write_each`). An outage propagates."""
        batches = [item.batch for item in items if item.batch is not None]
        try:
            return await writer.write(batches), [], batches
        except Exception as exc:
            if fault(exc) is Fault.OUTAGE:
                raise
            log.warning(
                "batch refused by the database; writing its messages one by one",
                extra=kv(messages=len(items), error=describe(exc)),
            )
        return await self._write_each(writer, items)

    async def _write_each(
        self, writer: Writer, items: Sequence[Item]
    ) -> tuple[WriteResult, list[Rejected], list[AnyBatch]]:
        """Write each message alone; dead-letter one by the rule of :class:`Split` (its own data
        error, proven by a probe write that works: :meth:`Writer.probe`). An outage propagates."""
        split = Split()
        for item, batch in split.todo(items):
            try:
                one = await writer.write([batch])
            except Exception as exc:
                if fault(exc) is Fault.OUTAGE:
                    raise
                if split.needs_probe(exc):
                    await writer.probe()  # raises if the deployment cannot write at all
                    split.probe_worked()
                split.refuse(item, exc)
                continue
            split.wrote(batch, one)
        return split.result, split.refused, split.stored

    async def _retry(
        self,
        op: Callable[[], Awaitable[_T]],
        what: str,
        *,
        on: Callable[[BaseException], bool] = _outage,
    ) -> _T:
        """Run ``op`` until it succeeds, forever, waiting between attempts with the project's one
        backoff (:func:`revline.backoff.backoff_delay`: ``retry_initial_s`` doubling up to
        ``retry_max_s``, fully jittered, so consumers that lost the same database drift apart
        instead of retrying in step, at the cap too).

        Every error ``on`` accepts is an outage (:meth:`_write` has already turned data errors
        into dead letters): the same batch is retried however long it takes, nothing is acked
        meanwhile, ``/healthz`` is red and one line per ``_OUTAGE_LOG_EVERY_S`` says ``what``.
        An error ``on`` refuses propagates at once; cancellation (shutdown) ends the wait.
        """
        s = self.settings
        failed = 0
        try:
            while True:
                try:
                    value = await op()
                except BaseException as exc:
                    if not on(exc):
                        raise
                    failed += 1
                    if failed == 1:
                        self._failing += 1
                    delay = backoff_delay(failed, initial=s.retry_initial_s, maximum=s.retry_max_s)
                    self._database_failed(exc, what, failed, delay)
                else:
                    break
                # A failed write leaves reference cycles (exception, traceback, frames) that
                # hold the batch's staging rows; in a long outage they pile up faster than the
                # cyclic GC's full passes come, and RSS climbs. Collecting here keeps memory
                # flat, and costs nothing that matters while the database is failing anyway.
                gc.collect()
                await asyncio.sleep(delay)
        finally:
            if failed:  # recovered, or cancelled while failing (shutdown): no longer retrying
                self._failing -= 1
        if failed:
            self._database_recovered(failed)
        else:
            self._db_ok()
        return value

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
        if self._outage_log.event(now, code):
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
                if not self._failing and self._health_log.event(time.monotonic(), sqlstate(exc)):
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
                if self._maintenance_log.event(time.monotonic(), sqlstate(exc)):
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


def serve(settings: ConsumerSettings) -> int:
    """``revline consumer``: run until SIGTERM/SIGINT; the exit code.

    A database that waiting cannot fix (missing, login refused, not migrated) stops it with one
    line and exit code 1; one that is down or failing is waited for."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Consumer(settings).run(stop)

    try:
        asyncio.run(main())
    except UnusableDatabaseError as exc:
        print(f"revline consumer: {exc}", file=sys.stderr)
        return 1
    return 0
