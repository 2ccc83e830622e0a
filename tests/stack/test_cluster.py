"""The `cluster` compose profile: a 2-node EMQX cluster with the shipped broker's rules, and one
consumer per node in one shared group. Validated offline (no Docker engine here): by
``docker-compose config -q`` and against the repository's own files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from revline.cli import build_parser
from revline.consumer.config import load_settings
from tests.fixtures.compose import example_env, load_compose

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ("emqx1", "emqx2", "consumer-emqx-1", "consumer-emqx-2")


def _compose() -> dict[str, Any]:
    return load_compose()


def _config(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary is not None, "docker-compose is needed: apt-get install docker-compose"
    return subprocess.run(
        [binary, "-f", str(ROOT / "compose.yaml"), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )


def test_compose_is_valid_with_and_without_the_cluster_profile(tmp_path: Path) -> None:
    """``docker-compose config -q`` accepts the file alone and with ``--profile cluster`` (with
    the .env `revline init` writes) and lists the cluster's services."""
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}={v}\n" for k, v in example_env().items()))
    for args in ((), ("--profile", "cluster")):
        result = _config(env, *args, "config", "-q")
        assert result.returncode == 0, result.stderr
    assert set(CLUSTER) <= set(_config(env, "config", "--services").stdout.split())


def test_the_cluster_is_only_started_when_its_profile_is_asked_for() -> None:
    """Every cluster service is in profile `cluster` and nothing else is: a plain `up` runs the
    single-broker stack as before."""
    services = _compose()["services"]
    for name, service in services.items():
        if name in CLUSTER:
            assert service.get("profiles") == ["cluster"], name
        else:
            assert "profiles" not in service, name


def test_each_emqx_node_is_pinned_healthchecked_and_configured_from_the_repository() -> None:
    """A pinned EMQX image (never `latest`), a healthcheck, a stable dotted node name that both
    nodes list as seeds, and config files that exist in the repository."""
    services = _compose()["services"]
    seeds = set()
    for name in ("emqx1", "emqx2"):
        node = services[name]
        assert re.fullmatch(r"emqx/emqx:\d+\.\d+\.\d+", node["image"]), node["image"]
        assert "emqx" in " ".join(node["healthcheck"]["test"])
        env = node["environment"]
        assert env["EMQX_NODE__NAME"] == f"emqx@{node['hostname']}"
        assert "." in node["hostname"]  # EMQX runs long node names: a host needs a dot
        assert node["hostname"] in node["networks"]["default"]["aliases"]
        seeds.add(env["EMQX_CLUSTER__STATIC__SEEDS"])
        assert env["EMQX_NODE__COOKIE"] == example_env()["REVLINE_EMQX_COOKIE"]
        for volume in node["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    (listed,) = seeds  # the same seed list on both nodes, naming both
    assert yaml.safe_load(listed) == [
        f"emqx@{services[n]['hostname']}" for n in ("emqx1", "emqx2")
    ]


def test_emqx_enforces_what_the_shipped_mosquitto_enforces() -> None:
    """Logins only, client id = login, no retained messages, the same packet limit, the ACL
    file and the logins file where the configuration says, deny what is not granted."""
    conf = (ROOT / "broker/emqx/emqx.conf").read_text()
    mosquitto = (ROOT / "broker/mosquitto.conf").read_text()
    packet = re.search(r"^max_packet_size (\d+)$", mosquitto, re.MULTILINE)
    assert packet is not None
    assert f"max_packet_size = {packet.group(1)}" in conf
    for line in (
        "use_username_as_clientid = true",
        "retain_available = false",
        "no_match = deny",
        "backend = built_in_database",
        "user_id_type = username",
    ):
        assert line in conf, line
    assert "allow_anonymous" not in conf  # EMQX refuses a client no authenticator accepts
    mounted = "/opt/emqx/etc/revline"  # ./broker, read-only, in both nodes
    acl_path = re.search(r'path = "([^"]+)"', conf)
    assert acl_path is not None
    assert acl_path.group(1).startswith(mounted)
    assert (ROOT / "broker" / acl_path.group(1).removeprefix(mounted + "/")).is_file()
    bootstrap = re.search(r'bootstrap_file = "([^"]+)"', conf)
    assert bootstrap is not None
    assert bootstrap.group(1) == f"{mounted}/secrets/emqx_users.csv"


def test_emqx_acl_grants_exactly_the_shipped_acl() -> None:
    """The same grants as broker/acl: a car writes only its telemetry and reads only its acks,
    consumer logins read all telemetry (also through a group) and write all acks, the rest is
    denied; no rule lets a car write an ack."""
    rules = [
        line
        for line in (ROOT / "broker/emqx/acl.conf").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("%%")
    ]
    text = " ".join(rules)
    statements = [s.strip() for s in text.split("}.") if s.strip()]
    assert statements[-1] == "{deny, all"
    car = [s for s in statements if s.startswith("{allow, all,")]
    assert sorted(car) == [
        '{allow, all, publish, ["telemetry/${username}"]',
        '{allow, all, subscribe, ["ack/${username}"]',
    ]
    consumer = [s for s in statements if "revline-consumer-" in s]
    assert any('publish, ["ack/+"]' in s for s in consumer)
    assert any('"telemetry/+", "$share/+/telemetry/+"' in s for s in consumer)
    acl = (ROOT / "broker/acl").read_text()
    assert "pattern write telemetry/%u" in acl
    assert "pattern read ack/%u" in acl
    assert not any("ack/" in s and "publish" in s and "allow, all" in s for s in statements)


def test_cluster_consumers_are_members_of_one_group_on_different_nodes() -> None:
    """Each cluster consumer runs a valid command in the same group with session expiry 0 (EMQX
    redispatches a gone member's messages), with its own login, on its own node."""
    services = _compose()["services"]
    parser = build_parser()
    nodes, logins = set(), set()
    for name in ("consumer-emqx-1", "consumer-emqx-2"):
        service = services[name]
        args = parser.parse_args(service["command"])
        assert callable(args.run)
        url = service["environment"]["MQTT_URL"]
        flags = {"group": args.group, "session_expiry_s": args.session_expiry_s}
        settings = load_settings(environ={"MQTT_URL": url}, flags=flags)
        assert settings.group == "revline"
        assert settings.effective_session_expiry_s == 0
        logins.add(settings.effective_client_id)
        nodes.add(url.rpartition("@")[2])
        assert service["image"] == services["migrate"]["image"]
        assert service["depends_on"][name.replace("consumer-emqx-", "emqx")] == {
            "condition": "service_healthy"
        }
    assert len(logins) == 2
    assert len(nodes) == 2
