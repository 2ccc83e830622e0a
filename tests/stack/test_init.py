"""`revline init` (the first run of the server stack) and `revline device list|remove|rotate`:
what they write, with which modes, and that a second run changes nothing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from revline.cli import main
from revline.tools.devices import COMPOSE_CONSUMER_LOGIN, list_logins, logins
from revline.tools.init import read_env

ROOT = Path(__file__).resolve().parents[2]
CAR = "1HGCM82633A004352"


def _clone(tmp_path: Path) -> Path:
    """The files of the clone that `revline init` and `revline device` work on."""
    root = tmp_path / "clone"
    (root / "broker").mkdir(parents=True)
    for name in ("acl", "mosquitto.conf"):
        shutil.copy(ROOT / "broker" / name, root / "broker" / name)
    shutil.copy(ROOT / ".env.example", root / ".env.example")
    return root


def _revline(*args: str, cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(before)
    return code, out.getvalue(), err.getvalue()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_makes_the_secrets_private_and_a_second_run_keeps_them(tmp_path: Path) -> None:
    """CA, TLS key and certificate, logins and .env are 0600 in 0700 directories; run again,
    nothing changes."""
    root = _clone(tmp_path)
    code, out, err = _revline("init", "--hostname", "mqtt.example.org", cwd=root)
    assert code == 0, err
    private = [
        "ca/ca.key",
        "broker/secrets/passwd",
        "broker/secrets/tls/server.key",
        "broker/secrets/tls/server.crt",
        "broker/secrets/tls/ca.crt",
        ".env",
    ]
    for name in private:
        assert _mode(root / name) == 0o600, name
    for name in ("ca", "broker/secrets", "broker/secrets/tls"):
        assert _mode(root / name) == 0o700, name
    env = read_env(root / ".env")
    for name, value in read_env(root / ".env.example").items():
        assert env[name], name  # every variable, every password generated
        if name.endswith("PASSWORD"):
            assert value == ""
            assert len(env[name]) >= 24
    assert set(logins(root / "broker/secrets/passwd")) == {
        COMPOSE_CONSUMER_LOGIN,
        "revline-monitor",
    }
    before = {name: (root / name).read_bytes() for name in private}
    code, out, _ = _revline("init", cwd=root)
    assert code == 0
    assert "made:" not in out
    assert {name: (root / name).read_bytes() for name in private} == before


def test_the_server_certificate_verifies_with_the_ca_for_the_given_names_only(
    tmp_path: Path,
) -> None:
    """server.crt chains to ca/ca.crt and names the given hosts and localhost; the CA key is
    outside broker/ (which compose mounts into the broker's container)."""
    root = _clone(tmp_path)
    assert _revline("init", "--hostname", "mqtt.example.org", "--hostname", "192.0.2.7",
                    cwd=root)[0] == 0  # fmt: skip
    tls = root / "broker/secrets/tls"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root / "ca/ca.crt"), str(tls / "server.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    names = subprocess.run(
        ["openssl", "x509", "-in", str(tls / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:mqtt.example.org" in names
    assert "IP Address:192.0.2.7" in names
    assert "DNS:localhost" in names
    assert (tls / "ca.crt").read_bytes() == (root / "ca/ca.crt").read_bytes()
    assert not list((root / "broker").rglob("ca.key"))
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    assert context.cert_store_stats()["x509_ca"] == 1


def test_renewing_the_server_certificate_keeps_the_ca(tmp_path: Path) -> None:
    """--renew-server-cert issues a new certificate for new names from the same CA."""
    root = _clone(tmp_path)
    assert _revline("init", "--hostname", "old.example.org", cwd=root)[0] == 0
    ca = (root / "ca/ca.crt").read_bytes()
    old = (root / "broker/secrets/tls/server.crt").read_bytes()
    code, out, _ = _revline(
        "init", "--hostname", "new.example.org", "--renew-server-cert", cwd=root
    )
    assert code == 0
    assert "new.example.org" in out
    assert (root / "ca/ca.crt").read_bytes() == ca
    assert (root / "broker/secrets/tls/server.crt").read_bytes() != old


def test_init_refuses_a_bad_host_name_in_one_line(tmp_path: Path) -> None:
    """A --hostname that is neither a name nor an address: one line, exit 1, no certificate."""
    root = _clone(tmp_path)
    code, _, err = _revline("init", "--hostname", "bad host/name", cwd=root)
    assert code == 1
    assert err.count("\n") == 1
    assert "--hostname 'bad host/name'" in err
    assert not (root / "broker/secrets/tls/server.crt").exists()


def test_init_keeps_env_values_and_tightens_a_loose_env(tmp_path: Path) -> None:
    """A .env already there keeps its values (the consumer's password becomes its login's), gets
    only the missing variables, and ends up 0600."""
    root = _clone(tmp_path)
    (root / ".env").write_text("REVLINE_DB_PASSWORD=mine\nREVLINE_CONSUMER_MQTT_PASSWORD=cons\n")
    (root / ".env").chmod(0o644)
    assert _revline("init", "--hostname", "localhost", cwd=root)[0] == 0
    env = read_env(root / ".env")
    assert env["REVLINE_DB_PASSWORD"] == "mine"
    assert env["REVLINE_CONSUMER_MQTT_PASSWORD"] == "cons"
    assert env["GRAFANA_ADMIN_PASSWORD"]
    assert _mode(root / ".env") == 0o600
    hashes = dict(
        line.split(":", 1) for line in (root / "broker/secrets/passwd").read_text().splitlines()
    )
    assert _mosquitto_hash_matches(hashes[COMPOSE_CONSUMER_LOGIN], "cons")
    assert not _mosquitto_hash_matches(hashes[COMPOSE_CONSUMER_LOGIN], "another")


def _mosquitto_hash_matches(entry: str, password: str) -> bool:
    """Whether a Mosquitto 2 password-file hash (``$7$iterations$salt$hash``, PBKDF2-SHA512)
    is ``password``'s."""
    _, kind, iterations, salt, digest = entry.split("$")
    assert kind == "7"
    derived = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(iterations)
    )
    return derived == base64.b64decode(digest)


def test_the_files_init_writes_are_ignored_by_git() -> None:
    """Every secret `revline init` and `revline device add` write is git-ignored in this repo."""
    paths = [
        ".env",
        "ca/ca.key",
        "ca/ca.crt",
        "broker/secrets/passwd",
        "broker/secrets/tls/server.key",
    ]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.stdout.split() == paths


def test_device_list_rotate_and_remove(tmp_path: Path) -> None:
    """list shows each login with its rights; rotate changes a password; remove deletes a car,
    and a consumer together with its ACL block."""
    root = _clone(tmp_path)
    assert _revline("init", "--hostname", "localhost", cwd=root)[0] == 0
    assert _revline("device", "add", CAR, cwd=root)[0] == 0
    assert _revline("device", "add", "revline-consumer-2", "--service", cwd=root)[0] == 0
    passwd, acl = root / "broker/secrets/passwd", root / "broker/acl"
    kinds = {login.name: login.kind for login in list_logins(passwd, acl)}
    assert kinds == {
        COMPOSE_CONSUMER_LOGIN: "consumer",
        "revline-monitor": "other",
        CAR: "vehicle",
        "revline-consumer-2": "consumer",
    }
    code, out, _ = _revline("device", "list", cwd=root)
    assert code == 0
    assert f"write telemetry/{CAR}, read ack/{CAR}" in out
    hashes = passwd.read_text()
    code, out, _ = _revline("device", "rotate", CAR, cwd=root)
    assert code == 0
    assert "password: " in out
    assert passwd.read_text() != hashes
    assert _mode(passwd) == 0o600
    assert _revline("device", "remove", CAR, cwd=root)[0] == 0
    assert _revline("device", "remove", "revline-consumer-2", cwd=root)[0] == 0
    assert set(logins(passwd)) == {COMPOSE_CONSUMER_LOGIN, "revline-monitor"}
    assert "user revline-consumer-2" not in acl.read_text()
    assert f"user {COMPOSE_CONSUMER_LOGIN}\ntopic read telemetry/+" in acl.read_text()
    code, _, err = _revline("device", "rotate", CAR, cwd=root)
    assert code == 1
    assert "no login" in err


@pytest.mark.parametrize("command", ["remove", "rotate"])
def test_device_commands_on_an_unknown_login_say_so_in_one_line(
    tmp_path: Path, command: str
) -> None:
    """remove/rotate of a login that does not exist: one line, exit 1."""
    root = _clone(tmp_path)
    assert _revline("init", "--hostname", "localhost", cwd=root)[0] == 0
    code, _, err = _revline("device", command, "2HGCM82633A004353", cwd=root)
    assert code == 1
    assert err.count("\n") == 1
