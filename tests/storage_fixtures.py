"""Helpers of the storage tests: TimescaleDB in WASM as a migration Session, and sample makers."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from revline.contract import NUMERIC_FIELDS, Batch, Sample

__all__ = [
    "ROLLUP_COLUMNS",
    "TIMESCALE_DIR",
    "PGliteError",
    "PGliteSession",
    "batch",
    "now_us",
    "sample",
]

TIMESCALE_DIR = Path(__file__).parent / "timescale"

ROLLUP_COLUMNS = (
    "vin",
    "bucket",
    "sample_count",
    *(f"{name}_{agg}" for name in NUMERIC_FIELDS for agg in ("avg", "min", "max")),
)
"""The columns of samples_1m / samples_1h in both modes, as dashboards query them."""


def now_us() -> int:
    """Now, in the contract's microseconds since the epoch."""
    return time.time_ns() // 1000


def sample(ts: int, seq: int, **values: Any) -> Sample:
    """A sample at ``ts`` with the given measurements."""
    return Sample(ts=ts, seq=seq, **values)


def batch(vin: str, samples: list[Sample], batch_id: int = 1) -> Batch:
    """A batch of one vehicle."""
    return Batch(v=1, vin=vin, batch=batch_id, samples=samples)


class PGliteError(Exception):
    """An error returned by the WASM database; ``code`` is the SQLSTATE when known."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(f"{message} (SQLSTATE {code})")
        self.code = code


def _ensure_node_modules() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: the TimescaleDB (WASM) check needs Node.js 18+")
    if not (TIMESCALE_DIR / "node_modules" / "@unni-craftsman" / "pglite").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is missing: run `npm ci` in tests/timescale")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TIMESCALE_DIR, check=True)
    return node


class PGliteSession:
    """A :class:`consumer.migrate.Session` on TimescaleDB compiled to WASM (tests/timescale/).

    One in-memory database per instance, alive while the ``async with`` block runs.
    """

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        node = await asyncio.to_thread(_ensure_node_modules)
        self._process = await asyncio.create_subprocess_exec(
            node,
            "apply.mjs",
            cwd=TIMESCALE_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=256 * 1024 * 1024,
        )
        assert self._process.stdout is not None
        ready = json.loads(await self._process.stdout.readline())
        assert ready == {"ready": True}, ready
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _call(self, sql: str, args: tuple[object, ...]) -> list[dict[str, Any]]:
        assert self._process is not None
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        request = {"sql": sql, "params": list(args)}
        self._process.stdin.write(json.dumps(request).encode() + b"\n")
        await self._process.stdin.drain()
        line = await self._process.stdout.readline()
        if not line:
            raise PGliteError("node process exited", None)
        answer = json.loads(line)
        if "error" in answer:
            raise PGliteError(answer["error"], answer.get("code"))
        rows: list[dict[str, Any]] = answer["rows"]
        return rows

    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement, or a script of several when there are no args."""
        await self._call(sql, args)

    async def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        """Run a query and return its rows as dicts (timestamps as ISO text)."""
        return await self._call(sql, args)
