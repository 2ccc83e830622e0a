"""docs/cli.md is the live --help of every command, and the README's commands are ones it takes."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

import pytest

from revline.cli import build_parser
from revline.tools.clidoc import commands, render

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_page_is_the_live_help_of_every_command() -> None:
    """docs/cli.md equals what `./scripts/cli-docs` makes now: run it after changing a command."""
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == render(os.environ), "docs/cli.md is stale: run ./scripts/cli-docs"


def test_the_cli_page_shows_every_command() -> None:
    """Each command and subcommand has its section, the top-level one first."""
    page = (ROOT / "docs" / "cli.md").read_text()
    sections = re.findall(r"^## `(revline[^`]*)`$", page, re.MULTILINE)
    assert sections == [" ".join(("revline", *command)) for command in commands()]
    assert len(sections) >= 12


def _usable(line: str) -> bool:
    """Not a usage pattern (`[--vin VIN]`, `<x>`, `...`) nor a pipeline."""
    return not re.search(r"[\[<|]|\.\.\.", line)


def _readme_lines() -> list[str]:
    """Command lines of the README's shell blocks (continuation lines joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    found: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split("  #", 1)[0].strip()
            if line.startswith(("revline ", "./scripts/demo")) and _usable(line):
                found.append(line)
    return found


def _readme_mentions() -> list[str]:
    """`revline ...` and `./scripts/demo ...` in the README's inline code."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"`((?:revline|\./scripts/demo)(?: [^`]*)?)`", text)
    return [line for line in found if _usable(line)]


def _argv(line: str) -> list[str]:
    words = shlex.split(line)
    return ["demo", *words[1:]] if words[0] == "./scripts/demo" else words[1:]


@pytest.mark.parametrize("line", _readme_lines())
def test_every_command_line_in_the_readme_is_one_the_cli_takes(line: str) -> None:
    """Each command the README's shell blocks tell you to type parses with the `revline` CLI."""
    args = build_parser().parse_args(_argv(line))
    assert isinstance(args, argparse.Namespace)
    assert getattr(args, "run", None) is not None


@pytest.mark.parametrize("line", _readme_mentions())
def test_every_command_the_readme_mentions_exists_with_its_options(line: str) -> None:
    """Inline `revline ...` names a real command, and the options it shows are that command's."""
    argv = _argv(line)
    path = tuple(word for word in argv if not word.startswith("-"))
    known = set(commands())
    while path and path not in known:  # drop positional values (a VIN, `status`)
        path = path[:-1]
    assert path in known, f"{line}: no such command"
    help_text = " ".join(
        (ROOT / "docs" / "cli.md").read_text().split(f"$ {' '.join(('revline', *path))} --help")[1]
        .split("```", 1)[0]
        .split()
    )
    for option in (word.split("=")[0] for word in argv if word.startswith("--")):
        assert option in help_text, f"{line}: {option} is not an option of {path}"


def test_the_readme_has_commands_to_check() -> None:
    """The extraction above finds the README's commands (it would pass vacuously otherwise)."""
    lines = _readme_lines()
    assert any(line.startswith("revline consumer --mqtt-url") for line in lines)
    assert any(line.startswith("revline migrate") for line in lines)
    assert len(lines) + len(_readme_mentions()) >= 10
