"""Prometheus metrics and the ``/metrics`` + ``/healthz`` HTTP endpoint of the consumer.

With ``--workers N`` every worker process writes its metrics into prometheus_client's
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before the worker
starts); the supervisor's one endpoint sums the counters and histograms of all workers, dead
ones included (a total never goes back when a worker is restarted), and shows the gauges of the
live ones (:class:`WorkerMetrics`). Each gauge says how it combines (``multiprocess_mode``);
alone, in one process, that is ignored."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from revline.logs import kv
from revline.settings import ConfigError

__all__ = ["Exposed", "Metrics", "MetricsServer", "WorkerMetrics"]

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
            multiprocess_mode="livemax",
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
            multiprocess_mode="livemax",
        )
        # Per live worker (a pid label) under --workers: /healthz needs each one's.
        self.broker_up = Gauge(
            "revline_consumer_broker_up",
            "Connected to the broker",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.database_up = Gauge(
            "revline_consumer_database_up",
            "Last database call succeeded",
            registry=r,
            multiprocess_mode="liveall",
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


class Exposed(Protocol):
    """What the endpoint serves: a registry to scrape and which dependency is up."""

    @property
    def registry(self) -> CollectorRegistry: ...

    @property
    def healthy(self) -> dict[str, bool]: ...


class _WorkerFiles:
    """prometheus_client's multiprocess merge over the workers' files, skipping a file a worker
    is creating at that very moment (size 0 until it is sized: reading it raised struct.error
    and cost a scrape, and with it /healthz)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        """The merged metrics of every worker file that is ready."""
        files = [
            str(path)
            for path in Path(self.directory).glob("*.db")
            if path.is_file() and path.stat().st_size >= 8
        ]
        try:
            merged: Iterable[Metric] = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
                files, accumulate=True
            )
        except FileNotFoundError:  # a dead worker's live gauges removed meanwhile: next scrape
            return []
        return merged


class WorkerMetrics:
    """The supervisor's view of its workers' metrics (prometheus_client multiprocess mode).

    Healthy when every one of ``expected`` workers is running and each says both its broker
    and its database are up; a worker that is starting, restarting or dead makes it 503.
    """

    def __init__(self, directory: str, expected: int, running: Callable[[], set[int]]) -> None:
        self.directory = directory
        self.expected = expected
        self._running = running
        self._registry = CollectorRegistry()
        self._registry.register(_WorkerFiles(directory))

    @property
    def registry(self) -> CollectorRegistry:
        """Sums of all workers' counters and histograms, live workers' gauges."""
        return self._registry

    @property
    def healthy(self) -> dict[str, bool]:
        """``broker`` / ``database``: up in every running worker, all of them running."""
        running = self._running()
        up: dict[str, set[int]] = {"broker": set(), "database": set()}
        for family in self._registry.collect():
            what = {"revline_consumer_broker_up": "broker"}.get(family.name)
            what = what or {"revline_consumer_database_up": "database"}.get(family.name)
            if what is None:
                continue
            for sample in family.samples:
                pid = int(sample.labels.get("pid", "0"))
                if sample.value == 1 and pid in running:
                    up[what].add(pid)
        complete = len(running) == self.expected
        return {what: complete and pids >= running for what, pids in up.items()}


class MetricsServer:
    """A tiny HTTP server on the event loop: ``GET /metrics`` and ``GET /healthz``.

    ``/healthz`` is 200 when both the broker and the database are reachable, else 503; the JSON
    body says which is not.
    """

    def __init__(self, metrics: Exposed, *, host: str, port: int) -> None:
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
