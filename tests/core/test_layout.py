"""The package's layering, read from the import statements of every module of ``revline``.

The rules (../shared/DESIGN.md, "Layout"): the core imports no part; edge and consumer never import
each other; the product (core, edge, consumer, storage) never imports the tools or the benchmarks;
nothing imports ``tests``; the wheel installs ``revline`` and nothing else.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "revline"

CORE = frozenset(
    {"revline", "revline.fields", "revline.contract", "revline.settings", "revline.mqtt"}
    | {"revline.logs", "revline.cli", "revline.backoff", "revline.wire_v2", "revline._peek"}
)
PARTS = ("edge", "consumer", "storage", "insight", "audit", "api", "tools", "bench")

# part -> the parts it may import (besides the core, which every part may import).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "edge": frozenset(),
    "consumer": frozenset({"storage", "insight", "audit"}),
    "storage": frozenset(),
    # What is derived from committed samples (trips, health / sequence accounting): plugged into
    # the consumer's writes through revline.storage.derive, read by the API.
    "insight": frozenset({"storage"}),
    "audit": frozenset({"storage"}),
    "api": frozenset({"consumer", "storage", "insight", "audit"}),
    "tools": frozenset({"edge", "consumer", "storage", "insight", "audit", "api"}),
    "bench": frozenset({"edge", "consumer", "storage", "insight", "audit", "api", "tools"}),
}


def module_name(path: Path) -> str:
    """``revline/edge/spool.py`` -> ``revline.edge.spool``; a package's ``__init__`` is its name."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """Which part a ``revline`` module belongs to: ``core``, a part's name, or None if foreign."""
    if module in CORE:
        return "core"
    pieces = module.split(".")
    if pieces[0] != "revline" or len(pieces) < 2 or pieces[1] not in PARTS:
        return None
    return pieces[1]


def imports(source: str, module: str, *, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module named by an import statement anywhere in ``source`` (functions and
    ``TYPE_CHECKING`` blocks included), relative imports resolved against ``module``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from revline import revline.edge` names a part too
                yield node.lineno, f"{name}.{alias.name}"


def violations(source: str, module: str, where: str, *, is_package: bool = False) -> list[str]:
    """The layering rules that ``source`` (the text of ``module``) breaks, one line each."""
    mine = part_of(module)
    found = []
    for line, name in imports(source, module, is_package=is_package):
        if name == "tests" or name.startswith("tests."):
            found.append(f"{where}:{line}: imports {name}: nothing in the product imports tests/")
            continue
        theirs = part_of(name)
        if mine is None or theirs is None or theirs in {"core", mine}:
            continue
        if theirs not in ALLOWED[mine] and not any(f"{where}:{line}:" in f for f in found):
            found.append(f"{where}:{line}: {mine} imports {name} ({theirs})")
    return found


def test_the_package_follows_its_layering() -> None:
    """No module of revline imports across the layers: core <- parts, edge and consumer apart."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        where = str(path.relative_to(ROOT))
        found += violations(
            path.read_text(), module, where, is_package=path.name == "__init__.py"
        )
    assert found == []


def test_the_checker_reports_each_kind_of_violation() -> None:
    """A core module importing the edge, an edge importing the consumer, a consumer importing a
    tool and any module importing tests are all reported; allowed imports are not."""
    assert violations("from revline.edge.spool import Spool", "revline.contract", "x")
    assert violations("import revline.consumer.writer", "revline.edge.publisher", "x")
    assert violations("from revline import " + "consumer", "revline.edge.cli", "x")
    assert violations("from . import config", "revline.edge.cli", "x") == []
    assert violations("from ..consumer import writer", "revline.edge.cli", "x")
    assert violations(
        "def f():\n    from revline.tools.localservices import free_port\n",
        "revline.consumer.service",
        "x",
    )
    assert violations("from tests.fixtures.services import free_port", "revline.tools.demo", "x")
    assert violations("from revline.edge.sim import Sim", "revline.bench.edge", "x") == []
    assert violations("from revline.contract import Batch", "revline.edge.spool", "x") == []


def test_the_wheel_installs_only_revline() -> None:
    """pyproject.toml ships one import package, and no top-level folder is a Python package."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["revline"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    stray = sorted(packages - {"revline", "tests"})
    assert stray == [], f"top-level folders that look like packages: {stray}"


def test_the_command_line_loads_without_the_sides_libraries() -> None:
    """Building `revline`'s whole parser imports no optional library (asyncpg, python-OBD,
    bleak...): `revline --help` works on a Pi without the consumer extra and in the server image
    without the edge extra."""
    probe = (
        "import sys, revline.cli; revline.cli.build_parser(); "
        "print(' '.join(m for m in ('asyncpg', 'prometheus_client', 'obd', 'bleak', 'serial', "
        "'pynmea2') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""


def cross_test_imports(source: str, module: str, where: str) -> list[str]:
    """The imports of another test module in ``source`` (a module of ``tests/``): what two test
    files share lives in ``tests/fixtures`` (or ``tests/conftest.py``), not in one of them."""
    shared = ("tests.fixtures", "tests.conftest")
    found: dict[int, str] = {}  # one line per statement, not one per name it imports
    for line, name in imports(source, module, is_package=False):
        if name.startswith("tests.") and not name.startswith(shared):
            found.setdefault(line, f"{where}:{line}: imports {name}: share it from tests/fixtures")
    return list(found.values())


def test_test_modules_share_helpers_only_through_the_fixtures() -> None:
    """No test module imports another test module; a test importing one is reported."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        found += cross_test_imports(path.read_text(), module_name(path), where)
    assert found == []
    reported = "from tests.consumer.test_ingest import AckListener"
    assert cross_test_imports(reported, "tests.stack.test_poison", "x")
    assert cross_test_imports("from tests.fixtures.edge import spooled", "tests.a", "x") == []


def test_every_top_level_module_of_the_package_is_core() -> None:
    """A new module directly in revline/ is core, and is listed so the rules above apply to it."""
    modules = {module_name(path) for path in PACKAGE.glob("*.py")}
    assert modules == CORE
