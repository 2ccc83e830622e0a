"""MQTT connection settings shared by every Revline client: URL parsing, TLS, client creation."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from revline.settings import ConfigError

__all__ = ["BrokerAddress", "drop_session", "make_client", "parse_mqtt_url"]


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to reach the broker: ``mqtt://`` or ``mqtts://[user[:pass]@]host[:port]``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"  # never prints the password


def parse_mqtt_url(url: str, *, key: str = "mqtt_url") -> BrokerAddress:
    """Parse a broker URL; a malformed one is a ConfigError naming ``key``."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts", "tcp", "ssl"}:
        raise ConfigError(key, "", f"expected mqtt://host[:port] or mqtts://..., got {url!r}")
    tls = parts.scheme in {"mqtts", "ssl"}
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(key, "", f"expected a numeric port, got {url!r}") from exc
    if not parts.hostname:
        raise ConfigError(key, "", f"expected a host name, got {url!r}")
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def make_client(
    address: BrokerAddress,
    client_id: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    manual_ack: bool = False,
) -> paho.Client:
    """A paho client configured with credentials and TLS; not yet connected.

    MQTT 5 callers connect with ``clean_start=False`` and a session expiry so that QoS 1 messages
    queued while they were away are delivered when they come back; an MQTT 3.1.1 client gets the
    equivalent persistent session (``clean_session=False``) here, since 3.1.1 sets it per client.
    """
    if protocol == MQTTProtocolVersion.MQTTv5:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            manual_ack=manual_ack,
        )
    else:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=False,
            manual_ack=manual_ack,
        )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
        client.tls_set_context(context)
    return client


def drop_session(
    address: BrokerAddress, client_id: str, *, ca_file: str | None = None, timeout_s: float = 5.0
) -> None:
    """Make the broker forget ``client_id``'s persistent session and what it queued for it.

    A clean-start connect with a session expiry of 0, then a disconnect: used when a consumer
    (a benchmark's, a test's) is gone for good, so the broker stops queueing for it.
    """
    client = make_client(address, client_id, ca_file=ca_file)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect(address.host, address.port, clean_start=True, properties=props)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        client.disconnect()
    finally:
        client.loop_stop()
