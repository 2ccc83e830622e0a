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
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

__all__ = ["ConfigError", "check_fields", "load"]

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


def _from_env(cls: type[S], prefix: str, environ: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in cls.__struct_fields__:
        var = prefix + name.upper()
        if var in environ:
            found[name] = environ[var]
    return found


def load(
    cls: type[S],
    *,
    toml_path: Path | None = None,
    env_prefix: str = "REVLINE_",
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> S:
    """Defaults < TOML < environment (``PREFIX_KEY``) < flags (``None`` values are ignored)."""
    env = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    if toml_path is not None:
        layers.append((f"file {toml_path}", _from_toml(toml_path)))
    layers.append(("env", _from_env(cls, env_prefix, env)))
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
                origin[key] = f"env {env_prefix}{key.upper()}"
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
