"""The docs name real things: every path in the README's table and every test the docs cite."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def test_every_path_in_the_readme_layout_table_exists() -> None:
    """Each backticked path in README's "Where things are" table is in the checkout."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Where things are", 1)[1]
    paths = [
        path
        for row in table.splitlines()
        if row.startswith("| `")
        for path in re.findall(r"`([^`\s]+/?)`", row.split("|")[1])
    ]
    assert len(paths) >= 10
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert missing == []


def test_every_test_the_docs_cite_exists() -> None:
    """`tests/x.py::name` (or a bare `::name` after it) in the docs names a test function there."""
    missing = []
    for doc in DOCS:
        current: Path | None = None
        for match in re.finditer(r"`(tests/[\w/]+\.py)?(::\w+)?", doc.read_text()):
            if match.group(1):
                current = ROOT / match.group(1)
                if not current.exists():
                    missing.append(f"{doc.name}: {match.group(1)}")
                    current = None
            name = match.group(2)
            if name and current is not None and f"def {name[2:]}(" not in current.read_text():
                missing.append(f"{doc.name}: {current.relative_to(ROOT)}{name}")
    assert missing == []
