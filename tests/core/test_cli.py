"""One CLI, one convention: global options anywhere, a flag and an env var for every key."""

from __future__ import annotations

import argparse
import re
import tomllib
import typing
from pathlib import Path

import msgspec
import pytest

from revline.api.config import ApiSettings
from revline.bench.guard import BenchSettings
from revline.cli import EXIT_CONFIG, build_parser
from revline.consumer.config import ConsumerSettings
from revline.edge.config import ENV_PREFIX, EdgeSettings
from revline.mqtt import MqttClientSettings
from revline.settings import ConfigError, _unwrap, env_names, env_value, flag_values, load
from revline.storage.migrate import MigrateSettings
from revline.tools.cli import DemoSettings

ROOT = Path(__file__).resolve().parents[2]
VIN = "1HGCM82633A004352"

# (command line, settings struct, env prefix, the keys its flags set, what every load needs)
COMMANDS: list[tuple[list[str], type[msgspec.Struct], str, frozenset[str] | None]] = [
    (["edge"], EdgeSettings, ENV_PREFIX, None),
    (["consumer"], ConsumerSettings, "REVLINE_", None),
    (["migrate"], MigrateSettings, "REVLINE_", None),
    (["tail"], MqttClientSettings, "REVLINE_", None),
    (["simulate"], MqttClientSettings, "REVLINE_", None),
    (["demo"], DemoSettings, "REVLINE_", None),
    (["bench", "consumer"], BenchSettings, "REVLINE_", None),
    (["bench", "edge"], BenchSettings, "REVLINE_", frozenset({"mqtt_url"})),
    (["bench", "storage"], BenchSettings, "REVLINE_", frozenset({"database_url"})),
    (["bench", "api"], BenchSettings, "REVLINE_", frozenset({"database_url"})),
    (["api"], ApiSettings, "REVLINE_API_", None),
]
_IDS = [" ".join(command) for command, *_ in COMMANDS]

# Keys that are only valid together with another one.
_NEEDS: dict[str, dict[str, object]] = {
    "key_file": {"cert_file": "client.pem"},
    "group": {"client_id": "revline-consumer-1"},
    "workers": {"group": "revline", "client_id": "revline-consumer-1"},  # a --workers N > 1
    "transport": {"api_url": "https://api.example.org", "api_key": "rvl_x"},  # transport = http
}
_REQUIRED: dict[type[msgspec.Struct], dict[str, object]] = {EdgeSettings: {"vin": VIN}}


def _default(cls: type[msgspec.Struct], key: str) -> object:
    field = next(f for f in msgspec.structs.fields(cls) if f.name == key)
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return None if field.default is msgspec.NODEFAULT else field.default


def _candidates(cls: type[msgspec.Struct], key: str) -> list[str]:
    """Values as a user types them (strings), one of which is valid and not the default."""
    kind = _unwrap(next(f.type for f in msgspec.structs.fields(cls) if f.name == key))
    if typing.get_origin(kind) is typing.Literal:
        return [str(choice) for choice in typing.get_args(kind)]
    if typing.get_origin(kind) is list:
        return ["RPM,SPEED"]
    default = _default(cls, key)
    if kind is bool:
        return ["false", "true"]
    if kind is int or kind is float:
        base = default if isinstance(default, int | float) else 10
        return [str(kind(v)) for v in (base + 1, base - 1, 2, 38400)]
    if key == "vin":
        return ["WVWZZZ1JZXW000001"]
    if key.endswith("mqtt_url"):
        return ["mqtts://someone@broker.example.org:8883"]
    if key.endswith("database_url"):
        return ["postgresql://someone@db.example.org/revline"]
    return ["7 days", "3 months", "forever", "some-value"]


def _command_parser(command: list[str]) -> argparse.ArgumentParser:
    """The parser of ``revline <command...>``."""
    parser = build_parser()
    for name in command:
        choices = next(
            a.choices
            for a in parser._actions  # argparse keeps subcommands only here
            if isinstance(a, argparse._SubParsersAction)
        )
        parser = choices[name]
    return parser


def _help(command: list[str]) -> str:
    """The command's --help, words joined by single spaces (argparse wraps lines)."""
    return " ".join(_command_parser(command).format_help().split())


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["consumer", "--log-level", "debug"],
        ["--log-level", "debug", "consumer"],
        ["demo", "--vehicles", "2", "--log-level", "debug"],
        ["bench", "--log-level", "debug", "storage"],
        ["bench", "storage", "--log-level", "debug"],
        ["edge", "status", "--log-level", "debug"],
        ["--log-level", "error", "tail", "--log-level", "debug"],
    ],
)
def test_the_log_level_is_accepted_anywhere_on_the_line(argv: list[str]) -> None:
    """`revline consumer --log-level debug` works like `revline --log-level debug consumer`."""
    assert _parse(argv).log_level == "debug"


def test_global_options_keep_their_defaults_when_not_given() -> None:
    """A subcommand that is not told --log-level or --log-json leaves the defaults."""
    args = _parse(["tail", "--log-json"])
    assert (args.log_level, args.log_json) == ("info", True)
    args = _parse(["migrate"])
    assert (args.log_level, args.log_json) == ("info", False)


def test_the_demo_script_hands_its_arguments_to_the_demo_command() -> None:
    """`./scripts/demo --log-level warning` reaches `revline demo`, which takes it."""
    script = (ROOT / "scripts" / "demo").read_text()
    assert re.search(r'^exec \.venv/bin/revline demo "\$@"$', script, re.MULTILINE)
    assert _parse(["demo", "--log-level", "warning"]).log_level == "warning"


@pytest.mark.parametrize(("command", "cls", "prefix", "keys"), COMMANDS, ids=_IDS)
def test_every_settings_key_has_a_flag_that_reaches_it(
    command: list[str], cls: type[msgspec.Struct], prefix: str, keys: frozenset[str] | None
) -> None:
    """For every key: `--key-name VALUE` on the command's line sets that key when loaded."""
    del prefix
    wanted = keys if keys is not None else frozenset(cls.__struct_fields__)
    parser_keys = set()
    for key in sorted(wanted):
        for text in _candidates(cls, key):
            args = _parse([*command, f"--{key.replace('_', '-')}", text])
            parser_keys.add(key)
            flags = {**_REQUIRED.get(cls, {}), **_NEEDS.get(key, {})}
            flags |= {k: v for k, v in flag_values(args, cls).items() if v is not None}
            try:
                settings = load(cls, environ={}, flags=flags)
            except ConfigError:
                continue
            if getattr(settings, key) != _default(cls, key):
                break
        else:
            pytest.fail(f"--{key.replace('_', '-')} never changed {cls.__name__}.{key}")
    assert parser_keys == wanted


@pytest.mark.parametrize(("command", "cls", "prefix", "keys"), COMMANDS, ids=_IDS)
def test_every_settings_key_has_an_environment_variable_that_reaches_it(
    command: list[str], cls: type[msgspec.Struct], prefix: str, keys: frozenset[str] | None
) -> None:
    """For every key, each of its variables (PREFIX_KEY, and MQTT_URL/DATABASE_URL) sets it,
    and the command's --help names them."""
    help_text = _help(command)
    for key in sorted(keys if keys is not None else cls.__struct_fields__):
        names = env_names(cls, prefix)[key]
        assert names[0] == prefix + key.upper()
        for var in names:
            for text in _candidates(cls, key):
                flags = {**_REQUIRED.get(cls, {}), **_NEEDS.get(key, {})}
                try:
                    settings = load(cls, env_prefix=prefix, environ={var: text}, flags=flags)
                except ConfigError:
                    continue
                if getattr(settings, key) != _default(cls, key):
                    break
            else:
                pytest.fail(f"{var} never changed {cls.__name__}.{key}")
            assert var in help_text, f"{' '.join(command)} --help does not name {var}"


def test_the_prefixed_variable_wins_over_the_plain_one() -> None:
    """MQTT_URL sets mqtt_url for every command; REVLINE_..._MQTT_URL, when set too, wins."""
    plain = {"MQTT_URL": "mqtt://plain:1883"}
    edge = load(EdgeSettings, env_prefix=ENV_PREFIX, environ=plain, flags={"vin": VIN})
    assert edge.mqtt_url == "mqtt://plain:1883"
    both = {**plain, "REVLINE_EDGE_MQTT_URL": "mqtt://prefixed:1883"}
    edge = load(EdgeSettings, env_prefix=ENV_PREFIX, environ=both, flags={"vin": VIN})
    assert edge.mqtt_url == "mqtt://prefixed:1883"
    with pytest.raises(ConfigError) as caught:
        load(MqttClientSettings, environ={"MQTT_URL": "http://nope"})
    assert caught.value.key == "mqtt_url"


def test_a_bad_flag_value_is_a_one_line_config_error_naming_the_flag() -> None:
    """Flags are checked by the settings struct: the same line as in a file, exit code 2."""
    args = _parse(["consumer", "--batch-max-samples", "lots"])
    with pytest.raises(ConfigError) as caught:
        load(ConsumerSettings, environ={}, flags=flag_values(args, ConsumerSettings))
    assert str(caught.value) == (
        "config error: batch_max_samples (flag --batch-max-samples): expected int, got 'lots'"
    )
    assert EXIT_CONFIG == 2


def _example() -> tuple[str, dict[str, object], dict[str, object]]:
    """The example's header, its active values and its commented-out ones."""
    text = (ROOT / "edge" / "edge.toml.example").read_text()
    header = "".join(re.findall(r"^# (.*)\n", text.split("\n\n", 1)[0], re.MULTILINE))
    active = tomllib.loads(text)
    commented = tomllib.loads(
        "\n".join(m.group(1) for m in re.finditer(r"^# (\w+ = .*)$", text, re.MULTILINE))
    )
    return header, active, commented


def test_the_example_edge_config_lists_every_key_once_with_valid_values() -> None:
    """edge/edge.toml.example names every EdgeSettings key, and its values load as they are,
    commented-out examples included."""
    _, active, commented = _example()
    assert set(active) & set(commented) == set()
    assert set(active) | set(commented) == set(EdgeSettings.__struct_fields__)
    load(EdgeSettings, environ={}, flags={**active, **commented})


def test_the_example_edge_config_keeps_its_promises() -> None:
    """Its header's claims hold: the values shown are the defaults except the car's own keys it
    names, and every key has the REVLINE_EDGE_ variable and the flag it promises."""
    header, active, _ = _example()
    own = re.search(r"except this car's own: ([\w, ]+);", header)
    assert own is not None
    named = {key.strip() for key in own.group(1).split(",")}
    changed = {key for key, value in active.items() if value != _default(EdgeSettings, key)}
    assert changed <= named
    assert named <= set(EdgeSettings.__struct_fields__)
    assert "REVLINE_EDGE_<KEY>" in header
    assert "--<key>" in header
    edge_help = _help(["edge"])
    for key in EdgeSettings.__struct_fields__:
        assert f"--{key.replace('_', '-')} " in edge_help
        assert env_names(EdgeSettings, ENV_PREFIX)[key][0] == f"REVLINE_EDGE_{key.upper()}"


def test_a_command_without_settings_reads_the_same_variables() -> None:
    """`revline roles` and `revline broker-stats` take DATABASE_URL / MQTT_URL like the rest,
    REVLINE_ first; an empty variable counts as unset."""
    env = {"DATABASE_URL": "postgresql://plain/x", "MQTT_URL": "", "REVLINE_MQTT_URL": "mqtt://r"}
    assert env_value("database_url", environ=env) == "postgresql://plain/x"
    assert env_value("mqtt_url", environ=env) == "mqtt://r"
    assert env_value("mqtt_url", environ={"MQTT_URL": ""}) is None
