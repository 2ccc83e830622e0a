"""Benchmarks write only into services of their own.

A benchmark publishes thousands of fake samples and writes fake vehicles: into a production broker
or database they would be stored, acked, shown on dashboards and counted as loss. So by default
each benchmark starts a private Mosquitto and PostgreSQL (revline/tools/localservices.py) and
throws them away; a broker or database named on the command line or in the environment
(``MQTT_URL``, ``DATABASE_URL``, ``REVLINE_*``) is refused unless ``--yes-really`` says it is a
scratch one. Only the standard library and the core here: the check runs before any import of
the benchmark itself.
"""

from __future__ import annotations

import msgspec

from revline.mqtt import parse_mqtt_url
from revline.settings import ConfigError, check_fields

__all__ = ["BenchSettings", "refusal"]


class BenchSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where a benchmark runs: services it starts itself unless told otherwise."""

    mqtt_url: str = ""
    """A scratch broker to use (needs --yes-really); empty: start a private Mosquitto."""
    database_url: str = ""
    """A scratch PostgreSQL to use (needs --yes-really); empty: start a private one."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mqtt_url:
            parse_mqtt_url(self.mqtt_url)
        if self.database_url and not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                "database_url", "", f"expected postgresql://..., got {self.database_url!r}"
            )


def refusal(settings: BenchSettings, *, uses: tuple[str, ...], yes_really: bool) -> str | None:
    """Why the benchmark must not run against these services (one line), or None.

    ``uses`` names the keys this benchmark writes through (``mqtt_url``, ``database_url``).
    """
    if yes_really:
        return None
    given = [key for key in uses if getattr(settings, key)]
    if not given:
        return None
    what = {"mqtt_url": "broker", "database_url": "database"}
    names = " and ".join(f"{what[key]} {_shown(key, getattr(settings, key))}" for key in given)
    return (
        f"refusing to write benchmark data into the {names}: a benchmark starts its own "
        "services unless told --yes-really that these are scratch ones (check --mqtt-url, "
        "--database-url, MQTT_URL, DATABASE_URL, REVLINE_MQTT_URL, REVLINE_DATABASE_URL)"
    )


def _shown(key: str, url: str) -> str:
    """A URL without its password."""
    if key == "mqtt_url":
        return str(parse_mqtt_url(url))
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, login = head.partition("://")
    return f"{scheme}://{login.split(':', 1)[0]}@{tail}"
