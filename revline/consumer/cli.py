"""``revline consumer``: its flags and settings here; the service (asyncpg, prometheus) is imported
only when it runs, so that ``revline --help`` stays light."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from revline.consumer.config import load_settings, startup_warnings

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

# Flags map one to one onto ConsumerSettings keys; an unset flag (None) leaves the key to the
# TOML file, the environment or the default.
_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("mqtt_url", str, "broker URL, mqtt:// or mqtts://user:pass@host:port (env MQTT_URL)"),
    ("database_url", str, "PostgreSQL URL (env DATABASE_URL)"),
    ("client_id", str, "fixed MQTT client id (default: the login, else revline-consumer-<host>)"),
    ("group", str, "shared-subscription group: consumers in one group split the load"),
    ("session_expiry_s", int, "broker keeps our session this long while away (86400; group 60)"),
    ("receive_maximum", int, "unacked messages the broker may send us at once (1000)"),
    ("keepalive_s", int, "MQTT keepalive (30)"),
    ("max_inflight_mb", int, "memory bound: MiB held for received, unacked messages (64)"),
    ("ca_file", str, "CA bundle for mqtts://"),
    ("cert_file", str, "client certificate for mqtts://"),
    ("key_file", str, "client key for mqtts://"),
    ("batch_max_samples", int, "close a write batch at this many samples (20000)"),
    ("batch_max_age_ms", int, "... or when its first message is this old (200)"),
    ("max_future_s", float, "reject samples further ahead of our clock than this (300)"),
    ("max_age_s", float, "reject samples older than this, inside the raw retention (358 d)"),
    ("pool_size", int, "database connections (4)"),
    ("write_concurrency", int, "batches written at once, acked in order (2)"),
    ("statement_timeout_s", float, "database statement timeout (30)"),
    ("retry_initial_s", float, "first retry delay after a database error (0.2)"),
    ("retry_max_s", float, "longest retry delay (15)"),
    ("shutdown_timeout_s", float, "on SIGTERM, commit what is in hand within this (10)"),
    ("log_every_s", float, "summary log line interval (10)"),
    (
        "maintenance_every_s",
        float,
        "plain PostgreSQL: partitions/retention/rollups pass every so often (300); 0: never",
    ),
    ("metrics_host", str, "address of /metrics and /healthz (0.0.0.0)"),
    ("metrics_port", int, "port of /metrics and /healthz; 0 disables (9108)"),
    ("audit_mqtt_url", str, "the audit's own broker login: status/, $SYS, cmd/ (docs/audit.md)"),
    ("audit_every_s", float, "audit pass: check, follow gaps, ask for repairs (30)"),
    ("repair_after_s", float, "ask a device for a gap open this long (120)"),
)


def register(commands: Commands) -> None:
    """Add ``revline consumer``."""
    parser = commands.add(
        commands.top,
        "consumer",
        "ingest telemetry from MQTT into the database (ack after commit)",
        run,
    )
    parser.add_argument("--config", type=Path, help="TOML file with settings")
    for key, kind, help_text in _FLAGS:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, help=help_text)



def run(args: argparse.Namespace) -> int:
    """Load settings (a bad value stops here with one line), then serve until SIGTERM/SIGINT."""
    flags = {key: getattr(args, key) for key, _, _ in _FLAGS}
    settings = load_settings(config=args.config, flags=flags)
    for warning in startup_warnings(settings):
        logging.getLogger("revline.consumer").warning(warning)
    from revline.consumer.service import serve  # noqa: PLC0415 - asyncpg, prometheus: not for --help

    return serve(settings)
