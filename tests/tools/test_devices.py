"""`revline device add`: logins in a private password file, consumer rights in the ACL.

What the broker then does with these files is in tests/stack/test_broker_security.py.
"""

from __future__ import annotations

import io
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path

from revline.cli import main

ROOT = Path(__file__).resolve().parents[2]
VIN = "1HGCM82633A004352"


def _add(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["device", "add", *args])
    return code, out.getvalue()


def test_the_password_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    """Nobody but its owner can read the hashes: the file is 0600, the directory made is 0700."""
    passwd = tmp_path / "secrets" / "passwd"
    code, out = _add(VIN, "--passwd-file", str(passwd))
    assert code == 0
    assert passwd.parent.stat().st_mode & 0o777 == 0o700
    assert passwd.stat().st_mode & 0o777 == 0o600
    assert passwd.read_text().startswith(f"{VIN}:")
    assert re.search(r"^password: \S{20,}$", out, re.MULTILINE)


def test_a_password_file_left_world_readable_is_tightened(tmp_path: Path) -> None:
    """Adding a login to a 0644 file (an older version's) leaves it 0600 with both logins."""
    passwd = tmp_path / "passwd"
    assert _add(VIN, "--passwd-file", str(passwd))[0] == 0
    passwd.chmod(0o644)
    assert _add("2HGCM82633A004353", "--passwd-file", str(passwd))[0] == 0
    assert passwd.stat().st_mode & 0o777 == 0o600
    assert [line.split(":")[0] for line in passwd.read_text().splitlines()] == [
        VIN,
        "2HGCM82633A004353",
    ]


def test_a_consumer_login_is_granted_its_rights_in_the_acl_once(tmp_path: Path) -> None:
    """--service appends the consumer's block to the ACL; doing it again changes nothing."""
    acl = Path(shutil.copy(ROOT / "broker" / "acl", tmp_path / "acl"))
    shipped = acl.read_text()
    passwd = tmp_path / "passwd"
    args = ["revline-consumer-2", "--service", "--passwd-file", str(passwd), "--acl-file", str(acl)]
    code, out = _add(*args)
    assert code == 0
    assert "granted revline-consumer-2" in out
    assert acl.read_text() == (
        shipped + "\nuser revline-consumer-2\ntopic read telemetry/+\ntopic write ack/+\n"
    )
    code, out = _add(*args)
    assert code == 0
    assert "already lists revline-consumer-2" in out
    assert acl.read_text().count("user revline-consumer-2") == 1


def test_the_compose_consumer_login_is_told_its_env_line(tmp_path: Path) -> None:
    """For revline-consumer-1, the output has the .env line that compose.yaml reads."""
    acl = Path(shutil.copy(ROOT / "broker" / "acl", tmp_path / "acl"))
    code, out = _add(
        "revline-consumer-1",
        "--service",
        *("--passwd-file", str(tmp_path / "passwd"), "--acl-file", str(acl)),
        *("--password", "p@ss word"),
    )
    assert code == 0
    assert "REVLINE_CONSUMER_MQTT_PASSWORD=p%40ss%20word\n" in out
    assert "mqtts://revline-consumer-1:p%40ss%20word@" in out


def test_device_add_refuses_a_bad_vin(tmp_path: Path) -> None:
    """A name that is not a VIN is refused unless it is declared a service."""
    passwd = tmp_path / "passwd"
    assert main(["device", "add", "1HGCM82633A00435O", "--passwd-file", str(passwd)]) == 2
    assert not passwd.exists()


def test_a_consumer_login_needs_an_acl_to_be_granted_in(tmp_path: Path) -> None:
    """--service with a missing ACL file is refused before the password file is touched."""
    passwd = tmp_path / "passwd"
    args = ["c1", "--service", "--passwd-file", str(passwd), "--acl-file", str(tmp_path / "no")]
    assert main(["device", "add", *args]) == 2
    assert not passwd.exists()


def test_device_add_takes_the_broker_as_mqtt_url_like_every_command(tmp_path: Path) -> None:
    """`--mqtt-url mqtts://host:port` (as everywhere else) puts the new login into that URL;
    the older `--broker host:port` still works and means mqtts://."""
    passwd = tmp_path / "passwd"
    code, out = _add(VIN, "--passwd-file", str(passwd), "--password", "pw",
                     "--mqtt-url", "mqtts://mqtt.example.org:8883")  # fmt: skip
    assert code == 0
    assert f'mqtt_url = "mqtts://{VIN}:pw@mqtt.example.org:8883"' in out
    code, out = _add(VIN, "--passwd-file", str(passwd), "--password", "pw",
                     "--broker", "mqtt.example.org:8883")  # fmt: skip
    assert code == 0
    assert f'mqtt_url = "mqtts://{VIN}:pw@mqtt.example.org:8883"' in out
