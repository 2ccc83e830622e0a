"""Building a service's frozen settings object from TOML, environment and flags, in one place.

Each service defines its settings as a frozen ``msgspec.Struct`` with defaults and constraints
(``msgspec.Meta``). :func:`load` layers the sources (defaults < TOML file < environment < flags)
and converts once; a bad value raises :class:`ConfigError` whose message is one line naming the
key, the source it came from and what was expected, e.g.::

    config error: batch_max_samples (env REVLINE_BATCH_MAX_SAMPLES): expected int >= 1, got 'lots'
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

__all__ = ["ConfigError", "load"]

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
        # "true" become True, while still refusing "lots" for an int.
        return msgspec.convert(merged, cls, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        missing = _MISSING_RE.search(message)
        if missing:
            raise ConfigError(missing.group(1), "", "required, not set") from exc
        match = _PATH_RE.search(message)
        key = match.group(1) if match else "config"
        expected = _PATH_RE.sub("", message).replace("`", "")
        if key in merged:
            expected = f"{expected.split(', got ')[0]}, got {merged[key]!r}"
        raise ConfigError(key, origin.get(key, ""), expected[:1].lower() + expected[1:]) from exc
