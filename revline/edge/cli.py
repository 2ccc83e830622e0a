"""``revline edge`` and ``revline edge status`` (stdlib-only imports)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from revline.edge.config import DEFAULT_SPOOL_PATH, ENV_PREFIX, EdgeSettings, load_edge_settings
from revline.logs import quiet_libraries
from revline.settings import ConfigError, add_flags, flag_values

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

# A flag for every EdgeSettings key (revline.settings.add_flags); this help where the struct's
# own docstring is not the best one-liner.
_HELP: dict[str, str] = {
    "vin": "vehicle identification number (17 characters, no I, O, Q)",
    "source": "where samples come from",
    "obd_port": "ELM327 serial port, e.g. /dev/rfcomm0; auto: python-OBD scans",
    "obd_baudrate": "ELM327 serial speed (unset: python-OBD probes)",
    "obd_fast_pids": "python-OBD commands read at fast_hz",
    "obd_slow_pids": "python-OBD commands read every slow_every_s",
    "obd_extra_pids": "other python-OBD commands, sent in `extra`",
    "fast_hz": "fast PIDs per second",
    "slow_every_s": "seconds between reads of the slow PIDs",
    "ble_name": "source ble: the adapter's advertised name",
    "ble_address": "source ble: the adapter's address",
    "gps": "GPS source",
    "gps_device": "gps nmea: serial device of the receiver",
    "gps_baudrate": "gps nmea: serial speed",
    "gpsd_host": "gps gpsd: host of gpsd",
    "gpsd_port": "gps gpsd: port of gpsd",
    "sim_hz": "source sim: samples per second",
    "sim_seed": "source sim: seed of the simulated drive",
    "sim_speedup": "source sim: simulated seconds per real second",
    "spool_path": "SQLite spool file",
    "flush_interval_s": "seconds between spool commits (a crash loses at most this)",
    "mqtt_url": "broker URL, mqtt://user:pass@host:port or mqtts://...",
    "ca_file": "CA bundle for mqtts:// (empty: the system's)",
    "cert_file": "client certificate for mqtts://, if the broker wants one",
    "key_file": "client key for mqtts://",
    "batch_max_samples": "samples per batch at most",
    "batch_max_age_s": "the live batch closes after this long even if small",
    "wire_version": "contract version sent: 1 (MessagePack samples) or 2 (columns)",
    "inflight_max": "messages published and not yet PUBACKed, at most",
    "unacked_max": "batches published and not yet acked end to end, at most",
    "ack_timeout_s": "resend a batch not acked end to end after this long",
    "keepalive_s": "MQTT keepalive",
    "session_expiry_s": "the broker keeps our session (and acks for us) this long",
    "reconnect_min_s": "first reconnect delay",
    "reconnect_max_s": "longest reconnect delay",
    "clock": "auto | trusted (board with an RTC) | untrusted (GPS time only)",
    "shutdown_timeout_s": "on SIGTERM, time to flush the spool and publish what is open",
}


def register(commands: Commands) -> None:
    """Add ``revline edge [status]``."""
    parser = commands.add(
        commands.top, "edge", "run the device publisher (or 'status': what the spool holds)", _run
    )
    parser.add_argument("action", nargs="?", default="run", choices=["run", "status"])
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML file (/etc/revline/edge.toml)"
    )
    add_flags(parser, EdgeSettings, env_prefix=ENV_PREFIX, help_text=_HELP)



def _run(args: argparse.Namespace) -> int:
    flags = flag_values(args, EdgeSettings)
    if args.action == "status":
        from revline.edge.status import format_status, read_status  # noqa: PLC0415

        # Status needs only the spool path: a config without a VIN still names it.
        spool_path = flags.get("spool_path")
        if spool_path is None:
            try:
                spool_path = load_edge_settings(args.config, flags=flags).spool_path
            except ConfigError:
                spool_path = DEFAULT_SPOOL_PATH
        try:
            print(format_status(read_status(str(spool_path))))
        except FileNotFoundError as exc:
            print(f"revline edge status: {exc}", file=sys.stderr)
            return 1
        return 0

    from revline.edge.service import StartError, run_edge  # noqa: PLC0415 - python-OBD, bleak...


    settings = load_edge_settings(args.config, flags=flags)
    if settings.source in {"obd", "ble"}:
        # Imported now rather than when the source starts: python-OBD gives itself a console
        # handler and a level when imported, and quiet_libraries() undoes that once.
        import obd  # noqa: F401, PLC0415
    quiet_libraries()
    try:
        asyncio.run(run_edge(settings))
    except StartError as exc:
        print(f"revline edge: {exc}", file=sys.stderr)
        return 1
    return 0
