"""``revline demo``, ``revline simulate`` and ``revline tail``: the tools' subcommands.

Only the standard library and the core at top level, so that ``revline --help`` stays light on a Pi
and in the server image; each command imports its tool when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final

import msgspec

from revline.mqtt import MqttClientSettings, parse_mqtt_url
from revline.settings import ConfigError, add_flags, check_fields

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["DEMO_FLEET_SIZE", "DemoSettings", "register"]

DEMO_FLEET_SIZE: Final = 8
"""How many cars ``revline demo`` can drive: ``len(revline.tools.demo.DEMO_VINS)``."""


class DemoSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where ``revline demo`` runs: its own broker and database unless told otherwise."""

    mqtt_url: str = ""
    """Use this broker instead of starting one."""
    database_url: str = ""
    """Use this PostgreSQL instead of starting one (it writes the demo cars into it)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mqtt_url:
            parse_mqtt_url(self.mqtt_url)
        if self.database_url and not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                "database_url", "", f"expected postgresql://..., got {self.database_url!r}"
            )


def register(commands: Commands) -> None:
    """Add ``revline demo``, ``revline simulate`` and ``revline tail``."""
    _register_demo(commands)
    _register_simulate(commands)
    _register_tail(commands)


def _register_demo(commands: Commands) -> None:
    """Add ``revline demo``."""
    parser = commands.add(
        commands.top,
        "demo",
        "run broker, database, consumer and simulated cars here; check nothing is lost",
        _demo,
    )
    parser.add_argument(
        "--vehicles",
        type=int,
        default=3,
        choices=range(1, DEMO_FLEET_SIZE + 1),
        help="how many simulated cars drive (default: 3)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the cars drive")
    parser.add_argument(
        "--speedup", type=float, default=10.0, help="simulated seconds per real second"
    )
    parser.add_argument(
        "--no-chaos", dest="chaos", action="store_false", help="do not kill the broker mid-run"
    )
    add_flags(parser, DemoSettings)
    parser.add_argument(
        "--keep", action="store_true", help="keep everything running after the check (Ctrl-C)"
    )


def _register_simulate(commands: Commands) -> None:
    """Add ``revline simulate``."""
    parser = commands.add(
        commands.top, "simulate", "publish a fleet of simulated cars to a broker (load)", _simulate
    )
    add_flags(parser, MqttClientSettings)
    parser.add_argument("--vehicles", type=int, default=10, help="how many cars")
    parser.add_argument("--hz", type=float, default=1.0, help="samples per second per car")
    parser.add_argument("--batch-s", type=float, default=1.0, help="seconds per batch")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this (0: never)")
    parser.add_argument("--seed", type=int, default=0, help="first simulator seed")


def _register_tail(commands: Commands) -> None:
    """Add ``revline tail``."""
    parser = commands.add(
        commands.top, "tail", "print telemetry batches and acks as they cross the broker", _tail
    )
    add_flags(parser, MqttClientSettings)
    parser.add_argument("--vin", default="+", help="one vehicle (default: all)")
    parser.add_argument("--samples", action="store_true", help="print every sample too")
    parser.add_argument("--count", type=int, default=0, help="exit after N messages (0: never)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per message (for jq); undecodable payloads in base64",
    )


def _demo(args: argparse.Namespace) -> int:
    from revline.tools.demo import run  # noqa: PLC0415 - brings the edge, consumer and storage

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    from revline.tools.simulate import run  # noqa: PLC0415 - brings paho and the simulator

    return run(args)


def _tail(args: argparse.Namespace) -> int:
    from revline.tools.tail import run  # noqa: PLC0415 - brings paho

    return run(args)
