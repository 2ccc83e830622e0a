"""MQTT connection settings shared by every Revline client: URL parsing, TLS, client creation,
and saying in one line why a connection attempt failed."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from revline.settings import ConfigError, check_fields

__all__ = [
    "BrokerAddress",
    "Client",
    "ConnectError",
    "MqttClientSettings",
    "connect_blocking",
    "connect_error_reason",
    "connect_problem",
    "drop_session",
    "make_client",
    "parse_mqtt_url",
    "tls_context",
]


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


class Client(paho.Client):
    """paho's client, keeping why its last connection attempt failed in ``connect_error``.

    paho's network loop catches the ``OSError`` of a failed attempt (connection refused, host not
    found, TLS verification, timeout) and calls ``on_connect_fail(client, userdata)`` without it;
    that callback reads it from here.
    """

    connect_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        """paho's reconnect, remembering the error it raises."""
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.connect_error = exc
            raise
        self.connect_error = None
        return rc


def tls_context(
    *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A verifying TLS client context; a file that cannot be read or used is a ConfigError
    naming its key (``ca_file``, ``cert_file``, ``key_file``)."""
    for key, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(key, "", f"cannot read {path!r}: {exc.strerror or exc}") from exc
    if key_file and not cert_file:
        raise ConfigError("key_file", "", "set without cert_file")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError("ca_file", "", f"{ca_file!r} is not a PEM CA bundle ({exc})") from exc
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, ValueError) as exc:
            key = f" with key_file {key_file!r}" if key_file else ""
            raise ConfigError(
                "cert_file", "", f"{cert_file!r}{key} is not a PEM certificate and key ({exc})"
            ) from exc
    return context


def make_client(
    address: BrokerAddress,
    client_id: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    manual_ack: bool = False,
) -> Client:
    """A paho client configured with credentials and TLS; not yet connected.

    MQTT 5 callers connect with ``clean_start=False`` and a session expiry so that QoS 1 messages
    queued while they were away are delivered when they come back; an MQTT 3.1.1 client gets the
    equivalent persistent session (``clean_session=False``) here, since 3.1.1 sets it per client.
    A TLS file that cannot be used raises ConfigError naming its key.
    """
    if protocol == MQTTProtocolVersion.MQTTv5:
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            manual_ack=manual_ack,
        )
    else:
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=False,
            manual_ack=manual_ack,
        )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(
            tls_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        )
    return client


def connect_error_reason(exc: BaseException | None, address: BrokerAddress) -> str:
    """Why a connection attempt to ``address`` failed, in a few words an operator can act on."""
    where = f"{address.host}:{address.port}"
    if exc is None:
        reason = "connection failed (no reason given)"
    elif isinstance(exc, socket.gaierror):
        reason = f"cannot resolve host {address.host!r}: {exc.strerror or exc}"
    elif isinstance(exc, ConnectionRefusedError):
        reason = f"connection refused by {where}: nothing listens there"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"TLS certificate of {where} not trusted: {exc.verify_message or exc} (ca_file?)"
    elif isinstance(exc, ssl.SSLError):
        hint = " (a plain MQTT port? use mqtt://)" if "WRONG_VERSION" in str(exc) else ""
        reason = f"TLS handshake with {where} failed: {exc.reason or exc}{hint}"
    elif isinstance(exc, TimeoutError):
        reason = f"no answer from {where} (timed out)"
    elif isinstance(exc, OSError):
        reason = f"cannot connect to {where}: {exc.strerror or exc}"
    else:
        reason = f"cannot connect to {where}: {type(exc).__name__}: {exc}"
    return reason


class MqttClientSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a tool (``revline tail``, ``revline simulate``) reaches the broker: the same keys,
    flags and environment variables as the services' (``MQTT_URL``, ``REVLINE_CA_FILE``...)."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    """Broker URL, mqtt:// or mqtts://user:pass@host:port."""
    ca_file: str = ""
    """CA bundle for mqtts:// (empty: the system's)."""
    cert_file: str = ""
    """Client certificate for mqtts://, if the broker wants one."""
    key_file: str = ""
    """Client key for mqtts://."""

    def __post_init__(self) -> None:
        check_fields(self)
        parse_mqtt_url(self.mqtt_url)
        if self.key_file and not self.cert_file:
            raise ConfigError("key_file", "", "set without cert_file")

    @property
    def address(self) -> BrokerAddress:
        """The parsed ``mqtt_url``."""
        return parse_mqtt_url(self.mqtt_url)

    def client(self, client_id: str) -> Client:
        """A client for this broker with these TLS files (a bad file: ConfigError naming it)."""
        return make_client(
            self.address,
            client_id,
            ca_file=self.ca_file or None,
            cert_file=self.cert_file or None,
            key_file=self.key_file or None,
        )


class ConnectError(Exception):
    """A connection attempt failed or the broker refused us; the message is one line."""


def connect_blocking(client: Client, address: BrokerAddress, *, timeout_s: float = 10.0) -> None:
    """Connect and wait for the broker's answer (CONNACK); raise :class:`ConnectError` with one
    line saying why if the attempt fails (refused, unresolvable, TLS, timeout) or the broker
    refuses the login. For tools that have nothing to do without a broker; the services retry."""
    answer: list[str] = []

    def on_connect(_c: paho.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        answer.append("" if not getattr(rc, "is_failure", False) else str(rc))

    previous = client.on_connect
    client.on_connect = on_connect
    try:
        try:
            client.connect(address.host, address.port)
        except OSError as exc:
            raise ConnectError(connect_error_reason(exc, address)) from exc
        deadline = time.monotonic() + timeout_s
        while not answer:
            if time.monotonic() > deadline:
                raise ConnectError(connect_error_reason(TimeoutError(), address))
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS and not answer:
                raise ConnectError(f"{address.host}:{address.port} closed the connection")
    finally:
        client.on_connect = previous
    if answer[0]:
        raise ConnectError(f"broker {address} refused the connection: {answer[0]}")


def connect_problem(settings: MqttClientSettings, client_id: str) -> str | None:
    """Connect once and leave: None if the broker lets us in, else one line saying why (for
    tools that check a broker before they start work on it)."""
    client = settings.client(client_id)
    try:
        connect_blocking(client, settings.address)
    except ConnectError as exc:
        return str(exc)
    client.disconnect()
    return None


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
