"""``revline device add``: broker logins (Mosquitto password file + ACL).

A vehicle logs in with its VIN as user name; ``broker/acl`` lets user ``%u`` publish only
``telemetry/%u`` and read only ``ack/%u``, so a stolen Pi cannot write as another car, nor send
any ack. A consumer gets a login of its own (``--service``), which this command also grants in
the ACL: read ``telemetry/+``, write ``ack/+``. The shipped broker uses the login as the client id,
so each consumer process needs its own (``revline-consumer-1``, ``-2``, ...).

Passwords are hashed by ``mosquitto_passwd`` (from the ``mosquitto`` package); the clear password
is printed once. The password file holds hashes a guesser could attack offline: it is created
mode 0600 in a directory created 0700 (``broker/secrets/``, git-ignored), and kept 0600.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from revline.contract import is_valid_vin

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = [
    "COMPOSE_CONSUMER_LOGIN",
    "COMPOSE_PASSWORD_VARIABLE",
    "add_account",
    "grant_consumer",
    "register",
]

DEFAULT_PASSWD_FILE: Final = Path("broker/secrets/passwd")
DEFAULT_ACL_FILE: Final = Path("broker/acl")
COMPOSE_CONSUMER_LOGIN: Final = "revline-consumer-1"
"""The login of compose.yaml's consumer; its password comes from ``COMPOSE_PASSWORD_VARIABLE``."""
COMPOSE_PASSWORD_VARIABLE: Final = "REVLINE_CONSUMER_MQTT_PASSWORD"  # noqa: S105 - its name

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONSUMER_RULES: Final = (
    "topic read telemetry/+",
    "topic write ack/+",
    "topic read status/+",  # the audit (docs/audit.md): device statuses, repair requests, $SYS
    "topic write cmd/+",
    "topic read $SYS/#",
)


def register(commands: Commands) -> None:
    """Add ``revline device add``."""
    parser = commands.add(
        commands.group("device", "manage device credentials on the broker"),
        "add",
        "create or reset the broker login of a vehicle (user = VIN) or of a consumer",
        run,
    )
    parser.add_argument("name", help="the vehicle's VIN, or a consumer login with --service")
    parser.add_argument(
        "--service",
        action="store_true",
        help="a consumer login (e.g. revline-consumer-2): reads all telemetry, writes all acks",
    )
    parser.add_argument(
        "--passwd-file",
        type=Path,
        default=DEFAULT_PASSWD_FILE,
        help=f"Mosquitto password file, kept mode 0600 (default {DEFAULT_PASSWD_FILE})",
    )
    parser.add_argument(
        "--acl-file",
        type=Path,
        default=DEFAULT_ACL_FILE,
        help=f"Mosquitto ACL that --service adds the login to (default {DEFAULT_ACL_FILE})",
    )
    parser.add_argument("--password", help="use this password instead of a random one")
    parser.add_argument(
        "--broker", default="broker.example.com:8883", help="host:port printed in the URL"
    )


def add_account(passwd_file: Path, user: str, password: str) -> None:
    """Add or replace ``user`` in a Mosquitto password file, which ends up mode 0600.

    A missing file is created 0600 (and a missing directory 0700) before anything is written to
    it, so the hashes are never readable by others, not even for a moment.
    """
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found: apt-get install -y mosquitto")
    if not passwd_file.parent.is_dir():
        passwd_file.parent.mkdir(parents=True, mode=0o700)
        passwd_file.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    if not passwd_file.exists():
        os.close(os.open(passwd_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # mosquitto_passwd rewrites the file in place (its mode stays); a file that an older
    # version of this command left 0644 is tightened too.
    passwd_file.chmod(0o600)
    # -b takes the password as an argument: fine for a one-shot local command, and it spares
    # us driving the interactive prompt.
    result = subprocess.run(
        [tool, "-b", str(passwd_file), user, password],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mosquitto_passwd failed: {result.stderr.strip() or result.stdout}")


def grant_consumer(acl_file: Path, user: str) -> bool:
    """Give ``user`` the consumer's rights in a Mosquitto ACL file; False if it has a block."""
    text = acl_file.read_text()
    if any(line.split() == ["user", user] for line in text.splitlines()):
        return False
    block = "\n".join([f"user {user}", *_CONSUMER_RULES])
    # A blank line before the block; a file without a final newline gets one first.
    separator = "" if not text else "\n" if text.endswith("\n") else "\n\n"
    with acl_file.open("a") as out:
        out.write(f"{separator}{block}\n")
    return True


def _refuse(message: str) -> int:
    print(f"revline device add: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Create the account and print how to use it."""
    name: str = args.name
    passwd_file: Path = args.passwd_file
    acl_file: Path = args.acl_file
    if args.service:
        if not _SERVICE_NAME.fullmatch(name):
            return _refuse(f"{name!r} is not a login name ([A-Za-z0-9_.-], up to 64)")
        if is_valid_vin(name):
            return _refuse(f"{name!r} is a VIN: a consumer login must not be one")
        if not acl_file.is_file():
            return _refuse(f"no ACL file at {acl_file}: pass --acl-file")
    elif not is_valid_vin(name):
        return _refuse(
            f"{name!r} is not a VIN (17 of 0-9 A-Z without I, O, Q); "
            "use --service for a consumer login"
        )
    password = args.password or secrets.token_urlsafe(18)
    try:
        add_account(passwd_file, name, password)
        granted = grant_consumer(acl_file, name) if args.service else False
    except (OSError, RuntimeError) as exc:
        print(f"revline device add: {exc}", file=sys.stderr)
        return 1
    url = f"mqtts://{name}:{quote(password, safe='')}@{args.broker}"
    print(f"added {'consumer' if args.service else 'vehicle'} {name} to {passwd_file}")
    print(f"password: {password}")
    if args.service:
        rights = "read telemetry/+ status/+ $SYS/#, write ack/+ cmd/+"
        print(f"{acl_file}: {'granted' if granted else 'already lists'} {name} ({rights})")
        print(f"consumer: revline consumer --mqtt-url '{url}' --group revline")
        if name == COMPOSE_CONSUMER_LOGIN:
            # compose.yaml splices the variable into MQTT_URL: give it URL-quoted.
            value = quote(password, safe="")
            print(f"compose (.env next to compose.yaml): {COMPOSE_PASSWORD_VARIABLE}={value}")
    else:
        print(f'edge.toml: mqtt_url = "{url}"')
    print("apply it: docker compose restart mosquitto")
    print("  (a broker you run yourself: kill -HUP <pid of mosquitto>; it reads both files")
    print("  as the mosquitto user, so chown them to it, mode 0600)")
    return 0
