"""``revline consumer``: its flags and settings here; the service (asyncpg, prometheus) is imported
only when it runs, so that ``revline --help`` stays light."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from revline.consumer.config import ConsumerSettings, load_settings, startup_warnings
from revline.settings import add_flags, flag_values

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

# A flag for every ConsumerSettings key (revline.settings.add_flags), with this help; an unset
# flag (None) leaves the key to the TOML file, the environment or the default.
_HELP: dict[str, str] = {
    "mqtt_url": "broker URL, mqtt:// or mqtts://user:pass@host:port",
    "database_url": "PostgreSQL URL",
    "client_id": "fixed MQTT client id (default: the login, else revline-consumer-<host>)",
    "group": "shared-subscription group: consumers in one group split the load",
    "session_expiry_s": "broker keeps our session this long while away (unset: 86400; group 60)",
    "receive_maximum": "unacked messages the broker may send us at once",
    "keepalive_s": "MQTT keepalive",
    "max_inflight_mb": "memory bound: MiB held for received, unacked messages",
    "ca_file": "CA bundle for mqtts://",
    "cert_file": "client certificate for mqtts://",
    "key_file": "client key for mqtts://",
    "batch_max_samples": "close a write batch at this many samples",
    "batch_max_age_ms": "... or when its first message is this old",
    "max_future_s": "reject samples further ahead of our clock than this",
    "max_age_s": "reject samples older than this, inside the raw retention (358 d)",
    "pool_size": "database connections",
    "write_concurrency": "batches written at once, acked in order",
    "statement_timeout_s": "database statement timeout",
    "retry_initial_s": "first retry delay after a database error",
    "retry_max_s": "longest retry delay",
    "shutdown_timeout_s": "on SIGTERM, commit what is in hand within this",
    "log_every_s": "summary log line interval",
    "maintenance_every_s": "plain PostgreSQL: partitions/retention/rollups pass period; 0: never",
    "insight_fold": "fold trips/events/odometer here after commits (false: revline insight fold)",
    "metrics_host": "address of /metrics and /healthz",
    "metrics_port": "port of /metrics and /healthz; 0 disables",
}


def register(commands: Commands) -> None:
    """Add ``revline consumer``."""
    parser = commands.add(
        commands.top,
        "consumer",
        "ingest telemetry from MQTT into the database (ack after commit)",
        run,
    )
    parser.add_argument("--config", type=Path, help="TOML file with settings")
    add_flags(parser, ConsumerSettings, help_text=_HELP)



def run(args: argparse.Namespace) -> int:
    """Load settings (a bad value stops here with one line), then serve until SIGTERM/SIGINT."""
    flags = flag_values(args, ConsumerSettings)
    settings = load_settings(config=args.config, flags=flags)
    for warning in startup_warnings(settings):
        logging.getLogger("revline.consumer").warning(warning)
    from revline.consumer.service import serve  # noqa: PLC0415 - asyncpg, prometheus: not for --help

    return serve(settings)
