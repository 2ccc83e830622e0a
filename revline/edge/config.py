"""Settings of ``revline edge``: one frozen object built from TOML, environment and flags.

Layers (later wins): defaults < ``/etc/revline/edge.toml`` (or ``--config``) < ``REVLINE_EDGE_*``
environment variables < command-line flags. Every value is validated at start; a bad one stops
the program with one line naming the key (see ``revline.settings``). ``edge/edge.toml.example``
lists every key with its default.

Every number has a finite upper bound as well as a lower one: ``ack_timeout_s = 1e300`` or
``batch_max_age_s = inf`` would not fail at start but would silently switch a mechanism off
(no resend ever, no live batch ever), and a bound in the type refuses them with the key named.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from revline.contract import Vin
from revline.mqtt import parse_mqtt_url
from revline.settings import ConfigError, check_fields, load

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SPOOL_PATH",
    "ENV_PREFIX",
    "EdgeSettings",
    "load_edge_settings",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/revline/edge.toml")
ENV_PREFIX: Final = "REVLINE_EDGE_"
DEFAULT_SPOOL_PATH: Final = "/var/lib/revline/edge-spool.db"

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Baudrate = Annotated[int, msgspec.Meta(ge=1, le=4_000_000)]
"""Serial speeds: ELM327 clones go up to 2 Mbit/s, GPS receivers to 921600."""
Hz = Annotated[float, msgspec.Meta(gt=0, le=1000)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
"""A duration in seconds: more than a day would mean 'never' and is refused as a typo."""


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``revline edge`` needs to know, validated once at start."""

    vin: Vin
    """The vehicle's VIN (17 characters, no I/O/Q); names the topics and the MQTT client id."""

    # --- sources (read by revline/edge/sources.py) ---
    source: Literal["sim", "obd", "ble"] = "sim"
    obd_port: str = "/dev/ttyUSB0"
    """ELM327 serial port (``/dev/ttyUSB0``, ``/dev/rfcomm0``); ``auto`` lets python-OBD scan."""
    obd_baudrate: Baudrate | None = None
    obd_fast_pids: list[str] = msgspec.field(
        default_factory=lambda: ["RPM", "SPEED", "THROTTLE_POS", "ENGINE_LOAD", "MAF"]
    )
    obd_slow_pids: list[str] = msgspec.field(
        default_factory=lambda: [
            "COOLANT_TEMP",
            "INTAKE_TEMP",
            "FUEL_LEVEL",
            "CONTROL_MODULE_VOLTAGE",
            "ODOMETER",
        ]
    )
    obd_extra_pids: list[str] = msgspec.field(default_factory=list)
    fast_hz: Hz = 5.0
    slow_every_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    ble_name: str = ""
    ble_address: str = ""
    gps: Literal["none", "gpsd", "nmea"] = "none"
    gps_device: str = "/dev/ttyACM0"
    gps_baudrate: Baudrate = 9600
    gpsd_host: str = "127.0.0.1"
    gpsd_port: Port = 2947
    sim_hz: Hz = 10.0
    sim_seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 0
    sim_speedup: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 1.0
    """Simulated seconds per real second (tests and demos drive faster than real time)."""

    # --- spool ---
    spool_path: str = DEFAULT_SPOOL_PATH
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.5
    """Samples are committed to the spool at least this often; a crash loses at most this much."""
    spool_max_mb: Annotated[float, msgspec.Meta(ge=1, le=1_000_000)] = 512.0
    """Spool size cap. 7 days at 10 Hz is about 6 M samples, about 400 MB at ~65 B/sample.
    At most 1 TB: beyond any SD card or SSD a Pi would carry."""

    # --- publisher ---
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://`` or ``mqtts://[user[:password]@]host[:port]``: per-device credentials go here."""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    batch_max_samples: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    batch_max_age_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    """The live batch closes after this long even if small; at most 10 minutes. 5 s: a third of
    the bytes of 1-s batches at 10 Hz, a fifth of the messages, dashboards at most ~5.5 s
    behind (the measured table: docs/edge.md, "Batching")."""
    wire_version: Literal[1, 2] = 2
    """Contract version of the batches sent: 2 (columns at the database's resolution, 8-18 B a
    sample at 10 Hz on the air; docs/wire.md) or 1 (MessagePack samples, ~200 B each), for a
    consumer older than v2."""
    inflight_max: Annotated[int, msgspec.Meta(ge=1, le=65_535)] = 20
    """Messages published but not yet PUBACKed, at most; fed from the spool."""
    unacked_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    """Batches published but not yet acked end to end, at most; the rest waits in the spool."""
    ack_timeout_s: Seconds = 30.0
    """A batch PUBACKed but not acked end to end after this long is sent again, same bytes."""
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 7 * 24 * 3600
    """MQTT 5 session expiry, a 32-bit field; 4294967295 means the session never expires."""
    transport: Literal["mqtt", "http"] = "mqtt"
    """``http``: post batches to ``revline api`` (``api_url``, ``api_key``) instead of MQTT, for
    networks that allow no MQTT session; same spool semantics (revline/edge/http_transport.py)."""
    api_url: str = ""
    """``https://host`` of ``revline api`` (``http://`` only on a trusted network)."""
    api_key: str = ""
    """An ``ingest:<VIN>`` key of that API (``revline api-key add``)."""
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0

    # --- clock and status ---
    clock: Literal["auto", "trusted", "untrusted"] = "auto"
    """``auto``: trust the wall clock once the system says NTP synchronised it, or GPS gives time.
    ``trusted``: always trust it (a board with an RTC). ``untrusted``: only GPS time counts."""
    shutdown_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    """On SIGTERM, time allowed to flush the spool and publish what is open before closing."""
    status_every_s: Seconds = 60.0
    """The device's status (``status/<vin>``: backlog, losses, clock) is published this often,
    and on every connect (revline.edge.report, docs/audit.md)."""

    def __post_init__(self) -> None:
        # Built directly or loaded, the same checks: every constraint above (msgspec checks them
        # only when converting), then what a constraint cannot express. ConfigError is not a
        # ValueError, so msgspec lets it through unchanged and the operator sees the key.
        check_fields(self)
        parse_mqtt_url(self.mqtt_url)
        if self.source == "ble" and not (self.ble_name or self.ble_address):
            raise ConfigError("ble_name", "", "source = 'ble' needs ble_name or ble_address")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("reconnect_max_s", "", "expected a value >= reconnect_min_s")
        if self.key_file and not self.cert_file:
            raise ConfigError("key_file", "", "set without cert_file")
        if self.transport == "http":
            if not self.api_url.startswith(("https://", "http://")):
                raise ConfigError("api_url", "", "transport = 'http' needs https://host")
            if not self.api_key:
                raise ConfigError("api_key", "", "transport = 'http' needs an ingest:<VIN> key")


def load_edge_settings(
    config: Path | None = None,
    *,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> EdgeSettings:
    """Settings from ``config`` (default ``/etc/revline/edge.toml`` if it exists), env and flags.

    An explicitly named config file that does not exist is an error; the default one is optional,
    so that a development run can be configured from the environment alone.
    """
    path = config
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    return load(EdgeSettings, toml_path=path, env_prefix=ENV_PREFIX, environ=environ, flags=flags)
