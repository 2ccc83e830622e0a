"""The curl examples of docs/api.md, run against a live server."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.fixtures.api import ROOT, ApiProcess, KeyMaker, sim_batches, store

_EXAMPLE = re.compile(r"```sh\n(?P<script>.*?)```(?:\s*```text\n(?P<expected>.*?)```)?", re.S)


def examples(text: str) -> list[tuple[str, list[str]]]:
    """Each ``sh`` block of a doc with the lines of the ``text`` block right after it, if any."""
    return [
        (m["script"], [line for line in (m["expected"] or "").splitlines() if line.strip()])
        for m in _EXAMPLE.finditer(text)
    ]


def test_the_examples_are_found() -> None:
    """Every sh block of docs/api.md is an example, and most say what they print."""
    found = examples((ROOT / "docs" / "api.md").read_text())
    assert len(found) >= 7
    assert all("curl" in script for script, _ in found)
    assert sum(1 for _, expected in found if expected) >= 7


def test_the_curl_examples_of_the_api_doc_run(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str, tmp_path: Path
) -> None:
    """Each example exits 0 against a server holding two hours of a simulated drive, and prints
    what the doc says it prints."""
    store(api.database_url, sim_batches(unique_vin, 72_000))
    env = {
        **os.environ,
        "API": api.url,
        "KEY": make_key("read:*"),
        "INGEST_KEY": make_key(f"ingest:{unique_vin}"),
        "VIN": unique_vin,
    }
    for script, expected in examples((ROOT / "docs" / "api.md").read_text()):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
        for line in expected:
            assert line in done.stdout, f"{script}\nexpected {line!r} in:\n{done.stdout[:2000]}"
