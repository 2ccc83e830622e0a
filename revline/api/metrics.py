"""The API's Prometheus metrics, served at ``/metrics`` (compose's Prometheus scrapes
``api:8000``): requests by handler and status, open streams, HTTP ingest outcomes."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["ApiMetrics"]


class ApiMetrics:
    """One registry per server (tests run several in one process)."""

    def __init__(self, streams: Callable[[], float], live: Callable[[], float]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "revline_api_requests", "HTTP responses by handler and status", ["handler", "status"],
            registry=r,
        )
        self.ingested_batches = Counter(
            "revline_api_ingest_batches", "Batches committed by HTTP ingest", registry=r
        )
        self.ingested_samples = Counter(
            "revline_api_ingest_samples", "Samples in committed HTTP batches", registry=r
        )
        self.ingested_new = Counter(
            "revline_api_ingest_inserted", "New cold rows from HTTP ingest", registry=r
        )
        self.ingest_refused = Counter(
            "revline_api_ingest_refused", "HTTP batches refused, by reason", ["reason"],
            registry=r,
        )
        exports = Gauge("revline_api_exports_open", "Telemetry exports streaming now", registry=r)
        exports.set_function(streams)
        subscribers = Gauge("revline_api_live_streams", "Live streams open now", registry=r)
        subscribers.set_function(live)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
