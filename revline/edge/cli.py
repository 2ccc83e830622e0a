"""``revline edge`` and ``revline edge status`` (stdlib-only imports)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from revline.edge.config import DEFAULT_SPOOL_PATH, load_edge_settings
from revline.settings import ConfigError

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]

# Flags that override the config file; every other key comes from TOML or REVLINE_EDGE_*.
_FLAGS = (
    ("--vin", str, "vehicle identification number"),
    ("--source", str, "sim | obd | ble"),
    ("--mqtt-url", str, "broker URL, mqtt://user:pass@host:port or mqtts://..."),
    ("--spool-path", str, "SQLite spool file"),
    ("--obd-port", str, "ELM327 serial port, e.g. /dev/rfcomm0"),
    ("--gps", str, "none | gpsd | nmea"),
    ("--sim-hz", float, "simulator samples per second"),
    ("--sim-speedup", float, "simulated seconds per real second"),
    ("--flush-interval-s", float, "seconds between spool commits"),
    ("--ack-timeout-s", float, "resend a batch not acked end to end after this long"),
    ("--clock", str, "auto | trusted | untrusted"),
    ("--wire-version", int, "contract version sent: 2 (columns, default) or 1 (for old consumers)"),
)


def register(commands: Commands) -> None:
    """Add ``revline edge [status]``."""
    parser = commands.add(
        commands.top, "edge", "run the device publisher (or 'status': what the spool holds)", _run
    )
    parser.add_argument("action", nargs="?", default="run", choices=["run", "status"])
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML file (/etc/revline/edge.toml)"
    )
    for flag, kind, help_text in _FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=help_text)



def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag, _, _ in _FLAGS
    }


def _run(args: argparse.Namespace) -> int:
    flags = _flags(args)
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
            print(f"revline edge status: {exc}")
            return 1
        return 0

    from revline.edge.service import StartError, run_edge  # noqa: PLC0415 - python-OBD, bleak...

    settings = load_edge_settings(args.config, flags=flags)
    try:
        asyncio.run(run_edge(settings))
    except StartError as exc:
        print(f"revline edge: {exc}", file=sys.stderr)
        return 1
    return 0
