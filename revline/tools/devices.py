"""``revline device add|list|remove|rotate``: broker logins (Mosquitto password file + ACL).

A vehicle logs in with its VIN as user name; ``broker/acl`` lets user ``%u`` publish only
``telemetry/%u`` and read only ``ack/%u``, so a stolen Pi cannot write as another car, nor send
any ack. A consumer gets a login of its own (``--service``), which this command also grants in
the ACL: read ``telemetry/+``, write ``ack/+``. The shipped broker uses the login as the client id,
so each consumer process needs its own (``revline-consumer-1``, ``-2``, ...).

Passwords are hashed by ``mosquitto_passwd`` (from the ``mosquitto`` package); the clear password
is printed once. The password file holds hashes a guesser could attack offline: it is created
mode 0600 in a directory created 0700 (``broker/secrets/``, git-ignored), and kept 0600.

``list`` shows every login with what the ACL grants it; ``remove`` deletes a login (and a
consumer's ACL block); ``rotate`` gives an existing login a new password. The broker reads the
files at start: ``docker compose restart mosquitto`` applies a change (a removed login's open
connection ends then).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from revline.contract import is_valid_vin

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = [
    "COMPOSE_CONSUMER_LOGIN",
    "COMPOSE_PASSWORD_VARIABLE",
    "DEFAULT_ACL_FILE",
    "DEFAULT_PASSWD_FILE",
    "Login",
    "add_account",
    "grant_consumer",
    "list_logins",
    "logins",
    "register",
    "remove_account",
    "revoke",
]

DEFAULT_PASSWD_FILE: Final = Path("broker/secrets/passwd")
DEFAULT_ACL_FILE: Final = Path("broker/acl")
COMPOSE_CONSUMER_LOGIN: Final = "revline-consumer-1"
"""The login of compose.yaml's consumer; its password comes from ``COMPOSE_PASSWORD_VARIABLE``."""
COMPOSE_PASSWORD_VARIABLE: Final = "REVLINE_CONSUMER_MQTT_PASSWORD"  # noqa: S105 - its name

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONSUMER_RULES: Final = ("topic read telemetry/+", "topic write ack/+")
_CONSUMER_RULES_ACL: Final = tuple(" ".join(r.split()[1:]) for r in _CONSUMER_RULES)


def register(commands: Commands) -> None:
    """Add ``revline device add``, ``list``, ``remove`` and ``rotate``."""
    group = commands.group("device", "manage device credentials on the broker")
    add = commands.add(
        group,
        "add",
        "create or reset the broker login of a vehicle (user = VIN) or of a consumer",
        run,
    )
    add.add_argument("name", help="the vehicle's VIN, or a consumer login with --service")
    add.add_argument(
        "--service",
        action="store_true",
        help="a consumer login (e.g. revline-consumer-2): reads all telemetry, writes all acks",
    )
    _files(add)
    add.add_argument("--password", help="use this password instead of a random one")
    _broker(add)
    listing = commands.add(group, "list", "the broker's logins and what the ACL grants each", _list)
    _files(listing)
    remove = commands.add(
        group, "remove", "delete a login (and a consumer's ACL block): it is locked out", _remove
    )
    remove.add_argument("name", help="the login to delete (a VIN, or a consumer login)")
    _files(remove)
    rotate = commands.add(
        group, "rotate", "give an existing login a new password (the old one stops)", _rotate
    )
    rotate.add_argument("name", help="the login (a VIN, or a consumer login)")
    _files(rotate)
    rotate.add_argument("--password", help="use this password instead of a random one")
    _broker(rotate)


def _broker(parser: argparse.ArgumentParser) -> None:
    # --mqtt-url like every other command; --broker HOST:PORT still works (older docs).
    parser.add_argument(
        "--mqtt-url",
        "--broker",
        dest="broker",
        default="mqtts://broker.example.com:8883",
        metavar="MQTT_URL",
        help="the broker as the device reaches it, put in the printed URL with the login "
        "(default: mqtts://broker.example.com:8883)",
    )


def _files(parser: argparse.ArgumentParser) -> None:
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
        help=f"Mosquitto ACL of the consumer logins (default {DEFAULT_ACL_FILE})",
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


def logins(passwd_file: Path) -> list[str]:
    """The user names in a Mosquitto password file, in file order; none if it is missing."""
    if not passwd_file.exists():
        return []
    return [
        line.split(":", 1)[0]
        for line in passwd_file.read_text().splitlines()
        if ":" in line and not line.startswith("#")
    ]


def _acl_blocks(acl_file: Path) -> dict[str, list[str]]:
    """``user <name>`` -> its ``topic`` lines, from an ACL file."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in acl_file.read_text().splitlines() if acl_file.exists() else []:
        words = raw.split()
        if words[:1] == ["user"] and len(words) == 2:
            current = blocks.setdefault(words[1], [])
        elif words[:1] == ["topic"] and current is not None:
            current.append(" ".join(words[1:]))
        elif words[:1] == ["pattern"]:
            current = None  # patterns apply to everyone, whatever block they follow
    return blocks


@dataclass(frozen=True)
class Login:
    """One broker login and what the ACL lets it do."""

    name: str
    kind: str
    """``vehicle`` (a VIN: the ACL's patterns), ``consumer``/``other`` (its own ACL block)."""
    rights: tuple[str, ...]


def list_logins(passwd_file: Path, acl_file: Path) -> list[Login]:
    """Every login of the password file with its rights in the ACL."""
    blocks = _acl_blocks(acl_file)
    patterns = [
        " ".join(line.split()[1:])
        for line in (acl_file.read_text().splitlines() if acl_file.exists() else [])
        if line.split()[:1] == ["pattern"]
    ]
    found: list[Login] = []
    for name in logins(passwd_file):
        own = tuple(blocks.get(name, ()))
        if is_valid_vin(name):
            rights = tuple(p.replace("%u", name) for p in patterns) + own
            found.append(Login(name, "vehicle", rights))
        elif set(_CONSUMER_RULES_ACL) <= set(own):
            found.append(Login(name, "consumer", own))
        else:
            found.append(Login(name, "other", own))
    return found


def remove_account(passwd_file: Path, user: str) -> bool:
    """Delete ``user`` from a Mosquitto password file; False if it has no such login."""
    if user not in logins(passwd_file):
        return False
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found: apt-get install -y mosquitto")
    passwd_file.chmod(0o600)
    result = subprocess.run(
        [tool, "-D", str(passwd_file), user], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"mosquitto_passwd failed: {result.stderr.strip() or result.stdout}")
    return True


def revoke(acl_file: Path, user: str) -> bool:
    """Remove the ``user <name>`` block (its line and the ``topic`` lines after it) from an ACL
    file; False if it has none. Comments, patterns and other blocks stay as they are."""
    if not acl_file.exists():
        return False
    lines = acl_file.read_text().splitlines(keepends=True)
    kept: list[str] = []
    inside = found = False
    for line in lines:
        words = line.split()
        if words == ["user", user]:
            inside = found = True
            if kept and not kept[-1].strip():
                kept.pop()  # the blank line grant_consumer put before the block
            continue
        if inside and words[:1] == ["topic"]:
            continue
        inside = False
        kept.append(line)
    if found:
        acl_file.write_text("".join(kept))
    return found


def _refuse(command: str, message: str, code: int = 2) -> int:
    print(f"revline device {command}: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """``revline device add``: create the account and print how to use it."""
    name: str = args.name
    passwd_file: Path = args.passwd_file
    acl_file: Path = args.acl_file
    if args.service:
        if not _SERVICE_NAME.fullmatch(name):
            return _refuse("add", f"{name!r} is not a login name ([A-Za-z0-9_.-], up to 64)")
        if is_valid_vin(name):
            return _refuse("add", f"{name!r} is a VIN: a consumer login must not be one")
        if not acl_file.is_file():
            return _refuse("add", f"no ACL file at {acl_file}: pass --acl-file")
    elif not is_valid_vin(name):
        return _refuse(
            "add",
            f"{name!r} is not a VIN (17 of 0-9 A-Z without I, O, Q); "
            "use --service for a consumer login",
        )
    password = args.password or secrets.token_urlsafe(18)
    try:
        add_account(passwd_file, name, password)
        granted = grant_consumer(acl_file, name) if args.service else False
    except (OSError, RuntimeError) as exc:
        return _refuse("add", str(exc), 1)
    print(f"added {'consumer' if args.service else 'vehicle'} {name} to {passwd_file}")
    if args.service:
        rights = "read telemetry/+, write ack/+"
        print(f"{acl_file}: {'granted' if granted else 'already lists'} {name} ({rights})")
    _print_use(name, password, args.broker, service=args.service)
    return 0


def _print_use(name: str, password: str, broker: str, *, service: bool) -> None:
    scheme, _, where = broker.rpartition("://")
    where = where.rpartition("@")[2].rstrip("/")  # a login in the given URL is replaced
    url = f"{scheme or 'mqtts'}://{name}:{quote(password, safe='')}@{where}"
    print(f"password: {password}")
    if service:
        print(f"consumer: revline consumer --mqtt-url '{url}' --group revline")
        if name == COMPOSE_CONSUMER_LOGIN:
            # compose.yaml splices the variable into MQTT_URL: give it URL-quoted.
            value = quote(password, safe="")
            print(f"compose (.env next to compose.yaml): {COMPOSE_PASSWORD_VARIABLE}={value}")
    else:
        print(f'edge.toml: mqtt_url = "{url}"')
        print('edge.toml: ca_file = "/etc/revline/ca.crt"   # a copy of broker/secrets/tls/ca.crt')
    print("apply it: docker compose restart mosquitto")
    print("  (a broker you run yourself: kill -HUP <pid of mosquitto>; it reads both files")
    print("  as the mosquitto user, so chown them to it, mode 0600)")


def _list(args: argparse.Namespace) -> int:
    """``revline device list``: one line per login."""
    if not args.passwd_file.exists():
        return _refuse("list", f"no password file at {args.passwd_file}: run revline init", 1)
    found = list_logins(args.passwd_file, args.acl_file)
    width = max([len(login.name) for login in found] + [5])
    print(f"{'login':<{width}}  {'kind':<8}  rights (from {args.acl_file})")
    for login in found:
        rights = ", ".join(login.rights) or "none: connects, may do nothing"
        print(f"{login.name:<{width}}  {login.kind:<8}  {rights}")
    print(f"{len(found)} logins in {args.passwd_file}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    """``revline device remove``: delete the login and its ACL block."""
    try:
        removed = remove_account(args.passwd_file, args.name)
        revoked = revoke(args.acl_file, args.name)
    except (OSError, RuntimeError) as exc:
        return _refuse("remove", str(exc), 1)
    if not removed and not revoked:
        return _refuse("remove", f"no login {args.name!r} in {args.passwd_file}", 1)
    if removed:
        print(f"removed {args.name} from {args.passwd_file}")
    if revoked:
        print(f"removed the block of {args.name} from {args.acl_file}")
    print("apply it: docker compose restart mosquitto (its open connection ends then)")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """``revline device rotate``: a new password for an existing login."""
    name: str = args.name
    if name not in logins(args.passwd_file):
        missing = f"no login {name!r} in {args.passwd_file}: use revline device add"
        return _refuse("rotate", missing, 1)
    password = args.password or secrets.token_urlsafe(18)
    try:
        add_account(args.passwd_file, name, password)
    except (OSError, RuntimeError) as exc:
        return _refuse("rotate", str(exc), 1)
    print(f"new password for {name} in {args.passwd_file}")
    service = not is_valid_vin(name)
    _print_use(name, password, args.broker, service=service)
    return 0
