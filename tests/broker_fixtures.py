"""The shipped broker (broker/mosquitto.conf, broker/acl, broker/start.sh) on a free local port.

``shipped_broker`` makes the logins with ``revline device add`` into a copy of ``broker/``, stages
them with ``broker/start.sh`` exactly as the compose stack does (the broker binary swapped for
``true``), and starts the local ``mosquitto`` with the options of ``broker/mosquitto.conf``: what
the tests check is what we ship, only its port, data directory and file paths are the test's.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from revline.cli import main
from revline.tools.devices import add_account
from tests.services import MosquittoService, mosquitto_config_lines

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "broker"
OBSERVER = "revline-test-observer"
"""A login the tests add to their copy of the ACL: it may read every topic, and write none."""


@dataclass
class ShippedBroker:
    """A started broker with the shipped configuration, and the passwords of its logins."""

    service: MosquittoService
    passwords: dict[str, str]
    staged: Path
    """Where broker/start.sh put the password file and ACL that the broker reads."""

    @property
    def port(self) -> int:
        """The broker's port on 127.0.0.1."""
        return self.service.port

    def url(self, login: str) -> str:
        """``mqtt://login:password@127.0.0.1:port``."""
        password = quote(self.passwords[login], safe="")
        return f"mqtt://{login}:{password}@127.0.0.1:{self.port}"

    def client(
        self,
        login: str | None,
        *,
        client_id: str = "",
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> MqttClient:
        """A connected client logged in as ``login`` (None: anonymous)."""
        return MqttClient(
            self.port,
            login,
            self.passwords[login] if login is not None else None,
            client_id=client_id,
            clean_start=clean_start,
            session_expiry_s=session_expiry_s,
        )


def _device_add(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["device", "add", *args]) == 0
    match = re.search(r"^password: (\S+)$", out.getvalue(), re.MULTILINE)
    assert match is not None, out.getvalue()
    return match.group(1)


def stage(source: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run broker/start.sh on ``source`` (a copy of broker/) into ``run_dir``, without a broker."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REVLINE_BROKER_DIR": str(source),
        "REVLINE_BROKER_RUN_DIR": str(run_dir),
        "REVLINE_MOSQUITTO": "true",  # stage only: `true -c mosquitto.conf` exits 0
    }
    return subprocess.run(
        ["sh", str(BROKER / "start.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


@contextlib.contextmanager
def shipped_broker(
    *,
    vehicles: Sequence[str] = (),
    consumers: Sequence[str] = ("revline-consumer-1",),
    replace: Mapping[str, str] | None = None,
) -> Iterator[ShippedBroker]:
    """A started broker as shipped, with these vehicle and consumer logins and ``OBSERVER``.

    ``replace``: shipped options to run with another value (e.g. a tiny ``max_queued_bytes``).
    """
    work = Path(tempfile.mkdtemp(prefix="revline-shipped-"))
    try:
        work.chmod(0o755)  # the broker drops root for `mosquitto`, which must reach run/
        source = work / "broker"
        source.mkdir()
        shutil.copy(BROKER / "acl", source / "acl")
        shutil.copy(BROKER / "mosquitto.conf", source / "mosquitto.conf")
        passwd = source / "secrets" / "passwd"
        passwords: dict[str, str] = {}
        common = ["--passwd-file", str(passwd), "--acl-file", str(source / "acl")]
        for name in consumers:
            passwords[name] = _device_add(name, "--service", *common)
        for vin in vehicles:
            passwords[vin] = _device_add(vin, *common)
        passwords[OBSERVER] = "observer-password"
        add_account(passwd, OBSERVER, passwords[OBSERVER])
        with (source / "acl").open("a") as acl:
            acl.write(f"\nuser {OBSERVER}\ntopic read #\n")
        run_dir = work / "run"
        staged = stage(source, run_dir)
        assert staged.returncode == 0, staged.stderr
        lines = mosquitto_config_lines(
            source / "mosquitto.conf",
            replace={
                **(replace or {}),
                "password_file": str(run_dir / "passwd"),
                "acl_file": str(run_dir / "acl"),
            },
        )
        with MosquittoService(extra_config=lines, use_docker=False) as service:
            yield ShippedBroker(service=service, passwords=passwords, staged=run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Received:
    """One message a client got."""

    topic: str
    payload: bytes
    retain: bool


@dataclass
class MqttClient:
    """A paho MQTT 5 client that records what happens to it: CONNACKs, disconnects, messages.

    ``clean_start=False`` with a ``session_expiry_s`` makes a persistent session, like the
    consumer's and the edge's. paho reconnects on its own after a drop; ``disconnects`` keeps
    every drop, so a takeover cannot hide behind the reconnect.
    """

    port: int
    user: str | None
    password: str | None
    client_id: str = ""
    clean_start: bool = True
    session_expiry_s: int = 0
    connacks: list[tuple[ReasonCode, bool]] = field(default_factory=list)
    disconnects: list[ReasonCode] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._granted: list[ReasonCode] = []
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
        )
        if self.user is not None:
            self.client.username_pw_set(self.user, self.password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        self.client.connect("127.0.0.1", self.port, clean_start=self.clean_start, properties=props)
        self.client.loop_start()
        assert self._connected.wait(10), "no CONNACK"

    def _on_connect(
        self, _c: object, _u: object, flags: paho.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        with self._lock:
            self.connacks.append((rc, flags.session_present))
        if rc.is_failure:
            self.client.disconnect()  # an anonymous retry loop would only spam the broker log
        self._connected.set()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        with self._lock:
            self.disconnects.append(rc)

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(
        self, _c: object, _u: object, _m: object, codes: list[ReasonCode], _p: object
    ) -> None:
        self._granted = codes
        self._subscribed.set()

    @property
    def refused(self) -> bool:
        """Whether the broker refused the connection."""
        return self.connacks[0][0].is_failure

    @property
    def session_present(self) -> bool:
        """The first CONNACK's session-present flag."""
        return self.connacks[0][1]

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe QoS 1 and wait for the SUBACK."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(10), f"no SUBACK for {topic}"
        return self._granted[0]

    def publish(
        self, topic: str, payload: bytes = b"{}", *, retain: bool = False, wait: bool = True
    ) -> None:
        """Publish QoS 1; by default wait until the broker has it (its PUBACK)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(10)
            assert info.is_published(), f"no PUBACK for {topic}"

    def topics(self) -> list[str]:
        """The topics of the messages received so far, in order."""
        with self._lock:
            return [m.topic for m in self.received]

    def payloads(self) -> list[bytes]:
        """The payloads received so far, in order."""
        with self._lock:
            return [m.payload for m in self.received]

    def close(self) -> None:
        """Disconnect (a persistent session stays on the broker) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
