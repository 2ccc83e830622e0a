"""``revline edge``: sources -> sampler -> spool -> publisher, one TaskGroup, clean SIGTERM.

Shutdown order on SIGTERM/SIGINT: stop reading the sources, flush the sampler's buffer to the
spool, let the publisher send what is open (at most ``shutdown_timeout_s``), close the sources,
close the spool. Anything unpublished stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import threading
from collections.abc import Iterator, Sequence

from revline.edge.clock import ClockModel, ClockSource, SystemClock, read_boot_id
from revline.edge.config import EdgeSettings
from revline.edge.http_transport import HttpPublisher
from revline.edge.publisher import Publisher
from revline.edge.reading import Source
from revline.edge.report import note_start, note_stop
from revline.edge.sampler import Sampler
from revline.edge.spool import Spool
from revline.logs import kv
from revline.mqtt import parse_mqtt_url, tls_context
from revline.settings import ConfigError

__all__ = ["StartError", "check_tls", "open_spool", "run_edge"]

log = logging.getLogger("revline.edge")

_STATS_EVERY_S = 60.0


def open_spool(settings: EdgeSettings) -> Spool:
    """The spool described by the settings (not yet entered)."""
    return Spool(
        settings.spool_path,
        max_bytes=int(settings.spool_max_mb * 1_000_000),
        boot_id=read_boot_id(),
    )


class StartError(Exception):
    """The edge cannot start on this machine (a path, a permission); one line for the operator."""


def check_tls(settings: EdgeSettings) -> None:
    """Refuse unreadable or malformed TLS files at start, naming the key, not at every connect
    (the same check the client makes when it connects: :func:`revline.mqtt.tls_context`)."""
    if parse_mqtt_url(settings.mqtt_url).tls:
        tls_context(
            ca_file=settings.ca_file or None,
            cert_file=settings.cert_file or None,
            key_file=settings.key_file or None,
        )


@contextlib.contextmanager
def _spool_for(settings: EdgeSettings) -> Iterator[Spool]:
    with contextlib.ExitStack() as stack:
        try:
            spool = stack.enter_context(open_spool(settings))
        except (OSError, sqlite3.Error) as exc:
            # Not writable, no space, not a database: a fact about the device, in one line.
            reason = str(exc)
            if isinstance(exc, OSError) and exc.strerror:
                reason = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
            where = f"{settings.spool_path} (spool_path)"
            raise StartError(f"cannot open the spool {where}: {reason}") from exc
        yield spool


def _configured_sources(settings: EdgeSettings) -> list[Source]:
    from revline.edge.sources import open_sources  # noqa: PLC0415 - pulls python-OBD, bleak, serial

    try:
        return open_sources(settings)
    except ImportError as exc:
        expected = f"needs the edge extra: pip install 'revline[edge]' (missing module {exc.name})"
        raise ConfigError("source", f"{settings.source!r}", expected) from exc


async def _read(source: Source, sampler: Sampler) -> None:
    async for reading in source.readings():
        sampler.add(reading)
    log.info("source ended", extra=kv(source=source.name))


async def _publish(publisher: Publisher | HttpPublisher) -> None:
    # The publisher is a thread: cancelling the awaiting task would not stop it, and it must be
    # finished before the spool closes under it.
    task = asyncio.ensure_future(asyncio.to_thread(publisher.run))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        publisher.stop()
        await task
        raise


async def _report(sampler: Sampler, publisher: Publisher | HttpPublisher, spool: Spool) -> None:
    while True:
        await asyncio.sleep(_STATS_EVERY_S)
        log.info(
            "edge running",
            extra=kv(
                written=sampler.written,
                published=publisher.stats.samples,
                acked_batches=publisher.stats.acked,
                resent=publisher.stats.resent,
                unbatched=spool.unbatched(),
                connected=publisher.connected,
                clock="trusted" if sampler.model.trusted else "untrusted",
            ),
        )


async def run_edge(
    settings: EdgeSettings,
    *,
    sources: Sequence[Source] | None = None,
    clock: ClockSource | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when running in the main thread).

    ``handle_signals=False`` leaves signals to the caller, e.g. the demo running several edges.
    """
    stop = stop or asyncio.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    chosen = list(sources) if sources is not None else _configured_sources(settings)
    check_tls(settings)
    clock = clock or SystemClock()
    model = ClockModel(settings.clock)
    with _spool_for(settings) as spool:
        note_start(spool)  # a crash last time is found (and reported) here
        sampler = Sampler(spool, model, clock, flush_interval_s=settings.flush_interval_s)
        sampler.check_clock()
        publisher: Publisher | HttpPublisher = (
            HttpPublisher(settings, spool) if settings.transport == "http"
            else Publisher(settings, spool)
        )
        log.info(
            "edge starting",
            extra=kv(
                vin=settings.vin,
                sources=",".join(s.name for s in chosen),
                spool=settings.spool_path,
                next_seq=spool.next_seq,
                clock="trusted" if model.trusted else "untrusted",
            ),
        )
        if not model.trusted:
            log.warning(
                "system clock not synchronised: samples wait in the spool with their monotonic "
                "time and are published once NTP or a GPS fix gives the time (set clock = "
                "'trusted' for a board with a real-time clock)"
            )
        async with contextlib.AsyncExitStack() as stack:
            opened = [await stack.enter_async_context(s) for s in chosen]
            flusher_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                readers = [
                    tg.create_task(_read(s, sampler), name=f"source-{s.name}") for s in opened
                ]
                flusher = tg.create_task(sampler.run_flusher(flusher_stop), name="flusher")
                publishing = tg.create_task(_publish(publisher), name="publisher")
                reporter = tg.create_task(_report(sampler, publisher, spool), name="report")
                await stop.wait()
                log.info("stopping: flushing the spool, then publishing what is open")
                for task in readers:
                    task.cancel()
                flusher_stop.set()
                await flusher
                publisher.stop()
                await publishing
                reporter.cancel()
        note_stop(spool)
        log.info(
            "edge stopped",
            extra=kv(written=sampler.written, unbatched=spool.unbatched(), next_seq=spool.next_seq),
        )
