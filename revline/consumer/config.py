"""Settings of ``revline consumer``: one frozen object built from TOML, environment and flags."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

from revline.mqtt import parse_mqtt_url
from revline.settings import ConfigError, check_fields, load

__all__ = [
    "GROUP_SESSION_EXPIRY_S",
    "LONE_SESSION_EXPIRY_S",
    "ConsumerSettings",
    "load_settings",
    "startup_warnings",
    "worker_settings",
]

LONE_SESSION_EXPIRY_S: Final = 86_400
"""Session expiry of a consumer alone: the broker queues for it through a day away."""
GROUP_SESSION_EXPIRY_S: Final = 60
"""Session expiry of a group member. Mosquitto keeps handing an offline member its share of the
group's messages, so a member that died and was replaced under another client id swallows that
share into its saved session until the session expires; devices resend what it swallowed after
their ack timeout. Short, so that an orphan stops swallowing soon; long enough to ride out a
restart under the same id. See docs/consumer.md, "Running N consumers"."""

Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the consumer can be told; see ``docs/consumer.md`` for each key."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    client_id: str = ""
    """Fixed MQTT client id, so that a restart resumes the same persistent session. Default: the
    login's user name (what the shipped broker enforces anyway), else, alone,
    ``revline-consumer-<hostname>``; a group member needs one or the other."""
    group: str = ""
    """Shared-subscription group: several consumers with the same group split the load."""
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] | None = None
    """How long the broker keeps our session, and queues for it, while we are away. Default:
    ``LONE_SESSION_EXPIRY_S`` alone, ``GROUP_SESSION_EXPIRY_S`` in a group."""
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65_535)] = 20_000
    """Unacked QoS 1 messages the broker may have in flight to us: the backpressure bound in
    messages (``max_inflight_mb`` bounds the bytes). A write batch holds at most a third of it,
    so with small messages it sets the batch size: at 1,000 it was 333 messages a commit, and
    the per-vehicle work of a commit (hot-state row, end-to-end ack) was paid every ~3 samples
    of each car; 20,000 lets a batch fill to ``batch_max_samples``."""
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3_600)] = 30
    max_inflight_mb: Annotated[int, msgspec.Meta(ge=8, le=65_536)] = 64
    """Memory bound: MiB held for messages received and not yet acked (raw and decoded)."""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    batch_max_samples: Positive = 20_000
    batch_max_age_ms: Positive = 200
    max_future_s: Seconds = 300.0
    """A sample further ahead of our clock than this is rejected as ``future_timestamp``."""
    max_age_s: Seconds = 358 * 86_400.0
    """A sample older than this is rejected as ``too_old`` rather than acked and then deleted by
    retention. Keep it a week inside ``revline migrate --raw-retention`` (default 12 months, at
    least 365 days): a week covers a chunk or partition (1 day) and the retention job's period."""
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4
    write_concurrency: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    """Batches written at once (each in its own transaction); acks stay in arrival order."""
    statement_timeout_s: Seconds = 30.0
    retry_initial_s: Seconds = 0.2
    retry_max_s: Seconds = 15.0
    shutdown_timeout_s: Seconds = 10.0
    log_every_s: Seconds = 10.0
    maintenance_every_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    """Plain PostgreSQL: create partitions ahead, apply retention, refresh rollups this often
    (first pass at start; 0 disables, e.g. when a cron job runs
    ``python -m revline.storage.maintenance``). TimescaleDB's own jobs do this there, so the pass
    is a no-op."""
    insight_fold: bool = True
    """Fold trips, events and odometer (docs/insight.md) in this process, after its commits. Off:
    the writes still mark what to fold, and ``revline insight fold`` does it elsewhere."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes from another host
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 9108
    """Port of ``/metrics`` and ``/healthz``; 0 disables the endpoint."""
    audit: Literal["on", "off"] = "on"
    """Sequence accounting in every write (revline.audit, docs/audit.md); off only to measure
    what it costs."""
    audit_mqtt_url: str = ""
    """Login of the audit's own MQTT client (status/+, $SYS, cmd/+). Empty: the consumer's
    ``mqtt_url`` when it has no login; with a login (the shipped broker binds a client id to its
    login, and a second connection would take the consumer's over) the audit then keeps
    accounting only. ``revline device add revline-audit-1 --service`` makes one."""
    audit_every_s: Seconds = 30.0
    """The audit's pass: check stored runs, follow gaps, ask devices for repairs."""
    repair_after_s: Seconds = 120.0
    """A gap is asked for on cmd/<vin> once open this long (live-first backlogs fill holes)."""
    ack_qos: Annotated[int, msgspec.Meta(ge=0, le=1)] = 1
    """QoS of the end-to-end acks (``ack/<vin>``). 1: the broker keeps an ack for a device that
    went offline right after publishing, and the consumer's client resends it after a broker
    reconnect. 0: no PUBACK from the broker to handle per ack (with the consumer's own MQTT
    client a packet in and a lookup; paho's cost ~60 µs each); an ack lost on the way makes the
    device resend that batch after its ack timeout, written again idempotently and acked again:
    nothing is lost or doubled, it costs air time. Either way an ack is sent only after
    commit."""
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """Consumer processes run by this one command, members of ``group`` each with its own client
    id ``<client_id>-w<i>`` (and login ``<login>-w<i>`` when the URL has one): one core each,
    one metrics endpoint for all, restarted when one dies (:mod:`revline.consumer.workers`)."""

    def __post_init__(self) -> None:
        # Built directly or loaded, the same checks: every constraint above, then what involves
        # several keys. Readable TLS files are a fact about the machine, checked at start by
        # the service (Consumer.run), like the edge's.
        check_fields(self)
        login = parse_mqtt_url(self.mqtt_url).username
        if not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                "database_url", "", f"expected postgresql://..., got {self.database_url!r}"
            )
        if "/" in self.group or "+" in self.group or "#" in self.group:
            raise ConfigError("group", "", f"expected a name without / + #, got {self.group!r}")
        if self.group and not (self.client_id or login):
            raise ConfigError(
                "client_id",
                "",
                "a group member needs a stable client id: set client_id (e.g. revline-consumer-1) "
                "or log in with a user name, which is then the id",
            )
        if self.workers > 1 and not self.group:
            raise ConfigError(
                "workers",
                "",
                f"{self.workers} workers need a shared-subscription group (set group, e.g. "
                "revline): without one every worker would get every message",
            )
        if self.key_file and not self.cert_file:
            raise ConfigError("key_file", "", "set without cert_file")
        if self.retry_initial_s > self.retry_max_s:
            raise ConfigError("retry_initial_s", "", "expected at most retry_max_s")
        if self.audit_mqtt_url:
            parse_mqtt_url(self.audit_mqtt_url, key="audit_mqtt_url")

    @property
    def subscription(self) -> str:
        """``telemetry/+``, or ``$share/<group>/telemetry/+`` when a group is set."""
        return f"$share/{self.group}/telemetry/+" if self.group else "telemetry/+"

    @property
    def effective_client_id(self) -> str:
        """The configured client id, else the login, else ``revline-consumer-<hostname>``."""
        # A container's hostname changes when it is re-created: fine for a lone consumer (its
        # old session only queues copies until it expires), not for a group member (its old
        # session would swallow a share of the traffic), which __post_init__ refuses.
        login = parse_mqtt_url(self.mqtt_url).username
        return self.client_id or login or f"revline-consumer-{socket.gethostname()}"

    @property
    def effective_session_expiry_s(self) -> int:
        """The configured session expiry, else the default for a lone consumer or a member."""
        if self.session_expiry_s is not None:
            return self.session_expiry_s
        return GROUP_SESSION_EXPIRY_S if self.group else LONE_SESSION_EXPIRY_S


def worker_settings(settings: ConsumerSettings, index: int) -> ConsumerSettings:
    """The settings of worker ``index`` (1-based) of ``settings.workers``: its own client id
    ``<client_id>-w<index>`` and, when the broker URL has a login, its own login
    ``<login>-w<index>`` with the same password (a broker that makes the login the client id,
    like the shipped Mosquitto, would otherwise let the workers take each other over); no
    endpoint of its own (the supervisor serves one for all) and one worker; the audit's own
    broker login (``audit_mqtt_url``) in worker 1 only."""
    address = parse_mqtt_url(settings.mqtt_url)
    url = settings.mqtt_url
    if address.username:
        parts = urlsplit(url)
        login = quote(f"{address.username}-w{index}", safe="")
        secret = f":{quote(address.password, safe='')}" if address.password else ""
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{login}{secret}@{host}"))
    # The audit's own broker login (status/+, $SYS, repairs) in worker 1 only: a login is one
    # client id, which a second worker would take over; the others keep the accounting.
    audit_url = settings.audit_mqtt_url if index == 1 else ""
    return msgspec.structs.replace(
        settings,
        mqtt_url=url,
        client_id=f"{settings.effective_client_id}-w{index}",
        metrics_port=0,
        workers=1,
        audit_mqtt_url=audit_url,
    )


def load_settings(
    *,
    config: Path | None = None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConsumerSettings:
    """Defaults < TOML < ``MQTT_URL``/``DATABASE_URL`` < ``REVLINE_*`` < flags, checked by
    :class:`ConsumerSettings` itself."""
    # The conventional unprefixed names work too (revline.settings.PLAIN_ENV); the REVLINE_ ones
    # win if both are set.
    return load(ConsumerSettings, toml_path=config, environ=environ, flags=flags)


def startup_warnings(settings: ConsumerSettings) -> list[str]:
    """What an operator must know about these settings before trusting them, one line each."""
    warnings = []
    login = parse_mqtt_url(settings.mqtt_url).username
    if login and settings.client_id and settings.client_id != login:
        warnings.append(
            f"client_id {settings.client_id!r} is not the login {login!r}: a broker with "
            "use_username_as_clientid (the shipped one) uses the login as the id instead"
        )
    if settings.group:
        warnings.append(
            f"group member {settings.effective_client_id!r}: if this process dies for good, "
            "start its replacement with the same client id; under another id, the broker keeps "
            "handing this member's share of the group's messages to its saved session until it "
            f"expires after session_expiry_s={settings.effective_session_expiry_s} s, and the "
            "devices resend them after their ack timeout (docs/consumer.md, Running N consumers)"
        )
    return warnings
