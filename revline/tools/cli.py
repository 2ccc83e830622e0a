"""``revline demo``, ``revline simulate`` and ``revline tail``: the tools' subcommands.

Only the standard library and the core at top level, so that ``revline --help`` stays light on a Pi
and in the server image; each command imports its tool when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["DEMO_FLEET_SIZE", "register"]

DEMO_FLEET_SIZE: Final = 8
"""How many cars ``revline demo`` can drive: ``len(revline.tools.demo.DEMO_VINS)``."""


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
    parser.add_argument("--vehicles", type=int, default=3, choices=range(1, DEMO_FLEET_SIZE + 1))
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the cars drive")
    parser.add_argument(
        "--speedup", type=float, default=10.0, help="simulated seconds per real second"
    )
    parser.add_argument(
        "--no-chaos", dest="chaos", action="store_false", help="do not kill the broker mid-run"
    )
    parser.add_argument("--mqtt-url", help="use this broker instead of starting one")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of starting one")
    parser.add_argument(
        "--keep", action="store_true", help="keep everything running after the check (Ctrl-C)"
    )


def _register_simulate(commands: Commands) -> None:
    """Add ``revline simulate``."""
    parser = commands.add(
        commands.top, "simulate", "publish a fleet of simulated cars to a broker (load)", _simulate
    )
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker URL")
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
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker URL")
    parser.add_argument("--vin", default="+", help="one vehicle (default: all)")
    parser.add_argument("--samples", action="store_true", help="print every sample too")
    parser.add_argument("--count", type=int, default=0, help="exit after N messages (0: never)")


def _demo(args: argparse.Namespace) -> int:
    from revline.tools.demo import run  # noqa: PLC0415 - brings the edge, consumer and storage

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    from revline.tools.simulate import run  # noqa: PLC0415 - brings paho and the simulator

    return run(args)


def _tail(args: argparse.Namespace) -> int:
    from revline.tools.tail import run  # noqa: PLC0415 - brings paho

    return run(args)
