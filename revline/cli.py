"""The ``revline`` command: one entry point, a subcommand per job.

This module only lists the parts; each part registers its own subcommands through a
``register(commands)`` function in a module that imports only the standard library and the core
at top level, so that ``revline --help``
works on a Pi without asyncpg and on a server without Bluetooth libraries. Heavy imports happen
inside each subcommand's ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from revline import __version__
from revline.logs import setup_logging
from revline.settings import ConfigError

__all__ = ["Commands", "main"]

Runner = Callable[[argparse.Namespace], int]

COMMAND_MODULES = (
    "revline.tools.cli",
    "revline.tools.devices",
    "revline.consumer.cli",
    "revline.storage.cli",
    "revline.insight.cli",
    "revline.edge.cli",
    "revline.bench.cli",
    "revline.api.cli",
)


_Group: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@dataclass(frozen=True)
class Commands:
    """Where each part adds its subcommands: at the top level, or in a named group such as
    ``bench ...`` or ``device ...`` that the first part to ask for it creates."""

    top: _Group
    _groups: dict[str, _Group] = field(default_factory=dict)

    def group(self, name: str, help_text: str) -> _Group:
        """The subcommands of ``revline <name> ...``, created on first use."""
        if name not in self._groups:
            parser = self.top.add_parser(name, help=help_text, description=help_text)
            self._groups[name] = parser.add_subparsers(dest=name, metavar="WHAT", required=True)
        return self._groups[name]

    def add(
        self,
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_text: str,
        run: Runner,
    ) -> argparse.ArgumentParser:
        """Add a subcommand whose ``run(args) -> exit code`` is called when it is chosen."""
        parser = group.add_parser(name, help=help_text, description=help_text)
        parser.set_defaults(run=run)
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every registered subcommand included."""
    parser = argparse.ArgumentParser(
        prog="revline",
        description="Revline: lossless car telemetry, Raspberry Pi -> MQTT -> TimescaleDB.",
    )
    parser.add_argument("--version", action="version", version=f"revline {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    commands = Commands(top=parser.add_subparsers(dest="command", metavar="COMMAND"))
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name + ".").startswith(exc.name + "."):
                raise
            continue  # a part this installation leaves out (the server image has no edge)
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, set up logging and run the chosen subcommand; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Runner | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    setup_logging(args.log_level, json=args.log_json)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"revline {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("revline").info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
