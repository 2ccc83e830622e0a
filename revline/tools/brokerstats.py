"""``revline broker-stats``: Mosquitto's own counters (``$SYS/broker/...``) as Prometheus metrics.

The consumer sees what reaches it; only the broker knows what it holds for a consumer that is
away (its queue) and what it dropped when a queue was full. Mosquitto publishes those numbers on
``$SYS`` every ``sys_interval`` seconds (10 by default); this service subscribes with a login the
ACL lets read ``$SYS/#`` and nothing else (``revline-monitor``, made by ``revline init``), and
serves the latest values on ``/metrics`` for Prometheus (compose's ``broker-stats`` service; the
"Revline pipeline" dashboard).

A ``$SYS`` payload is untrusted input like any other: only short decimal numbers are taken; any
other payload is counted in ``revline_broker_stats_ignored_total`` and skipped.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from revline.cli import Commands

__all__ = ["SYS_METRICS", "BrokerStats", "SysMetric", "register"]

log = logging.getLogger("revline.tools.brokerstats")

MONITOR_LOGIN: Final = "revline-monitor"
MONITOR_PASSWORD_VARIABLE: Final = "REVLINE_MONITOR_MQTT_PASSWORD"  # noqa: S105 - its name
DEFAULT_PORT: Final = 9109
_MAX_PAYLOAD: Final = 32


@dataclass(frozen=True)
class SysMetric:
    """One ``$SYS`` topic and the Prometheus metric it becomes."""

    name: str
    kind: str
    """``gauge``, or ``counter`` (Mosquitto's value counts since the broker started)."""
    help: str


SYS_METRICS: Final = {
    "$SYS/broker/store/messages/count": SysMetric(
        "revline_broker_store_messages",
        "gauge",
        "Messages the broker holds: queued for offline or slow clients, and in flight",
    ),
    "$SYS/broker/store/messages/bytes": SysMetric(
        "revline_broker_store_bytes", "gauge", "Payload bytes of the messages the broker holds"
    ),
    "$SYS/broker/publish/messages/dropped": SysMetric(
        "revline_broker_dropped",
        "counter",
        "Messages the broker dropped because a client's queue was full (since it started)",
    ),
    "$SYS/broker/clients/connected": SysMetric(
        "revline_broker_clients_connected", "gauge", "Clients connected now"
    ),
    "$SYS/broker/messages/received": SysMetric(
        "revline_broker_messages_received", "counter", "Messages of any kind received"
    ),
    "$SYS/broker/messages/sent": SysMetric(
        "revline_broker_messages_sent", "counter", "Messages of any kind sent"
    ),
}
"""Which ``$SYS`` topics are exported, by topic."""


def _number(payload: bytes) -> float | None:
    """A short finite decimal number, else None."""
    if len(payload) > _MAX_PAYLOAD:
        return None
    try:
        value = float(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


class BrokerStats:
    """The latest value of each ``$SYS`` topic, as a Prometheus collector. Thread-safe: the MQTT
    thread writes, the HTTP thread reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._ignored = 0
        self._last_update: float | None = None
        self._connected = False
        self._clock = time.monotonic

    def update(self, topic: str, payload: bytes) -> bool:
        """Take one ``$SYS`` message; False (and counted) when it is not a number we export."""
        value = _number(payload) if topic in SYS_METRICS else None
        with self._lock:
            if value is None:
                self._ignored += 1
                return False
            self._values[topic] = value
            self._last_update = self._clock()
            return True

    def set_connected(self, *, connected: bool) -> None:
        """Record whether the subscription to the broker is up."""
        with self._lock:
            self._connected = connected

    def values(self) -> Mapping[str, float]:
        """Metric name -> latest value (what ``/metrics`` shows), for tests and logs."""
        with self._lock:
            return {SYS_METRICS[t].name: v for t, v in self._values.items()}

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client collector protocol."""
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        with self._lock:
            values = dict(self._values)
            ignored, connected, last = self._ignored, self._connected, self._last_update
        for topic, metric in SYS_METRICS.items():
            if topic not in values:
                continue
            family = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            yield family(metric.name, metric.help, value=values[topic])
        yield GaugeMetricFamily(
            "revline_broker_up",
            "Subscribed to the broker's $SYS topics now",
            value=1.0 if connected else 0.0,
        )
        yield GaugeMetricFamily(
            "revline_broker_stats_age_seconds",
            "Seconds since the broker last published a value (NaN before the first)",
            value=self._clock() - last if last is not None else math.nan,
        )
        yield CounterMetricFamily(
            "revline_broker_stats_ignored",
            "$SYS messages that were not a number this service exports",
            value=float(ignored),
        )


def register(commands: Commands) -> None:
    """Add ``revline broker-stats``."""
    parser = commands.add(
        commands.top,
        "broker-stats",
        "serve the broker's queue, drop and client counters ($SYS) as Prometheus metrics",
        _run,
    )
    parser.add_argument(
        "--mqtt-url",
        help=f"mqtt://{MONITOR_LOGIN}:PASSWORD@host:1883, a login allowed to read $SYS/# "
        "(env MQTT_URL)",
    )
    parser.add_argument("--ca-file", help="CA bundle for an mqtts:// broker")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"/metrics port (default {DEFAULT_PORT})"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to serve on (default all)")  # noqa: S104


def _run(args: argparse.Namespace) -> int:
    from paho.mqtt.client import MQTTMessage  # noqa: PLC0415
    from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

    from revline.mqtt import connect_error_reason, make_client, parse_mqtt_url  # noqa: PLC0415
    from revline.settings import ConfigError, env_value  # noqa: PLC0415

    url = args.mqtt_url or env_value("mqtt_url")
    if not url:
        print("revline broker-stats: mqtt_url: not set (--mqtt-url or MQTT_URL)", file=sys.stderr)
        return 2
    try:
        address = parse_mqtt_url(url)
        client = make_client(address, address.username or "revline-broker-stats",
                             ca_file=args.ca_file)  # fmt: skip
    except ConfigError as exc:
        print(f"revline broker-stats: config error: {exc}", file=sys.stderr)
        return 2
    stats = BrokerStats()
    registry = CollectorRegistry()
    collector: Collector = stats
    registry.register(collector)
    try:
        server, _thread = start_http_server(args.port, args.host, registry=registry)
    except OSError as exc:
        print(
            f"revline broker-stats: cannot listen on {args.host}:{args.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1

    def on_connect(c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("broker refused the login: %s", rc)
            return
        client.subscribe([(topic, 0) for topic in SYS_METRICS])
        stats.set_connected(connected=True)
        log.info("subscribed to %d $SYS topics on %s", len(SYS_METRICS), address)

    def on_disconnect(*_: object) -> None:
        stats.set_connected(connected=False)

    def on_connect_fail(*_: object) -> None:
        log.warning("cannot connect to broker: %s", connect_error_reason(client.connect_error,
                                                                        address))  # fmt: skip

    def on_message(_c: object, _u: object, message: MQTTMessage) -> None:
        stats.update(message.topic, bytes(message.payload))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = on_connect_fail
    client.on_message = on_message
    client.reconnect_delay_set(1, 30)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    client.connect_async(address.host, address.port)
    client.loop_start()
    print(f"revline broker-stats: serving http://{args.host}:{args.port}/metrics", flush=True)
    try:
        stop.wait()
    finally:
        client.disconnect()
        client.loop_stop()
        server.shutdown()
    return 0
