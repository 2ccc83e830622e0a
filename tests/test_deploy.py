"""The files a user deploys from: compose stack, Dockerfile, systemd unit, example config."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from revline.cli import build_parser
from revline.edge.config import load_edge_settings

ROOT = Path(__file__).parent.parent


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_commands_are_valid_revline_invocations() -> None:
    """Every service built from this repo runs a revline command the CLI accepts."""
    parser = build_parser()
    built = {
        n: s
        for n, s in _compose()["services"].items()
        if s.get("build") == {"context": ".", "dockerfile": "consumer/Dockerfile"}
    }
    assert set(built) >= {"migrate", "consumer"}
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
    """The consumer's URLs name the compose services, and the broker mounts our config."""
    services = _compose()["services"]
    env = services["consumer"]["environment"]
    assert env["MQTT_URL"].startswith("mqtt://mosquitto:")
    assert "@timescaledb:5432/" in env["DATABASE_URL"]
    assert any("broker/mosquitto.conf" in v for v in services["mosquitto"]["volumes"])


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
