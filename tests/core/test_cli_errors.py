"""Every command says a connection or permission failure in one line and exits non-zero.

Each command runs as a user runs it (``python -m revline.cli ...``, its own process) against real
services: a port nothing listens on, the shipped broker refusing a wrong password, the test
PostgreSQL refusing an unknown role, a path under a regular file, a taken port, a closed pipe.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_PIPE
from tests.fixtures.broker import ShippedBroker, shipped_broker
from tests.fixtures.services import PostgresService, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
VIN = "1HGCM82633A004352"


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any Revline setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MQTT_URL", "DATABASE_URL"} and not k.startswith("REVLINE_")
    }
    return env | extra


def _revline(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "revline.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=_env() if env is None else env,
    )


def _says_one_line(
    done: subprocess.CompletedProcess[str], code: int, command: str, *words: str
) -> None:
    """Exit ``code`` and exactly one line on stderr, from the command, with these words."""
    lines = done.stderr.splitlines()
    assert done.returncode == code, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"revline {command}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def broker() -> Iterator[ShippedBroker]:
    """The broker as shipped (logins required), with one consumer login."""
    with shipped_broker() as started:
        yield started


@pytest.fixture
def wrong_password(broker: ShippedBroker) -> str:
    """A URL of the shipped broker with a login it knows and a password it refuses."""
    return f"mqtt://revline-consumer-1:wrong@127.0.0.1:{broker.port}"


@pytest.fixture
def unknown_role(postgres: PostgresService) -> str:
    """A URL of the test PostgreSQL with a role it does not have."""
    return f"postgresql://no_such_role@{postgres.host}:{postgres.port}/postgres"


@pytest.fixture
def not_a_directory(tmp_path: Path) -> Path:
    """A regular file: a path under it can be neither read nor written, even by root."""
    path = tmp_path / "a-file"
    path.write_text("")
    return path


_CLOSED_BROKER = [
    ("tail", ["tail"], "connection refused"),
    ("simulate", ["simulate", "--seconds", "1"], "connection refused"),
    ("demo", ["demo"], "connection refused"),
    ("bench edge", ["bench", "edge", "--yes-really"], "connection refused"),
    ("bench consumer", ["bench", "consumer", "--yes-really"], "connection refused"),
]


@pytest.mark.parametrize(
    ("command", "argv", "words"), _CLOSED_BROKER, ids=[c[0] for c in _CLOSED_BROKER]
)
def test_a_closed_broker_port_is_one_line(command: str, argv: list[str], words: str) -> None:
    """Nothing listens on the broker's port: one line, exit 1 (the URL given by a flag)."""
    done = _revline(*argv, "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}")
    _says_one_line(done, EXIT_FAILURE, command, words)


def test_a_closed_broker_port_named_by_mqtt_url_in_the_environment_is_one_line() -> None:
    """The same through MQTT_URL, which every command honours."""
    done = _revline("tail", env=_env(MQTT_URL=f"mqtt://127.0.0.1:{free_port()}"))
    _says_one_line(done, EXIT_FAILURE, "tail", "connection refused")


_CLOSED_DATABASE = [
    ("migrate", ["migrate"], "database unreachable"),
    ("demo", ["demo"], "database unreachable"),
    ("bench storage", ["bench", "storage", "--yes-really"], "database unreachable"),
    ("roles", ["roles"], "ConnectionRefusedError"),
]


@pytest.mark.parametrize(
    ("command", "argv", "words"), _CLOSED_DATABASE, ids=[c[0] for c in _CLOSED_DATABASE]
)
def test_a_closed_database_port_is_one_line(command: str, argv: list[str], words: str) -> None:
    """Nothing listens on the database's port: one line, exit 1 (the URL in DATABASE_URL)."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    done = _revline(*argv, env=_env(DATABASE_URL=url))
    _says_one_line(done, EXIT_FAILURE, command, words)


_REFUSED_BROKER = [
    ("tail", ["tail"]),
    ("simulate", ["simulate", "--seconds", "1"]),
    ("demo", ["demo"]),
    ("bench edge", ["bench", "edge", "--yes-really"]),
    ("bench consumer", ["bench", "consumer", "--yes-really"]),
]


@pytest.mark.parametrize(("command", "argv"), _REFUSED_BROKER, ids=[c[0] for c in _REFUSED_BROKER])
def test_a_refused_broker_login_is_one_line(
    command: str, argv: list[str], wrong_password: str
) -> None:
    """The shipped broker refuses a wrong password: one line saying so, exit 1."""
    done = _revline(*argv, "--mqtt-url", wrong_password)
    _says_one_line(done, EXIT_FAILURE, command, "refused the connection")


_REFUSED_DATABASE = [
    ("migrate", ["migrate"]),
    ("demo", ["demo"]),
    ("bench storage", ["bench", "storage", "--yes-really"]),
    ("roles", ["roles"]),
]


@pytest.mark.parametrize(
    ("command", "argv"), _REFUSED_DATABASE, ids=[c[0] for c in _REFUSED_DATABASE]
)
def test_a_refused_database_login_is_one_line(
    command: str, argv: list[str], unknown_role: str
) -> None:
    """PostgreSQL refuses an unknown role: one line saying the login was refused, exit 1."""
    done = _revline(*argv, "--database-url", unknown_role)
    _says_one_line(done, EXIT_FAILURE, command, "no_such_role")


def test_the_consumer_stops_at_a_refused_database_login_with_one_line(unknown_role: str) -> None:
    """Waiting cannot cure a refused login: the consumer stops at start, one line."""
    done = _revline(
        "consumer",
        *("--database-url", unknown_role, "--metrics-port", "0", "--log-level", "warning"),
        *("--mqtt-url", f"mqtt://127.0.0.1:{free_port()}"),
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "login refused" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_the_edge_cannot_open_its_spool_one_line(not_a_directory: Path) -> None:
    """A spool path that cannot be created: one line naming it, exit 1 (the unit restarts)."""
    done = _revline(
        "edge",
        *("--vin", VIN, "--source", "sim", "--spool-path", str(not_a_directory / "spool.db")),
        *("--mqtt-url", f"mqtt://127.0.0.1:{free_port()}", "--log-level", "error"),
    )
    _says_one_line(done, EXIT_FAILURE, "edge", "spool", str(not_a_directory))


def test_edge_status_without_a_readable_spool_is_one_line(not_a_directory: Path) -> None:
    """`revline edge status` on a spool it cannot read: one line on stderr, exit 1."""
    done = _revline("edge", "status", "--spool-path", str(not_a_directory / "spool.db"))
    _says_one_line(done, EXIT_FAILURE, "edge status", str(not_a_directory))
    assert done.stdout == ""


def test_device_add_into_an_unwritable_place_is_one_line(not_a_directory: Path) -> None:
    """The password file cannot be written: one line, exit 1."""
    done = _revline("device", "add", VIN, "--passwd-file", str(not_a_directory / "passwd"))
    _says_one_line(done, EXIT_FAILURE, "device add", str(not_a_directory))


@pytest.mark.parametrize("command", ["tail", "simulate", "consumer"])
def test_an_unreadable_tls_file_is_a_config_error_naming_its_key(
    command: str, not_a_directory: Path
) -> None:
    """--ca-file that cannot be read: the config error line naming ca_file, exit 2."""
    done = _revline(
        command,
        *("--mqtt-url", f"mqtts://127.0.0.1:{free_port()}"),
        *("--ca-file", str(not_a_directory / "x")),
        *(["--metrics-port", "0", "--log-level", "warning"] if command == "consumer" else []),
    )
    _says_one_line(done, EXIT_CONFIG, command, "ca_file")


def test_a_taken_metrics_port_is_one_line() -> None:
    """Another process listens on the consumer's metrics port: one line naming the key, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _revline(
            "consumer",
            *("--metrics-host", "127.0.0.1", "--metrics-port", str(port), "--log-level", "warning"),
            *("--mqtt-url", f"mqtt://127.0.0.1:{free_port()}"),
            *("--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/x"),
        )
    _says_one_line(done, EXIT_CONFIG, "consumer", "metrics_port", str(port))


def _into_closed_pipe(*argv: str) -> tuple[int, str]:
    """Run with stdout a pipe whose reader has gone (`... | head -1` once head exited)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "revline.cli", *argv],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
    finally:
        os.close(writer)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def test_edge_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`revline edge status | head -1`: no traceback, exit 141 like a tool SIGPIPE stopped."""
    spool = tmp_path / "spool.db"
    _spool_of_a_short_run(spool)
    assert _into_closed_pipe("edge", "status", "--spool-path", str(spool)) == (EXIT_PIPE, "")


@pytest.mark.parametrize("argv", [["consumer", "--help"], ["--help"]], ids=["consumer", "top"])
def test_help_into_a_closed_pipe_says_nothing(argv: list[str]) -> None:
    """`revline consumer --help | head -1`: argparse gives up writing quietly; so do we."""
    code, err = _into_closed_pipe(*argv)
    assert err == ""
    assert code in {0, EXIT_PIPE}


def _spool_of_a_short_run(spool: Path) -> None:
    """Run the edge until its spool exists, then stop it (SIGTERM)."""
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "revline.cli", "edge", "--vin", VIN, "--source", "sim"),
            *("--spool-path", str(spool), "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}"),
            *("--log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=_env(),
    )
    try:
        wait_until(
            lambda: _revline("edge", "status", "--spool-path", str(spool)).returncode == 0,
            what="a spool that `revline edge status` reads",
            timeout=60,
            every=0.5,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize("service", ["consumer", "edge"])
def test_a_service_waits_out_a_closed_port_with_one_line_per_failure(
    service: str, tmp_path: Path
) -> None:
    """The services retry an outage instead of exiting: each failure is one log line (no
    traceback), and SIGTERM still stops them cleanly. The edge takes its broker from MQTT_URL
    (it used to ignore it and try 127.0.0.1:1883)."""
    closed = f"127.0.0.1:{free_port()}"
    argv = {
        "consumer": ["--metrics-port", "0"],
        "edge": ["--vin", VIN, "--source", "sim", "--spool-path", str(tmp_path / "spool.db")],
    }[service]
    if service == "consumer":
        # Waiting for a database that does not answer, it never gets to the broker.
        argv += ["--database-url", f"postgresql://postgres@{closed}/x"]
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "revline.cli", service, *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env=_env(MQTT_URL=f"mqtt://{closed}"),
        )
    try:
        wait_until(lambda: "retrying" in log.read_text(), what="a retry line", timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text
    if service == "edge":
        assert f"broker=mqtt://{closed}" in text
    log_line = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR) +[\w.]+: ")
    assert all(log_line.match(line) for line in text.splitlines()), text
