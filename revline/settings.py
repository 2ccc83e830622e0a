"""Building a service's frozen settings object from TOML, environment and flags, in one place.

Each service defines its settings as a frozen ``msgspec.Struct`` with defaults and constraints
(``msgspec.Meta``) whose ``__post_init__`` calls :func:`check_fields`, then makes the checks that
involve several keys, raising :class:`ConfigError`. So a settings object is checked the same way
however it is made: built directly (``ConsumerSettings(group="a/b")``) or by :func:`load`, which
only layers the sources (defaults < TOML file < environment < flags) and converts once. A bad
value raises a :class:`ConfigError` whose message is one line naming the key, the source it came
from when known, and what was expected, e.g.::

    config error: batch_max_samples (env REVLINE_BATCH_MAX_SAMPLES): expected int >= 1, got 'lots'

A constraint can say in words what it expects with ``msgspec.Meta(description=...)``: the
message then reads ``expected <description>, got <value>``.

The command line is generated from the same struct (:func:`add_flags`, :func:`flag_values`): every
key has a flag ``--key-name`` and an environment variable ``PREFIX_KEY_NAME``, and the keys every
command shares have their conventional unprefixed names too (:data:`PLAIN_ENV`: ``MQTT_URL``,
``DATABASE_URL``), below the prefixed ones. This module is the only one that reads the
environment.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import itertools
import os
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

__all__ = [
    "PLAIN_ENV",
    "ConfigError",
    "add_flags",
    "check_fields",
    "env_names",
    "env_value",
    "environment",
    "field_docs",
    "flag_values",
    "load",
]

PLAIN_ENV: Final[Mapping[str, str]] = {"MQTT_URL": "mqtt_url", "DATABASE_URL": "database_url"}
"""Unprefixed environment variables every command honours for the key they name (when its
settings have that key), below ``PREFIX_KEY``: a shell or a compose file sets them once for all."""

S = TypeVar("S", bound=msgspec.Struct)


class ConfigError(Exception):
    """A settings value is missing or malformed; the message is one line for the operator."""

    def __init__(self, key: str, source: str, expected: str) -> None:
        where = f"{key} ({source})" if source else key
        super().__init__(f"config error: {where}: {expected}")
        self.key = key
        self.source = source
        self.expected = expected


_MISSING_RE = re.compile(r"missing required field `([A-Za-z0-9_]+)`")
_PATH_RE = re.compile(r" - at `\$\.([A-Za-z0-9_]+)[^`]*`")
_AT_RE = re.compile(r" - at `[^`]*`")


def _description(kind: object) -> str | None:
    """The ``msgspec.Meta(description=...)`` of a field's type, looking inside ``X | None``."""
    for arg in typing.get_args(kind):
        if isinstance(arg, msgspec.Meta) and arg.description:
            return arg.description
        if (found := _description(arg)) is not None:
            return found
    return None


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> tuple[tuple[str, object, str | None], ...]:
    return tuple(
        (f.name, f.type, _description(f.type)) for f in msgspec.structs.fields(cls)
    )


def _expected(message: str, value: object, description: str | None) -> str:
    """``expected int >= 1, got 'lots'`` from msgspec's ``Expected `int` >= 1, got `str` ...``."""
    if description:
        return f"expected {description}, got {value!r}"
    text = _AT_RE.sub("", message).replace("`", "").split(", got ")[0]
    return f"{text[:1].lower()}{text[1:]}, got {value!r}"


def check_fields(settings: msgspec.Struct) -> None:
    """Check every field of ``settings`` against its type and ``msgspec.Meta`` constraints.

    msgspec checks them when it converts (what :func:`load` does), not when a struct is built
    directly: call this first in a settings struct's ``__post_init__``, so that
    ``ConsumerSettings(write_concurrency=0)`` fails like ``--write-concurrency 0`` does.
    """
    for name, kind, description in _fields(type(settings)):
        value = getattr(settings, name)
        try:
            msgspec.convert(value, kind)
        except msgspec.ValidationError as exc:
            raise ConfigError(name, "", _expected(str(exc), value, description)) from exc


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError("config", str(path), "file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from exc


def environment() -> Mapping[str, str]:
    """The process environment: what every settings loader reads when not given one."""
    return os.environ


def env_value(
    key: str, *, prefix: str = "REVLINE_", environ: Mapping[str, str] | None = None
) -> str | None:
    """The environment's value for one key of a command without a settings struct:
    ``PREFIX_KEY``, else its :data:`PLAIN_ENV` name (``MQTT_URL``...); None if unset or empty."""
    env = environment() if environ is None else environ
    plain = [var for var, name in PLAIN_ENV.items() if name == key]
    for var in (prefix + key.upper(), *plain):
        if env.get(var):
            return env[var]
    return None


def env_names(cls: type[msgspec.Struct], prefix: str) -> dict[str, tuple[str, ...]]:
    """For each key, the environment variables that set it, the winning one first:
    ``{"mqtt_url": ("REVLINE_EDGE_MQTT_URL", "MQTT_URL"), ...}``."""
    plain = {key: var for var, key in PLAIN_ENV.items()}
    return {
        name: (prefix + name.upper(), plain[name]) if name in plain else (prefix + name.upper(),)
        for name in cls.__struct_fields__
    }


def _from_env(
    cls: type[S], prefix: str, environ: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """key -> (value, variable) of the winning variable set for each key."""
    found: dict[str, tuple[str, str]] = {}
    for name, names in env_names(cls, prefix).items():
        for var in names:
            if var in environ:
                found[name] = (environ[var], var)
                break
    return found


def load(
    cls: type[S],
    *,
    toml_path: Path | None = None,
    env_prefix: str = "REVLINE_",
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> S:
    """Defaults < TOML < environment (``PREFIX_KEY``, else the :data:`PLAIN_ENV` name) < flags
    (``None`` values are ignored)."""
    env = environment() if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    if toml_path is not None:
        layers.append((f"file {toml_path}", _from_toml(toml_path)))
    from_env = _from_env(cls, env_prefix, env)
    env_values = {key: _text_value(cls, key, value) for key, (value, _) in from_env.items()}
    layers.append(("env", env_values))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))

    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    known = set(cls.__struct_fields__)
    for source, values in layers:
        for key, value in values.items():
            if key not in known:
                names = ", ".join(sorted(known))
                raise ConfigError(key, source, f"unknown key; known keys: {names}")
            merged[key] = value
            if source == "env":
                origin[key] = f"env {from_env[key][1]}"
            elif source == "flag":
                origin[key] = f"flag --{key.replace('_', '-')}"
            else:
                origin[key] = source
    try:
        # Environment values are strings: strict=False lets "20" become 20 and
        # "true" become True, while still refusing "lots" for an int. The struct's own
        # __post_init__ checks run here too; their ConfigError is not a ValueError, so msgspec
        # lets it through unchanged.
        return msgspec.convert(merged, cls, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        missing = _MISSING_RE.search(message)
        if missing:
            raise ConfigError(missing.group(1), "", "required, not set") from exc
        match = _PATH_RE.search(message)
        key = match.group(1) if match else "config"
        if key in merged:
            description = {name: d for name, _, d in _fields(cls)}.get(key)
            expected = _expected(message, merged[key], description)
        else:
            expected = _PATH_RE.sub("", message).replace("`", "")
            expected = expected[:1].lower() + expected[1:]
        raise ConfigError(key, origin.get(key, ""), expected) from exc


# --- the command line, generated from the struct ---


def _unwrap(kind: object) -> object:
    """The type under ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = typing.get_origin(kind)
        if origin is Annotated:
            kind = typing.get_args(kind)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(args) != 1:
                return kind
            kind = args[0]
        else:
            return kind


@functools.cache
def field_docs(cls: type[msgspec.Struct]) -> dict[str, str]:
    """The docstring under each field of ``cls`` (the string literal that follows it), if any."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen app): help falls back to the key's name
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _first_sentence(text: str) -> str:
    """A docstring's first sentence as help: ``Broker URL, mqtt://...`` -> ``broker URL, ...``."""
    match = re.match(r"(.+?[.;])(\s|$)", text.replace("``", ""))
    sentence = (match.group(1) if match else text).rstrip(".;")
    if sentence[1:2].islower():  # not an acronym (CA, MQTT)
        sentence = sentence[:1].lower() + sentence[1:]
    return sentence


def _default_text(field: msgspec.structs.FieldInfo) -> str:
    if field.default is not msgspec.NODEFAULT:
        value: object = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if value == "":
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type[msgspec.Struct],
    *,
    env_prefix: str = "REVLINE_",
    help_text: Mapping[str, str] | None = None,
    keys: Collection[str] | None = None,
) -> None:
    """A flag ``--key-name`` for every key of ``cls``; its help names the default and the
    environment variables. An unset flag is ``None`` (the key is left to the file, the environment
    or the default); values are converted and checked by :func:`load`, so a bad one fails with the
    same one-line error as in a file. A list takes comma-separated values. ``keys``: only these
    (a command that uses part of a shared struct)."""
    docs = field_docs(cls)
    names = env_names(cls, env_prefix)
    for field in msgspec.structs.fields(cls):
        if keys is not None and field.name not in keys:
            continue
        kind = _unwrap(field.type)
        if typing.get_origin(kind) is Literal:
            metavar = "{" + ",".join(str(a) for a in typing.get_args(kind)) + "}"
        elif typing.get_origin(kind) is list:
            metavar = "A,B,..."
        elif kind in (int, float):
            metavar = "N"
        else:
            metavar = field.name.upper()
        text = (help_text or {}).get(field.name) or _first_sentence(docs.get(field.name, ""))
        text = text or field.name.replace("_", " ")
        env = " or ".join(names[field.name])
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=None,
            metavar=metavar,
            help=f"{text} (default: {_default_text(field)}; env {env})".replace("%", "%%"),
        )


def _text_value(cls: type[msgspec.Struct], key: str, value: str) -> object:
    """A value typed as text (a flag, an environment variable): a list is comma-separated."""
    kinds = {f.name: f.type for f in msgspec.structs.fields(cls)}
    if typing.get_origin(_unwrap(kinds[key])) is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def flag_values(args: argparse.Namespace, cls: type[msgspec.Struct]) -> dict[str, object]:
    """The flags :func:`add_flags` made, as ``load(flags=...)`` takes them (unset: ``None``)."""
    values: dict[str, object] = {}
    for name in cls.__struct_fields__:
        value = getattr(args, name, None)
        values[name] = _text_value(cls, name, value) if isinstance(value, str) else value
    return values
