"""compose.yaml as compose reads it: variables interpolated from an env file's values."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::([?-])([^}]*))?\}")


def example_env() -> dict[str, str]:
    """.env.example with a stand-in value for every empty variable (as `revline init` fills
    them), so that compose's required variables are set."""
    env: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            name, value = line.split("=", 1)
            env[name] = value or f"test-{name.lower().replace('_', '-')}"
    return env


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``${NAME}``, ``${NAME:-default}`` and ``${NAME:?message}`` as compose resolves them; a
    required variable that is missing or empty raises KeyError naming it."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if value:
            return value
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return _VARIABLE.sub(one, text)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml, interpolated with ``env`` (default: :func:`example_env`)."""
    text = interpolate(COMPOSE.read_text(), example_env() if env is None else env)
    data: dict[str, Any] = yaml.safe_load(text)
    return data
