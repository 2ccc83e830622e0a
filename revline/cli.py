"""The ``revline`` command: one entry point, a subcommand per job.

This module only lists the parts; each part registers its own subcommands through a
``register(commands)`` function in a module that imports only the standard library and the core
at top level, so that ``revline --help``
works on a Pi without asyncpg and on a server without Bluetooth libraries. Heavy imports happen
inside each subcommand's ``run``.

The global options (``--log-level``, ``--log-json``) are accepted anywhere on the line:
``revline --log-level debug consumer`` and ``revline consumer --log-level debug`` are the same.

Exit codes, the same for every command (``edge/revline-edge.service`` relies on them):
0 done; 1 failed at run time (connection, permission, missing file); 2 configuration or usage
error (a bad key, flag or value: restarting cannot help); 130 interrupted; 141 stdout closed
(``revline edge status | head -1``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from revline import __version__
from revline.logs import setup_logging
from revline.settings import ConfigError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_PIPE",
    "Commands",
    "build_parser",
    "main",
]

EXIT_FAILURE: Final = 1
"""Failed at run time: a connection, a permission, a missing file; one line on stderr says why."""
EXIT_CONFIG: Final = 2
"""A configuration or usage error: one line names the key or flag. The systemd unit does not
restart on it (``RestartPreventExitStatus=2``)."""
EXIT_INTERRUPTED: Final = 130
EXIT_PIPE: Final = 141
"""Whoever read our output stopped reading (``| head``): quiet, like a tool killed by SIGPIPE."""

Runner = Callable[[argparse.Namespace], int]

COMMAND_MODULES = (
    "revline.tools.cli",
    "revline.tools.devices",
    "revline.tools.init",
    "revline.tools.brokerstats",
    "revline.consumer.cli",
    "revline.storage.cli",
    "revline.insight.cli",
    "revline.edge.cli",
    "revline.bench.cli",
    "revline.audit.cli",
    "revline.api.cli",
)


_Group: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _global_options(*, top: bool) -> argparse.ArgumentParser:
    """``--log-level`` and ``--log-json``, for the top-level parser and (as a parent) for every
    subcommand. A subcommand's copy has no default, so it changes the value only when given."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--log-level",
        default="info" if top else argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    options.add_argument(
        "--log-json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log one JSON object per line",
    )
    return options


_SUBCOMMAND_OPTIONS = _global_options(top=False)


@dataclass(frozen=True)
class Commands:
    """Where each part adds its subcommands: at the top level, or in a named group such as
    ``bench ...`` or ``device ...`` that the first part to ask for it creates."""

    top: _Group
    _groups: dict[str, _Group] = field(default_factory=dict)

    def group(self, name: str, help_text: str) -> _Group:
        """The subcommands of ``revline <name> ...``, created on first use."""
        if name not in self._groups:
            parser = self.top.add_parser(
                name, help=help_text, description=help_text, parents=[_SUBCOMMAND_OPTIONS]
            )
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
        parser = group.add_parser(
            name, help=help_text, description=help_text, parents=[_SUBCOMMAND_OPTIONS]
        )
        parser.set_defaults(run=run)
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every registered subcommand included."""
    parser = argparse.ArgumentParser(
        prog="revline",
        description="Revline: lossless car telemetry, Raspberry Pi -> MQTT -> TimescaleDB.",
        epilog="Exit codes: 0 done, 1 failed (connection, permission...), 2 configuration or "
        "usage error, 130 interrupted.",
        parents=[_global_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"revline {__version__}")
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
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `revline consumer --help | head -1`
        return _stdout_closed()
    run: Runner | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return EXIT_CONFIG
    setup_logging(args.log_level, json=args.log_json)
    return _run(run, args)


def _run(run: Runner, args: argparse.Namespace) -> int:
    """Run a subcommand; what it lets out becomes one line and an exit code, never a traceback."""
    name = _command_name(args)
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe fails here, not in Python's flush at exit
    except ConfigError as exc:
        print(f"revline {name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        logging.getLogger("revline").info("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _stdout_closed()
    except OSError as exc:
        # The last resort of "one line, not a traceback": a command that did not say more
        # about a refused connection or a path it may not write. Commands say it better.
        print(f"revline {name}: {_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    return code


def _command_name(args: argparse.Namespace) -> str:
    """``edge``, or ``bench storage`` for a command in a group."""
    command: str = args.command
    group = getattr(args, command, None)
    return f"{command} {group}" if isinstance(group, str) else command


def _os_error(exc: OSError) -> str:
    """``permission denied: /etc/x`` from an OSError, whatever it carries."""
    text = exc.strerror or str(exc) or type(exc).__name__
    text = text[:1].lower() + text[1:]
    if exc.filename is not None:
        text += f": {exc.filename}"
    return text


def _stdout_closed() -> int:
    """Whoever reads our output went away: no traceback, and none at exit either, when Python
    flushes stdout again (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
