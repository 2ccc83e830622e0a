"""Settings of ``revline api``: one frozen object built from TOML, environment and flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from revline.contract import MAX_PAYLOAD_BYTES
from revline.settings import ConfigError, check_fields, load

__all__ = ["ENV_PREFIX", "ApiSettings", "load_settings"]

ENV_PREFIX: Final = "REVLINE_API_"
"""Environment variables of ``revline api``: ``REVLINE_API_<KEY>`` (and ``DATABASE_URL``)."""

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``revline api`` can be told; see ``docs/api.md`` for each key."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """Reads, keys and the live feed: the read-only role ``revline_api`` (sql/011_roles.sql)
    is enough."""
    ingest_database_url: str = ""
    """HTTP ingest writes as the consumer does (a login that may write); default: database_url."""
    host: str = "127.0.0.1"
    """Address to listen on. TLS is the reverse proxy's job (docs/api.md): listen on loopback or
    a private network behind it."""
    port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 8000
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    """Connections for reads (a streamed export holds one while it streams)."""
    ingest_pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4
    """Connections for HTTP ingest (the consumer's writer, its derivations included)."""
    statement_timeout_s: Seconds = 30.0
    """Per statement; an export's COPY is one statement, so this bounds one page's stream."""
    rate_per_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    """Requests a second per key on average (a key's own ``rate_per_s`` wins)."""
    burst: Annotated[int, msgspec.Meta(ge=1)] = 40
    """Requests a key may make at once (a key's own ``burst`` wins)."""
    key_cache_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """How long a checked key is believed without asking the database again. A revocation
    reaches running servers at once by NOTIFY; this bounds it if that connection is down."""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=MAX_PAYLOAD_BYTES)] = (
        MAX_PAYLOAD_BYTES
    )
    """Largest ingest body; a bigger one is refused (413) before it is read."""
    page_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    """Rows of a telemetry page when the caller sets no ``limit``."""
    max_page_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 1_000_000
    """Largest ``limit`` a caller may ask for."""
    max_bulk_vins: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1_000
    max_future_s: Seconds = 300.0
    """As the consumer's: a sample further ahead of our clock is refused (``future_timestamp``)."""
    max_age_s: Seconds = 358 * 86_400.0
    """As the consumer's: a sample older than this is refused (``too_old``)."""
    retry_after_s: Annotated[int, msgspec.Meta(ge=1, le=3_600)] = 5
    """``Retry-After`` of a 503 (database unavailable)."""
    heartbeat_s: Seconds = 15.0
    """Live streams send a comment this often, so proxies keep them open and a gone client is
    noticed."""
    docs: Literal["on", "off"] = "on"
    """Serve the OpenAPI document (``/schema/openapi.json``) and its page (``/schema``)."""

    @property
    def writer_url(self) -> str:
        """Where HTTP ingest writes."""
        return self.ingest_database_url or self.database_url

    def __post_init__(self) -> None:
        check_fields(self)
        for key in ("database_url", "ingest_database_url"):
            url = getattr(self, key)
            if (url or key == "database_url") and not url.startswith(
                ("postgres://", "postgresql://")
            ):
                raise ConfigError(key, "", f"expected postgresql://..., got {url!r}")
        if self.page_rows > self.max_page_rows:
            raise ConfigError("page_rows", "", "expected at most max_page_rows")


def load_settings(
    *,
    config: Path | None = None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ApiSettings:
    """Defaults < TOML < ``DATABASE_URL`` < ``REVLINE_API_*`` < flags."""
    return load(ApiSettings, toml_path=config, env_prefix=ENV_PREFIX, environ=environ, flags=flags)
