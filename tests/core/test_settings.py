"""Settings are checked by their struct: built directly or loaded, the same one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from revline.consumer.config import ConsumerSettings
from revline.consumer.config import load_settings as load_consumer
from revline.edge.config import EdgeSettings, load_edge_settings
from revline.settings import ConfigError, load
from revline.storage.migrate import MigrateSettings
from revline.storage.migrate import load_settings as load_migrate

VIN = "1HGCM82633A004352"

Loader = Callable[[dict[str, object]], msgspec.Struct]
Builder = Callable[..., msgspec.Struct]


def _consumer(flags: dict[str, object]) -> msgspec.Struct:
    return load_consumer(environ={}, flags=flags)


def _migrate(flags: dict[str, object]) -> msgspec.Struct:
    return load_migrate(environ={}, flags=flags)


def _edge(flags: dict[str, object]) -> msgspec.Struct:
    return load_edge_settings(Path("/dev/null"), environ={}, flags={"vin": VIN, **flags})


def _edge_built(**values: object) -> msgspec.Struct:
    return EdgeSettings(vin=VIN, **values)  # type: ignore[arg-type]


_CROSS_FIELD = [
    (ConsumerSettings, _consumer, {"group": "g"}, "client_id"),
    (ConsumerSettings, _consumer, {"group": "a/b", "client_id": "c"}, "group"),
    (ConsumerSettings, _consumer, {"retry_initial_s": 20.0, "retry_max_s": 1.0}, "retry_initial_s"),
    (ConsumerSettings, _consumer, {"key_file": "k.pem"}, "key_file"),
    (ConsumerSettings, _consumer, {"database_url": "mysql://db/x"}, "database_url"),
    (ConsumerSettings, _consumer, {"mqtt_url": "http://broker"}, "mqtt_url"),
    (MigrateSettings, _migrate, {"database_url": "mysql://db/x"}, "database_url"),
    (_edge_built, _edge, {"reconnect_min_s": 9.0, "reconnect_max_s": 3.0}, "reconnect_max_s"),
    (_edge_built, _edge, {"source": "ble"}, "ble_name"),
    (_edge_built, _edge, {"mqtt_url": "mqtt://:1883"}, "mqtt_url"),
]


@pytest.mark.parametrize(("build", "loader", "values", "key"), _CROSS_FIELD)
def test_a_bad_combination_fails_the_same_whether_built_or_loaded(
    build: Builder, loader: Loader, values: dict[str, object], key: str
) -> None:
    """A check that involves several keys (or a whole URL) runs in the struct itself, so a
    settings object built directly raises the very line that loading the same values raises."""
    with pytest.raises(ConfigError) as built:
        build(**values)
    with pytest.raises(ConfigError) as loaded:
        loader(values)
    assert built.value.key == key
    assert str(built.value) == str(loaded.value)
    assert "\n" not in str(built.value)


_CONSTRAINTS = [
    (ConsumerSettings, "write_concurrency", 0, "expected int >= 1, got 0"),
    (ConsumerSettings, "receive_maximum", 70_000, "expected int <= 65535, got 70000"),
    (ConsumerSettings, "max_future_s", -1.0, "expected float > 0.0, got -1.0"),
    (ConsumerSettings, "session_expiry_s", -5, "expected int >= 0, got -5"),
    (
        MigrateSettings,
        "raw_retention",
        "soon",
        "expected an interval like '7 days' or '12 months' or 'forever', got 'soon'",
    ),
    (_edge_built, "ack_timeout_s", float("inf"), "expected float <= 86400.0, got inf"),
    (_edge_built, "obd_fast_pids", ["RPM", 7], "expected str, got ['RPM', 7]"),
]


@pytest.mark.parametrize(("build", "key", "value", "expected"), _CONSTRAINTS)
def test_a_value_outside_its_constraint_fails_when_built_directly(
    build: Builder, key: str, value: object, expected: str
) -> None:
    """msgspec checks Meta constraints only when it converts; the struct checks them on
    construction too, naming the key, in the words the loader uses."""
    with pytest.raises(ConfigError) as info:
        build(**{key: value})
    assert info.value.key == key
    assert str(info.value) == f"config error: {key}: {expected}"


def test_the_loader_names_the_source_of_a_value_outside_its_constraint() -> None:
    """Loaded, the same message also says where the value came from."""
    with pytest.raises(ConfigError) as info:
        load_migrate(environ={"REVLINE_RAW_RETENTION": "soon"})
    assert str(info.value) == (
        "config error: raw_retention (env REVLINE_RAW_RETENTION): expected an interval like "
        "'7 days' or '12 months' or 'forever', got 'soon'"
    )


def test_defaults_and_good_values_pass_both_ways() -> None:
    """Every settings struct builds from its defaults, and loading good values gives the same
    object as building it."""
    assert ConsumerSettings() == load_consumer(environ={})
    assert MigrateSettings() == load_migrate(environ={})
    member = {"group": "g", "client_id": "m1", "retry_initial_s": 1.0, "retry_max_s": 1.0}
    assert ConsumerSettings(**member) == load_consumer(environ={}, flags=member)  # type: ignore[arg-type]
    ble: dict[str, object] = {"source": "ble", "ble_name": "OBDII"}
    assert _edge_built(**ble) == _edge(ble)


def test_load_only_layers_sources() -> None:
    """A struct of one's own gets the same behaviour from ``load``: its ``__post_init__``
    error passes through unchanged, a constraint error gains the source."""

    class Pair(msgspec.Struct, frozen=True, kw_only=True):
        low: int = 1
        high: int = 2

        def __post_init__(self) -> None:
            if self.low > self.high:
                raise ConfigError("low", "", "expected at most high")

    assert load(Pair, environ={"REVLINE_LOW": "2"}) == Pair(low=2)
    with pytest.raises(ConfigError, match=r"^config error: low: expected at most high$"):
        load(Pair, environ={"REVLINE_LOW": "3"})
    with pytest.raises(ConfigError, match=r"^config error: high \(env REVLINE_HIGH\): expected"):
        load(Pair, environ={"REVLINE_HIGH": "many"})
