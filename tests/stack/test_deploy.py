"""The files a user deploys from: compose stack, Dockerfile, systemd unit, example config."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from revline.cli import build_parser
from revline.edge.config import load_edge_settings
from revline.tools.devices import COMPOSE_CONSUMER_LOGIN, COMPOSE_PASSWORD_VARIABLE
from tests.fixtures.broker import stage
from tests.fixtures.compose import example_env, load_compose

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    return load_compose()


def test_compose_commands_are_valid_revline_invocations() -> None:
    """Every service running the image built from this repo runs a revline command the CLI
    accepts."""
    parser = build_parser()
    services = _compose()["services"]
    image = services["migrate"]["image"]
    assert services["migrate"]["build"] == {"context": ".", "dockerfile": "consumer/Dockerfile"}
    built = {n: s for n, s in services.items() if s.get("image") == image}
    assert set(built) >= {"migrate", "roles", "consumer", "broker-stats"}
    for service in built.values():
        args = parser.parse_args(service["command"])
        assert callable(args.run)


def test_compose_mounts_and_dockerfile_sources_exist() -> None:
    """Bind mounts in compose.yaml and COPY sources in the Dockerfile exist in the repo."""
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    for line in (ROOT / "consumer" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_consumer_in_compose_talks_to_the_compose_broker_and_database() -> None:
    """The consumer's URLs name the compose services, and the broker runs our start script."""
    services = _compose()["services"]
    env = services["consumer"]["environment"]
    assert urlsplit(env["MQTT_URL"]).hostname == "mosquitto"
    assert "@timescaledb:5432/" in env["DATABASE_URL"]
    assert "./broker:/revline/broker:ro" in services["mosquitto"]["volumes"]
    assert services["mosquitto"]["command"] == ["sh", "/revline/broker/start.sh"]


def _conf(name: str) -> str | None:
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    match = re.search(rf"^{name} (.+)$", conf, re.MULTILINE)
    return match.group(1) if match else None


def test_the_compose_broker_refuses_anonymous_clients_and_ties_client_ids_to_logins() -> None:
    """The shipped config: logins only, the ACL on, a client id is its login, no retained."""
    assert _conf("allow_anonymous") == "false"
    assert _conf("use_username_as_clientid") == "true"
    assert _conf("retain_available") == "false"
    # What start.sh stages (its default run directory) is what the broker reads.
    start = (ROOT / "broker" / "start.sh").read_text()
    match = re.search(r"^run=\$\{REVLINE_BROKER_RUN_DIR:-(\S+)\}$", start, re.MULTILINE)
    assert match is not None
    assert _conf("password_file") == f"{match.group(1)}/passwd"
    assert _conf("acl_file") == f"{match.group(1)}/acl"


def test_the_compose_consumer_logs_in_with_a_login_the_acl_grants() -> None:
    """compose's consumer uses the login `revline device add` prints the .env line for."""
    consumer = _compose()["services"]["consumer"]
    url = urlsplit(consumer["environment"]["MQTT_URL"])
    assert url.username == COMPOSE_CONSUMER_LOGIN
    assert url.password == example_env()[COMPOSE_PASSWORD_VARIABLE]
    acl = (ROOT / "broker" / "acl").read_text().splitlines()
    block = acl[acl.index(f"user {COMPOSE_CONSUMER_LOGIN}") :][:3]
    assert block[1:] == ["topic read telemetry/+", "topic write ack/+"]
    # The login is its client id: a re-created container resumes the same session.
    assert "--client-id" not in consumer["command"]


def test_the_broker_start_script_refuses_to_start_without_logins(tmp_path: Path) -> None:
    """No broker/secrets/passwd: one line saying how to create logins, and a failure exit."""
    source = tmp_path / "broker"
    source.mkdir()
    shutil.copy(ROOT / "broker" / "acl", source / "acl")
    result = stage(source, tmp_path / "run")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "revline device add" in result.stderr
    assert not (tmp_path / "run").exists()


def test_broker_secrets_are_ignored_by_git_and_docker() -> None:
    """The logins, TLS key, CA key and .env never reach a commit or an image."""
    assert "/broker/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "/ca/" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    for path in ("broker/secrets", "ca", ".env"):
        assert path in (ROOT / ".dockerignore").read_text().splitlines()


def test_systemd_unit_runs_a_valid_edge_command() -> None:
    """ExecStart of the unit is a `revline edge` invocation the CLI accepts."""
    unit = (ROOT / "edge" / "revline-edge.service").read_text()
    match = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.MULTILINE)
    assert match is not None
    assert match.group(1).endswith("/revline")
    args = build_parser().parse_args(shlex.split(match.group(2)))
    assert args.command == "edge"
    assert re.search(r"^Restart=always$", unit, re.MULTILINE)


def test_example_edge_config_loads() -> None:
    """edge/edge.toml.example is a valid configuration as shipped."""
    settings = load_edge_settings(ROOT / "edge" / "edge.toml.example", environ={})
    assert settings.vin == "1HGCM82633A004352"


def test_example_edge_config_logs_in_as_the_acl_expects_over_tls() -> None:
    """The example's login is its VIN (the ACL's %u), on the published TLS port, with the CA
    file `revline init` makes."""
    settings = load_edge_settings(ROOT / "edge" / "edge.toml.example", environ={})
    url = urlsplit(settings.mqtt_url)
    assert url.username == settings.vin
    assert (url.scheme, url.port) == ("mqtts", 8883)
    assert settings.ca_file.endswith("/ca.crt")
    acl = (ROOT / "broker" / "acl").read_text().splitlines()
    assert "pattern write telemetry/%u" in acl
    assert "pattern read ack/%u" in acl


def test_server_image_leaves_out_the_edge_and_its_cli_still_works() -> None:
    """The image deletes revline/edge before installing, and `revline` runs without that part."""
    dockerfile = (ROOT / "consumer" / "Dockerfile").read_text()
    assert re.search(r"rm -rf revline/edge revline/bench/edge\.py", dockerfile)
    blocker = (
        "import sys, importlib.abc\n"
        "class NoEdge(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'revline.edge' or name.startswith('revline.edge.'):\n"
        "            raise ModuleNotFoundError(name=name)\n"
        "sys.meta_path.insert(0, NoEdge())\n"
        "from revline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker, "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "consumer" in done.stdout
    assert "migrate" in done.stdout
    assert " edge " not in done.stdout
