"""``revline init`` and ``revline roles``: the first run of the server stack, and its database
roles' passwords.

``revline init`` (on the host, in the clone, before ``docker compose up``) makes what the stack
refuses to start without, and never overwrites what exists:

- a private CA (``ca/ca.key``, ``ca/ca.crt``: the key stays on the host, no container mounts it)
  and the broker's TLS certificate for your host names (``broker/secrets/tls/``: ``server.key``,
  ``server.crt``, ``ca.crt``), made with ``openssl``;
- the broker logins of compose's consumer (``revline-consumer-1``), of its audit client
  (``revline-audit-1``) and of ``broker-stats`` (``revline-monitor``) in
  ``broker/secrets/passwd``;
- ``.env`` with a generated secret for every empty one in ``.env.example`` (database, Grafana,
  consumer login), keeping any value already there.

Every private file is created mode 0600 (before anything is written to it) in a directory created
0700; all of them are git-ignored and docker-ignored.

``revline roles`` (compose's one-shot ``roles`` service, after ``revline migrate``) gives the
read-only database roles of ``sql/011_roles.sql`` their passwords from the environment
(``REVLINE_GRAFANA_DB_PASSWORD``, ``REVLINE_API_DB_PASSWORD``); a role without one cannot log in.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from revline.settings import env_value, environment
from revline.tools.brokerstats import MONITOR_LOGIN, MONITOR_PASSWORD_VARIABLE
from revline.tools.devices import (
    COMPOSE_CONSUMER_LOGIN,
    COMPOSE_PASSWORD_VARIABLE,
    DEFAULT_ACL_FILE,
    DEFAULT_PASSWD_FILE,
    add_account,
    grant_consumer,
    logins,
)

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = [
    "ROLE_PASSWORD_VARIABLES",
    "InitReport",
    "initialise",
    "issue_server_certificate",
    "make_ca",
    "register",
    "set_role_passwords",
    "write_env",
]

CA_DIR: Final = Path("ca")
TLS_DIR: Final = DEFAULT_PASSWD_FILE.parent / "tls"
ENV_FILE: Final = Path(".env")
ENV_EXAMPLE: Final = Path(".env.example")
CA_DAYS: Final = 3650
SERVER_DAYS: Final = 825
"""The most a publicly trusted server certificate may have; clients that check it accept it."""

AUDIT_LOGIN: Final = "revline-audit-1"
"""The consumer's audit client (status/, $SYS, cmd/: docs/audit.md): a login of its own,
because the broker ties a client id to its login and the telemetry client has the consumer's."""
AUDIT_PASSWORD_VARIABLE: Final = "REVLINE_AUDIT_MQTT_PASSWORD"  # noqa: S105 - a variable name

SERVICE_LOGINS: Final = {
    COMPOSE_CONSUMER_LOGIN: COMPOSE_PASSWORD_VARIABLE,
    AUDIT_LOGIN: AUDIT_PASSWORD_VARIABLE,
    MONITOR_LOGIN: MONITOR_PASSWORD_VARIABLE,
}
"""The broker logins of compose's services (broker/acl grants each) and their .env variables."""
ROLE_PASSWORD_VARIABLES: Final = {
    "revline_grafana": "REVLINE_GRAFANA_DB_PASSWORD",
    "revline_api": "REVLINE_API_DB_PASSWORD",
}
"""The login roles of sql/011_roles.sql (members of ``revline_reader``) and their variables."""

_SECRET_NAME = re.compile(r"(PASSWORD|SECRET|COOKIE)$")
_ENV_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+")

_CA_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = ca
prompt = no
[dn]
CN = Revline broker CA {tag}
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = {names}
"""


class InitError(Exception):
    """A first-run step that cannot be done; the message says what to do."""


def register(commands: Commands) -> None:
    """Add ``revline init`` and ``revline roles``."""
    parser = commands.add(
        commands.top,
        "init",
        "first run of the server stack: TLS certificates, the consumer's login, .env secrets",
        _run_init,
    )
    parser.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="a name (or IP address) devices use to reach the broker; repeat for more "
        "(default: this machine's name; localhost is always added)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(),
        help="the clone holding compose.yaml (default: the current directory)",
    )
    parser.add_argument(
        "--renew-server-cert",
        action="store_true",
        help="issue a new server certificate from the existing CA (new host names, expiry)",
    )
    roles = commands.add(
        commands.top,
        "roles",
        "give the read-only database roles their passwords from the environment "
        f"({', '.join(ROLE_PASSWORD_VARIABLES.values())})",
        _run_roles,
    )
    roles.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")


# --- files ------------------------------------------------------------------------------------


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (created 0700, tightened if found)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode is filtered by the umask
    return path


def write_private(path: Path, text: str) -> None:
    """Create ``path`` mode 0600 (it must not exist), then write ``text``: never readable by
    others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        raise InitError("openssl not found: apt-get install -y openssl")
    result = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise InitError(f"openssl {args[0]} failed: {lines[-1] if lines else result.returncode}")


# --- certificates -----------------------------------------------------------------------------


def _subject_alt_names(hostnames: Sequence[str]) -> str:
    names: list[str] = []
    for name in dict.fromkeys(hostnames):
        try:
            names.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            if not _HOSTNAME.fullmatch(name):
                what = f"--hostname {name!r} is neither a host name nor an IP address"
                raise InitError(what) from None
            names.append(f"DNS:{name}")
    return ", ".join(names)


def make_ca(ca_dir: Path, *, days: int = CA_DAYS) -> Path:
    """A new private CA in ``ca_dir`` (``ca.key`` 0600, ``ca.crt``); returns the certificate."""
    private_dir(ca_dir)
    key, crt = ca_dir / "ca.key", ca_dir / "ca.crt"
    if key.exists() or crt.exists():
        raise InitError(f"{ca_dir} already holds a CA; remove it to make a new one")
    # Made in a scratch directory and moved in at the end: a failure leaves no half CA behind.
    with tempfile.TemporaryDirectory(dir=ca_dir) as scratch:
        work = Path(scratch).resolve()
        (work / "ca.cnf").write_text(_CA_CONFIG.format(tag=secrets.token_hex(4)))
        write_private(work / "ca.key", "")  # 0600 before openssl writes the key into it
        _openssl("req", "-x509", "-config", "ca.cnf", "-newkey", "ec",
                 "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", str(days),
                 "-keyout", "ca.key", "-out", "ca.crt", cwd=work)  # fmt: skip
        (work / "ca.key").chmod(0o600)
        (work / "ca.crt").replace(crt)
        (work / "ca.key").replace(key)
    return crt


def issue_server_certificate(
    ca_dir: Path, tls_dir: Path, hostnames: Sequence[str], *, days: int = SERVER_DAYS
) -> Path:
    """A new server key and certificate for ``hostnames`` signed by the CA in ``ca_dir``, with
    the CA's certificate, into ``tls_dir`` (0700; the key 0600). Replaces what is there."""
    if not hostnames:
        raise InitError("the server certificate needs at least one host name")
    san = _subject_alt_names(hostnames)
    ca_key, ca_crt = ca_dir / "ca.key", ca_dir / "ca.crt"
    if not (ca_key.is_file() and ca_crt.is_file()):
        raise InitError(f"no CA in {ca_dir} (ca.key, ca.crt): run revline init without it first")
    private_dir(tls_dir)
    with tempfile.TemporaryDirectory(dir=tls_dir) as scratch:
        work = Path(scratch).resolve()
        (work / "server.ext").write_text(_SERVER_EXTENSIONS.format(names=san))
        write_private(work / "server.key", "")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-subj", f"/CN={hostnames[0]}", "-keyout", "server.key",
                 "-out", "server.csr", cwd=work)  # fmt: skip
        _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca_crt.resolve()),
                 "-CAkey", str(ca_key.resolve()), "-set_serial", f"0x{secrets.token_hex(16)}",
                 "-days", str(days), "-extfile", "server.ext", "-out", "server.crt",
                 cwd=work)  # fmt: skip
        for name in ("server.key", "server.crt"):
            (work / name).chmod(0o600)
            (work / name).replace(tls_dir / name)
    ca_copy = tls_dir / "ca.crt"
    ca_copy.unlink(missing_ok=True)
    write_private(ca_copy, ca_crt.read_text())
    return tls_dir / "server.crt"


# --- .env -------------------------------------------------------------------------------------


def read_env(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of an env file (comments and blank lines skipped)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def write_env(env_file: Path, example: Path, given: Mapping[str, str] | None = None) -> list[str]:
    """Fill ``env_file`` from ``example``: every variable it lacks is added, with the value in
    ``given``, else a new random secret for an empty ``*_PASSWORD``/``*_SECRET``/``*_COOKIE``,
    else the example's value. Values already in ``env_file`` are kept. Returns the names added.

    The file is created 0600, and tightened to 0600 when found looser.
    """
    wanted = read_env(example)
    if not env_file.exists():
        write_private(env_file, "# Made by `revline init` from .env.example; 0600, git-ignored.\n")
    env_file.chmod(0o600)
    have = read_env(env_file)
    added: list[str] = []
    lines: list[str] = []
    for name, value in wanted.items():
        if name in have:
            continue
        if given and name in given:
            value = given[name]  # noqa: PLW2901 - the value that goes into the file
        elif not value and _SECRET_NAME.search(name):
            value = secrets.token_urlsafe(24)  # noqa: PLW2901 - URL- and shell-safe characters
        lines.append(f"{name}={value}")
        added.append(name)
    if lines:
        text = env_file.read_text()
        with env_file.open("a") as out:
            out.write(("" if not text or text.endswith("\n") else "\n") + "\n".join(lines) + "\n")
    return added


# --- the first run ----------------------------------------------------------------------------


@dataclass
class InitReport:
    """What ``revline init`` made, and what it found already there."""

    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    hostnames: list[str] = field(default_factory=list)


def initialise(
    root: Path, hostnames: Sequence[str], *, renew_server_cert: bool = False
) -> InitReport:
    """Everything ``revline init`` does, in the clone at ``root``; idempotent."""
    report = InitReport()
    ca_dir, tls_dir = root / CA_DIR, root / TLS_DIR
    passwd, acl = root / DEFAULT_PASSWD_FILE, root / DEFAULT_ACL_FILE
    env_file, example = root / ENV_FILE, root / ENV_EXAMPLE
    if not example.is_file():
        raise InitError(f"no {example}: run revline init in the clone that holds compose.yaml")
    private_dir(passwd.parent)

    if (ca_dir / "ca.key").exists():
        report.kept.append(f"{ca_dir}/ca.key")
    else:
        make_ca(ca_dir)
        report.made.append(f"{ca_dir}/ca.key, ca.crt (private CA; the key never leaves this host)")
    names = [*hostnames, "localhost"]
    if renew_server_cert or not (tls_dir / "server.crt").exists():
        issue_server_certificate(ca_dir, tls_dir, names)
        report.hostnames = list(dict.fromkeys(names))
        report.made.append(f"{tls_dir}/server.key, server.crt, ca.crt")
    else:
        report.kept.append(f"{tls_dir}/server.crt")

    # The service logins (compose's consumer, the broker-stats monitor) and their .env lines
    # must agree: take whichever exists.
    env_now = read_env(env_file) if env_file.exists() else {}
    known = logins(passwd)
    given: dict[str, str] = {}
    for login, variable in SERVICE_LOGINS.items():
        password = env_now.get(variable) or secrets.token_urlsafe(24)
        given[variable] = password
        if login in known:
            report.kept.append(f"{passwd}: {login}")
            if variable not in env_now:
                raise InitError(
                    f"{passwd} has {login} but {env_file} has no {variable}: run "
                    f"`revline device rotate {login}` and put its password into {env_file}"
                )
            continue
        add_account(passwd, login, password)
        if login in (COMPOSE_CONSUMER_LOGIN, AUDIT_LOGIN):
            grant_consumer(acl, login)
        report.made.append(f"{passwd}: login {login}")
    added = write_env(env_file, example, given)
    if added:
        report.made.append(f"{env_file}: {', '.join(added)}")
    else:
        report.kept.append(f"{env_file}")
    return report


def _default_hostnames() -> list[str]:
    import socket  # noqa: PLC0415

    name = socket.getfqdn()
    return [name] if name and name != "localhost" else []


def _run_init(args: argparse.Namespace) -> int:
    root: Path = args.dir
    hostnames: list[str] = args.hostname or _default_hostnames()
    try:
        report = initialise(root, hostnames, renew_server_cert=args.renew_server_cert)
    except (InitError, OSError, RuntimeError) as exc:
        print(f"revline init: {exc}", file=sys.stderr)
        return 1
    for line in report.made:
        print(f"made: {line}")
    for line in report.kept:
        print(f"kept: {line}")
    if report.hostnames:
        print(f"broker certificate for: {', '.join(report.hostnames)}")
    tls = root / TLS_DIR
    print("next:")
    print("  revline device add <VIN> --mqtt-url mqtts://<host>:8883    # one login per car")
    print(f"  copy {tls / 'ca.crt'} to each car (ca_file in edge.toml)")
    print("  docker compose up -d")
    return 0


# --- database roles ---------------------------------------------------------------------------


async def set_role_passwords(dsn: str, passwords: Mapping[str, str | None]) -> dict[str, bool]:
    """Give each role its password (LOGIN), or take its login away when it has none (NOLOGIN).
    Returns role -> whether it may log in now. The roles must exist (``revline migrate``)."""
    import asyncpg  # noqa: PLC0415 - the server's dependency, loaded when the command runs

    connection = await asyncpg.connect(dsn)
    try:
        done: dict[str, bool] = {}
        for role, password in passwords.items():
            if not await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                raise InitError(f"database role {role} does not exist: run revline migrate first")
            # format(%I, %L) quotes on the server; ALTER ROLE takes no bind parameters.
            if password:
                sql = "SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)"
                statement = await connection.fetchval(sql, role, password)
            else:
                sql = "SELECT format('ALTER ROLE %I NOLOGIN PASSWORD NULL', $1::text)"
                statement = await connection.fetchval(sql, role)
            await connection.execute(statement)
            done[role] = bool(password)
        return done
    finally:
        await connection.close()


def _run_roles(args: argparse.Namespace) -> int:
    import asyncpg  # noqa: PLC0415

    from revline.storage.errors import describe  # noqa: PLC0415

    dsn = args.database_url or env_value("database_url")
    if not dsn:
        print("revline roles: database_url: not set (--database-url)", file=sys.stderr)
        return 2
    env = environment()
    passwords = {role: env.get(var) or None for role, var in ROLE_PASSWORD_VARIABLES.items()}
    try:
        done = asyncio.run(set_role_passwords(dsn, passwords))
    except InitError as exc:
        print(f"revline roles: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"revline roles: cannot set role passwords: {describe(exc)}", file=sys.stderr)
        return 1
    for role, can_login in done.items():
        variable = ROLE_PASSWORD_VARIABLES[role]
        state = "may log in" if can_login else f"cannot log in ({variable} is not set)"
        print(f"database role {role}: {state}")
    return 0
