"""``revline device add``: per-device broker credentials (Mosquitto password file + ACL).

A vehicle logs in with its VIN as user name; ``broker/acl`` lets user ``%u`` publish only
``telemetry/%u`` and read only ``ack/%u``, so a stolen Pi cannot write as another car. Services
(the consumer) get named accounts that the ACL lists explicitly. Passwords are hashed by
``mosquitto_passwd`` (from the ``mosquitto`` package); the clear password is printed once.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from revline.contract import is_valid_vin

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["add_account", "register"]

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def register(commands: Commands) -> None:
    """Add ``revline device add``."""
    parser = commands.add(
        commands.group("device", "manage device credentials on the broker"),
        "add",
        "create or reset the broker login of a vehicle (user = VIN) or of a service",
        run,
    )
    parser.add_argument("name", help="the vehicle's VIN, or a service name with --service")
    parser.add_argument(
        "--service", action="store_true", help="a service account (e.g. revline-consumer)"
    )
    parser.add_argument(
        "--passwd-file", type=Path, default=Path("broker/passwd"), help="Mosquitto password file"
    )
    parser.add_argument("--password", help="use this password instead of a random one")
    parser.add_argument(
        "--broker", default="broker.example.com:8883", help="host:port printed in the URL"
    )


def add_account(passwd_file: Path, user: str, password: str) -> None:
    """Add or replace ``user`` in a Mosquitto password file (created if missing)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found: apt-get install -y mosquitto")
    passwd_file.parent.mkdir(parents=True, exist_ok=True)
    create = [] if passwd_file.exists() else ["-c"]
    # -b takes the password as an argument: fine for a one-shot local command, and it spares
    # us driving the interactive prompt.
    result = subprocess.run(
        [tool, *create, "-b", str(passwd_file), user, password],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mosquitto_passwd failed: {result.stderr.strip() or result.stdout}")


def run(args: argparse.Namespace) -> int:
    """Create the account and print how to use it."""
    name: str = args.name
    if args.service:
        if not _SERVICE_NAME.fullmatch(name):
            print(
                f"revline device add: {name!r} is not a service name ([A-Za-z0-9_.-])",
                file=sys.stderr,
            )
            return 2
    elif not is_valid_vin(name):
        print(
            f"revline device add: {name!r} is not a VIN (17 of 0-9 A-Z without I, O, Q); "
            "use --service for a service account",
            file=sys.stderr,
        )
        return 2
    password = args.password or secrets.token_urlsafe(18)
    try:
        add_account(args.passwd_file, name, password)
    except (OSError, RuntimeError) as exc:
        print(f"revline device add: {exc}", file=sys.stderr)
        return 1
    url = f"mqtts://{name}:{password}@{args.broker}"
    print(f"added {'service' if args.service else 'vehicle'} {name} to {args.passwd_file}")
    print(f"password: {password}")
    if args.service:
        print(f"consumer: revline consumer --mqtt-url '{url}'  (the ACL must list user {name})")
    else:
        print(f'edge.toml: mqtt_url = "{url}"')
    print("reload the broker to apply it: kill -HUP <pid of mosquitto>")
    print("  (with compose: docker compose kill -s HUP mosquitto)")
    return 0
