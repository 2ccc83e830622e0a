"""compose.yaml checked offline: `docker-compose config` accepts it with the .env that `revline
init` writes and refuses it without one; images pinned; one image built; every long-running
service healthchecked and waited for; only the TLS broker port published beyond localhost; the
Python dependencies locked. (No Docker engine runs here: the stack is not started.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from revline.tools.init import write_env
from tests.fixtures.broker import ShippedBroker, shipped_broker
from tests.fixtures.compose import COMPOSE, ROOT, example_env, interpolate, load_compose
from tests.fixtures.services import MosquittoFactory, free_port

PINNED = re.compile(r"^[a-z0-9./_-]+:v?\d+\.\d+\.\d+(-[a-z0-9.]+)?$")
"""``name:1.2.3`` or ``name:v1.2.3-variant``: an exact version, never ``latest`` or a major."""


def _docker_compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose not found: apt-get install -y docker-compose (.ci/run does)"
    return subprocess.run(
        [tool, "-f", str(COMPOSE), "--project-directory", str(ROOT),
         "--env-file", str(env_file), *args],
        capture_output=True, text=True, check=False, timeout=60,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
    )  # fmt: skip


def test_docker_compose_accepts_the_stack_with_the_env_revline_init_writes(
    tmp_path: Path,
) -> None:
    """`docker-compose config -q` passes with a .env made from .env.example as `revline init`
    makes it, and names the first missing secret when there is no .env."""
    env = tmp_path / ".env"
    write_env(env, ROOT / ".env.example")
    done = _docker_compose("config", "-q", env_file=env)
    assert done.returncode == 0, done.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = _docker_compose("config", "-q", env_file=empty)
    assert refused.returncode != 0
    assert "revline init" in refused.stderr


def test_every_password_is_required_and_listed_in_the_env_example() -> None:
    """No secret has a default in compose.yaml; every variable it uses is in .env.example."""
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert used <= set(example_env()), used - set(example_env())
    for name in used:
        if name.endswith("PASSWORD"):
            assert re.search(rf"\$\{{{name}:\?", text), f"{name} is not required"
            assert not re.search(rf"\$\{{{name}:-", text), f"{name} has a default"
            env = example_env()
            del env[name]
            with pytest.raises(KeyError, match=name):
                interpolate(text, env)
    grafana = load_compose()["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == example_env()["GRAFANA_ADMIN_PASSWORD"]


def test_images_are_pinned_and_the_revline_image_is_built_once() -> None:
    """Every third-party image names an exact version; one service builds the Revline image and
    the others run it without pulling."""
    services = load_compose()["services"]
    builders = [name for name, s in services.items() if "build" in s]
    assert builders == ["migrate"]
    revline = services["migrate"]["image"]
    for name, service in services.items():
        if service["image"] == revline:
            assert name == "migrate" or service.get("pull_policy") == "never", name
        else:
            assert PINNED.match(service["image"]), f"{name}: {service['image']} is not pinned"
    assert {s["image"].split(":")[0] for s in services.values()} >= {
        "timescale/timescaledb", "eclipse-mosquitto", "grafana/grafana-oss", "prom/prometheus",
    }  # fmt: skip
    base = re.search(r"^FROM (\S+)$", (ROOT / "consumer" / "Dockerfile").read_text(), re.M)
    assert base is not None
    assert re.match(r"^python:3\.11\.\d+-slim-\w+$", base.group(1))


def test_every_long_running_service_is_healthchecked_and_waited_for() -> None:
    """A service that keeps running has a healthcheck; whoever depends on it waits for healthy,
    and on a one-shot service (migrate, roles) for its successful end."""
    services = load_compose()["services"]
    long_running = {name for name, s in services.items() if s.get("restart")}
    assert long_running >= {"timescaledb", "mosquitto", "consumer", "prometheus", "grafana"}
    for name in long_running:
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            wanted = (
                "service_healthy"
                if dependency in long_running
                else "service_completed_successfully"
            )
            assert how == {"condition": wanted}, f"{name} -> {dependency}"


def test_only_the_brokers_tls_port_is_published_beyond_localhost() -> None:
    """Mosquitto publishes 8883 (TLS) and not 1883; every other published port of the default
    stack is 127.0.0.1 (services behind a profile, such as a broker cluster, are opt-in)."""
    services = load_compose()["services"]
    published: dict[str, list[str]] = {
        n: s.get("ports", []) for n, s in services.items() if not s.get("profiles")
    }
    assert published["mosquitto"] == ["0.0.0.0:8883:8883"]
    for name, ports in published.items():
        for port in ports:
            assert not port.endswith(":1883"), f"{name} publishes plain MQTT"
            if name != "mosquitto":
                assert port.startswith("127.0.0.1:"), f"{name}: {port}"
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    assert re.findall(r"^listener (\d+)$", conf, re.M) == ["1883", "8883"]


def _health_command(service: str, port: int) -> str:
    test = load_compose()["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command: str = test[1]
    assert "-p 1883" in command
    return command.replace("-p 1883", f"-p {port}")


def test_the_brokers_healthcheck_passes_only_on_a_broker_that_refuses_anonymous_clients(
    make_mosquitto: MosquittoFactory,
) -> None:
    """compose's healthcheck for mosquitto: healthy on the shipped broker; unhealthy on an open
    (anonymous) broker and on a port where nothing listens."""
    broker: ShippedBroker
    with shipped_broker() as broker:
        healthy = subprocess.run(
            ["sh", "-c", _health_command("mosquitto", broker.port)], check=False, timeout=30
        )
    assert healthy.returncode == 0
    open_broker = make_mosquitto()
    for port in (open_broker.port, free_port()):
        unhealthy = subprocess.run(
            ["sh", "-c", _health_command("mosquitto", port)],
            check=False,
            timeout=30,
            capture_output=True,
        )
        assert unhealthy.returncode != 0, port


def test_prometheus_scrapes_the_services_on_their_metrics_ports() -> None:
    """Each scrape target is a compose service (or the future `api`) on the port it serves."""
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    services = load_compose()["services"]
    assert targets["revline-consumer"] == ["consumer:9108"]
    assert "127.0.0.1:9108:9108" in services["consumer"]["ports"]
    stats = services["broker-stats"]["command"]
    assert targets["revline-broker"] == [f"broker-stats:{stats[stats.index('--port') + 1]}"]
    assert targets["revline-api"] == ["api:8000"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_grafana_reads_the_database_as_the_read_only_role() -> None:
    """The provisioned data source logs in as revline_grafana with the password compose hands
    Grafana, which is the one the `roles` service sets."""
    sources = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "revline.yaml").read_text()
    )["datasources"]
    postgres = next(s for s in sources if s["uid"] == "revline")
    assert postgres["user"] == "revline_grafana"
    assert postgres["secureJsonData"]["password"] == "$REVLINE_GRAFANA_DB_PASSWORD"
    services = load_compose()["services"]
    given = services["grafana"]["environment"]["REVLINE_GRAFANA_DB_PASSWORD"]
    assert given == services["roles"]["environment"]["REVLINE_GRAFANA_DB_PASSWORD"]
    assert services["roles"]["command"] == ["roles"]
    mounts = services["grafana"]["volumes"]
    provider = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "revline.yaml").read_text()
    )["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_the_lock_pins_every_server_dependency_by_version_and_hash() -> None:
    """requirements.lock pins each dependency of `revline[consumer]` within its range, with
    hashes, and the Dockerfile installs only from it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(r)
        for r in [*project["dependencies"], *project["optional-dependencies"]["consumer"]]
    ]
    lock = (ROOT / "requirements.lock").read_text()
    pins = {
        canonicalize_name(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M)
    }
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} {requirement}"
    assert lock.count("--hash=sha256:") >= len(pins)
    dockerfile = (ROOT / "consumer" / "Dockerfile").read_text()
    assert "pip install --require-hashes --only-binary=:all: -r requirements.lock" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    assert "COPY requirements.lock ./" in dockerfile
