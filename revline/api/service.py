"""``revline api``: open the database (retrying an outage), then serve with uvicorn until SIGTERM.

One asyncio loop holds everything: the read pool, the consumer's writer for ingest, the live
feed's LISTEN connection (a named task) and uvicorn's server. At start a database that cannot be
used as configured (no such database, login refused, not migrated) stops the service with one
line; one that does not answer yet is waited for, one line per kind of failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import msgspec
import uvicorn

from revline.api.app import Resources, create_app
from revline.api.auth import Authenticator
from revline.api.config import ApiSettings
from revline.api.ingest import Ingest
from revline.api.live import Hub
from revline.backoff import backoff_delay
from revline.consumer.config import ConsumerSettings
from revline.consumer.derive import derivations
from revline.consumer.writer import Writer
from revline.logs import kv
from revline.storage.derive import Background
from revline.storage.errors import UnusableDatabaseError, describe, unusable_database

__all__ = ["open_resources", "serve"]

log = logging.getLogger("revline.api")


async def _setup(connection: Any) -> None:
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(
            kind, schema="pg_catalog", encoder=_json_text, decoder=msgspec.json.decode,
            format="text",
        )


def _json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


async def _open_pool(settings: ApiSettings) -> Any:
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=settings.pool_size,
        init=_setup,
        command_timeout=settings.statement_timeout_s + 5,
        server_settings={
            "statement_timeout": str(int(settings.statement_timeout_s * 1000)),
            "application_name": "revline-api",
            "TimeZone": "UTC",
        },
    )


async def _with_retry(what: str, open_: Any) -> Any:
    attempt = 0
    last = ""
    while True:
        try:
            return await open_()
        except UnusableDatabaseError:
            raise
        except Exception as exc:
            unusable = unusable_database(exc)
            if unusable is not None:
                raise unusable from exc
            attempt += 1
            error = describe(exc)
            if error != last:
                log.warning(f"{what}: database unreachable; retrying", extra=kv(error=error))
                last = error
            await asyncio.sleep(backoff_delay(attempt, initial=0.5, maximum=10.0))


@contextlib.asynccontextmanager
async def open_resources(settings: ApiSettings) -> AsyncIterator[Resources]:
    """The handlers' resources, open; closed (live feed stopped) when the block ends."""
    consumer = ConsumerSettings(
        database_url=settings.writer_url,
        max_future_s=settings.max_future_s,
        max_age_s=settings.max_age_s,
        pool_size=settings.ingest_pool_size,
        statement_timeout_s=settings.statement_timeout_s,
        metrics_port=0,
    )
    writer = Writer(
        settings.writer_url,
        pool_size=settings.ingest_pool_size,
        statement_timeout_s=settings.statement_timeout_s,
        derivations=derivations(consumer),
    )
    await _with_retry("ingest writer", writer.__aenter__)
    try:
        pool = await _with_retry("read pool", lambda: _open_pool(settings))
        try:
            auth = Authenticator(
                pool, rate_per_s=settings.rate_per_s, burst=settings.burst,
                cache_s=settings.key_cache_s,
            )
            hub = Hub(settings.database_url, on_revoked=auth.forget)
            ingest = Ingest(
                writer, max_future_s=settings.max_future_s, max_age_s=settings.max_age_s,
                retry_after_s=settings.retry_after_s,
            )
            resources = Resources(settings, pool, auth, ingest, hub)
            tasks = [asyncio.create_task(hub.run(), name="live-feed")]
            # What HTTP ingest marks for later (insight's dirty spans) is folded in here as in
            # the consumer; both may run: the background work locks what it recomputes.
            tasks += [
                asyncio.create_task(d.run(writer.pool), name=d.name)
                for d in writer.derivations
                if isinstance(d, Background)
            ]
            try:
                yield resources
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
        finally:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except TimeoutError:
                pool.terminate()
    finally:
        await writer.__aexit__(None, None, None)


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGTERM/SIGINT through the event loop: it returns (and the
    resources close in order) instead of re-raising the signal once it has shut down, and live
    streams are ended at once instead of holding the shutdown for its whole grace period."""

    def __init__(self, config: uvicorn.Config, *, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def _stop(self) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: do not wait for connections
        self.should_exit = True
        self._on_stop()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _serve(settings: ApiSettings) -> None:
    async with open_resources(settings) as resources:
        app = create_app(resources)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,  # revline.logs has set up logging; no key is in any line it writes
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            proxy_headers=True,
        )
        server = _Server(config, on_stop=resources.hub.close_streams)
        log.info(
            "api ready",
            extra=kv(host=settings.host, port=settings.port, docs=settings.docs),
        )
        await server.serve()
    log.info("api stopped")


def serve(settings: ApiSettings) -> int:
    """Run until SIGTERM/SIGINT; the exit code."""
    with contextlib.suppress(ImportError):  # uvloop (the api extra, Linux): a faster loop
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(_serve(settings))
    except UnusableDatabaseError as exc:
        print(f"revline api: {exc}", flush=True)
        return 2
    return 0
