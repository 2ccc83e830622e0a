"""Prometheus metrics and the ``/metrics`` + ``/healthz`` HTTP endpoint of the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from revline.logs import kv
from revline.settings import ConfigError

__all__ = ["Metrics", "MetricsServer"]

log = logging.getLogger("revline.consumer.metrics")


class Metrics:
    """The consumer's counters and gauges, in a registry of their own (one per service)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("revline_consumer_messages", "MQTT messages received", registry=r)
        self.samples = Counter(
            "revline_consumer_samples", "Samples committed (duplicates included)", registry=r
        )
        self.inserted = Counter(
            "revline_consumer_inserted", "New rows in the cold table", registry=r
        )
        self.batches = Counter("revline_consumer_batches", "Committed write batches", registry=r)
        self.rejected = Counter(
            "revline_consumer_rejected", "Messages dead-lettered", ["reason"], registry=r
        )
        self.db_errors = Counter(
            "revline_consumer_db_errors", "Failed database calls (retried)", registry=r
        )
        self.db_error_codes = Counter(
            "revline_consumer_db_error_codes",
            "Failed database calls by SQLSTATE, or exception type when there is none",
            ["code"],
            registry=r,
        )
        self.outage_seconds = Gauge(
            "revline_consumer_db_outage_seconds",
            "How long database calls have been failing without a success; 0 when they work",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "revline_consumer_commit_seconds",
            "Time from receiving a batch's first message to its commit",
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.lag_seconds = Gauge(
            "revline_consumer_lag_seconds",
            "Commit time minus the newest sample's timestamp in the last batch",
            registry=r,
        )
        self.broker_up = Gauge("revline_consumer_broker_up", "Connected to the broker", registry=r)
        self.database_up = Gauge(
            "revline_consumer_database_up", "Last database call succeeded", registry=r
        )

        self._up = {"broker": False, "database": False}

    def adopt(self, parts: Iterable[object]) -> None:
        """Serve the figures of parts that keep their own (a derivation's ``registry``)."""
        for part in parts:
            registry = getattr(part, "registry", None)
            if isinstance(registry, CollectorRegistry):
                self.registry.register(registry)

    def set_up(self, what: str, *, up: bool) -> None:
        """Record whether ``broker`` or ``database`` is reachable."""
        self._up[what] = up
        (self.broker_up if what == "broker" else self.database_up).set(1 if up else 0)

    @property
    def healthy(self) -> dict[str, bool]:
        """Which dependency is reachable right now."""
        return dict(self._up)


class MetricsServer:
    """A tiny HTTP server on the event loop: ``GET /metrics`` and ``GET /healthz``.

    ``/healthz`` is 200 when both the broker and the database are reachable, else 503; the JSON
    body says which is not.
    """

    def __init__(self, metrics: Metrics, *, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:  # taken, not ours to bind, unknown host: a setting to change
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(
                "metrics_port",
                "",
                f"cannot listen on {self.host}:{self.port} ({reason}); "
                "choose another --metrics-port, or 0 to disable the endpoint",
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("metrics endpoint listening", extra=kv(url=f"http://{self.host}:{self.port}"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                body = generate_latest(self.metrics.registry)
                status, ctype = 200, CONTENT_TYPE_LATEST
            elif path == "/healthz":
                health = self.metrics.healthy
                status = 200 if all(health.values()) else 503
                ctype, body = "application/json", json.dumps(health).encode()
            else:
                status, ctype, body = 404, "text/plain", b"try /metrics or /healthz\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
