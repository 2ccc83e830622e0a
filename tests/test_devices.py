"""Per-device broker credentials: `revline device add` plus broker/acl on a real Mosquitto."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from revline.cli import main
from tests.services import MosquittoFactory

ACL = Path(__file__).parent.parent / "broker" / "acl"
OTHER_VIN = "2HGCM82633A004352"


def _add(capsys: pytest.CaptureFixture[str], passwd: Path, *args: str) -> str:
    assert main(["device", "add", *args, "--passwd-file", str(passwd)]) == 0
    match = re.search(r"^password: (\S+)$", capsys.readouterr().out, re.MULTILINE)
    assert match is not None
    return match.group(1)


class Client:
    """A connected paho MQTT 5 client that records what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.connected = threading.Event()
        self.reason: ReasonCode | None = None
        self.received: list[str] = []
        self.granted: list[ReasonCode] = []
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg.topic)
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.reason = rc
        self.connected.set()

    def _on_subscribe(
        self, _c: object, _u: object, _m: object, codes: list[ReasonCode], _p: object
    ) -> None:
        self.granted = codes
        self.subscribed.set()

    def subscribe(self, topic: str) -> ReasonCode:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)
        return self.granted[0]

    def publish(self, topic: str) -> None:
        self.client.publish(topic, b"{}", qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A directory the broker can read after dropping root for the ``mosquitto`` user."""
    path = Path(tempfile.mkdtemp(prefix="revline-auth-"))
    path.chmod(0o755)  # pytest's tmp_path is private to root
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_devices_are_confined_to_their_own_topics(
    broker_dir: Path,
    make_mosquitto: MosquittoFactory,
    unique_vin: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A vehicle publishes only its own telemetry and reads only its own acks; anonymous fails."""
    passwd = broker_dir / "passwd"
    car = _add(capsys, passwd, unique_vin)
    consumer = _add(capsys, passwd, "revline-consumer", "--service")
    passwd.chmod(0o644)
    acl = Path(shutil.copy(ACL, broker_dir / "acl"))
    broker = make_mosquitto(
        extra_config=["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
    )
    anonymous = Client(broker.port, None, None)
    wrong = Client(broker.port, unique_vin, "not-the-password")
    service = Client(broker.port, "revline-consumer", consumer)
    device = Client(broker.port, unique_vin, car)
    try:
        assert anonymous.reason is not None
        assert anonymous.reason.is_failure
        assert wrong.reason is not None
        assert wrong.reason.is_failure
        assert service.reason is not None
        assert not service.reason.is_failure
        assert device.reason is not None
        assert not device.reason.is_failure
        assert not service.subscribe("$share/revline/telemetry/+").is_failure
        assert not device.subscribe(f"ack/{unique_vin}").is_failure
        # Mosquitto grants any subscription but delivers only what the ACL lets the user read.
        device.subscribe(f"ack/{OTHER_VIN}")
        device.publish(f"telemetry/{OTHER_VIN}")  # refused by the ACL: never delivered
        device.publish(f"telemetry/{unique_vin}")
        service.publish(f"ack/{OTHER_VIN}")
        service.publish(f"ack/{unique_vin}")
        deadline = threading.Event()
        for _ in range(50):
            if service.received and device.received:
                break
            deadline.wait(0.1)
        deadline.wait(0.5)  # time for anything wrongly let through to arrive too
        assert service.received == [f"telemetry/{unique_vin}"]
        assert device.received == [f"ack/{unique_vin}"]
    finally:
        for client in (anonymous, wrong, service, device):
            client.close()


def test_device_add_refuses_a_bad_vin(tmp_path: Path) -> None:
    """A name that is not a VIN is refused unless it is declared a service."""
    passwd = tmp_path / "passwd"
    assert main(["device", "add", "1HGCM82633A00435O", "--passwd-file", str(passwd)]) == 2
    assert not passwd.exists()
