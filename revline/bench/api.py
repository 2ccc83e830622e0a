"""``revline bench api``: the HTTP API against baselines measured in the same run.

1. Makes a scratch database ``revline_bench_api_<pid>`` on a private PostgreSQL (revline.bench.cli
   starts it; ``--database-url ... --yes-really``: on that server instead), migrates it, and writes
   simulator data through the consumer's writer: a few samples for each of ``--vehicles``
   vehicles (their hot rows) and ``--export-rows`` samples of one vehicle at 10 Hz.
2. Starts ``revline api`` (uvicorn) on a free port, with a key whose rate limit is out of reach.
3. Live status: ``--status-requests`` GETs of random vehicles' status from ``--concurrency``
   clients at once (a minimal keep-alive HTTP client); requests/s and latency percentiles.
   Baseline: the status's one statement straight from asyncpg, same concurrency.
4. The live notifications' cost to the consumer: its writer with and without
   :class:`~revline.storage.notify.StateNotify`, alternated.
5. Export: the big vehicle's telemetry, all rows in one page, as NDJSON and as CSV; rows/s.
   Baseline: ``COPY (SELECT <the same columns> ...) TO STDOUT`` of the same rows through asyncpg.

The client runs on the same machine as the server and the database: on a small box the
figures are what the three share, not what a server alone could do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import asyncpg
import httpx
import msgspec

from revline.api.app import STATUS_SQL
from revline.api.keys import add_key
from revline.api.queries import TelemetryQuery, boundary_sql
from revline.consumer.writer import Writer
from revline.contract import NUMERIC_FIELDS, Batch
from revline.edge.sim import simulate_samples
from revline.storage.migrate import MigrateSettings, migrate_dsn
from revline.storage.notify import StateNotify
from revline.tools.localservices import PostgresService, free_port, wait_until

__all__ = ["main"]

_T0_US: Final = 1_780_000_000_000_000
"""2026-05-28: inside the default retention of any run for a while; never compared to now."""
_EXPORT_VIN: Final = "1HGCM82633A004352"
_ROOT: Final = Path(__file__).resolve().parents[2]
_FROM: Final = datetime(2026, 1, 1, tzinfo=UTC)
_TO: Final = datetime(2027, 1, 1, tzinfo=UTC)


def _vin(i: int) -> str:
    return f"BENCH{i:012d}"


async def _load(dsn: str, vehicles: int, export_rows: int) -> None:
    async with Writer(dsn, pool_size=2) as writer:
        batches: list[Batch] = []
        for i in range(vehicles):
            samples = list(simulate_samples(i, _T0_US + i * 1000, 3, 1.0))
            batches.append(Batch(v=1, vin=_vin(i), batch=1, samples=samples))
            if len(batches) == 1000:
                await writer.write(batches)
                batches = []
        if batches:
            await writer.write(batches)
        chunk = 20_000
        rows = simulate_samples(7, _T0_US, export_rows, 10.0)
        done = 0
        while done < export_rows:
            n = min(chunk, export_rows - done)
            samples = [next(rows) for _ in range(n)]
            await writer.write([Batch(v=1, vin=_EXPORT_VIN, batch=done // chunk + 1,
                                      samples=samples)])
            done += n


@contextlib.contextmanager
def _database(server_url: str) -> Iterator[str]:
    """A scratch database ``revline_bench_api_<pid>`` on ``server_url``, dropped after."""
    name = f"revline_bench_api_{os.getpid()}"
    service = PostgresService(url=server_url)
    url = service.create_database(name)
    try:
        yield url
    finally:
        service.drop_database(name)


@contextlib.contextmanager
def _api(dsn: str) -> Iterator[str]:
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "revline.cli", "--log-level", "warning", "api",
         "--database-url", dsn, "--port", str(port), "--max-age-s", str(100 * 365 * 86_400)],
        cwd=_ROOT, stdout=log, stderr=log,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"revline api exited: {log.read().decode(errors='replace')}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, what="revline api", timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
               ) -> int:
    """One GET on a kept-alive connection: its status code (the body is read and dropped)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _status_http(url: str, key: str, vehicles: int, requests: int, concurrency: int
                       ) -> tuple[float, list[float]]:
    # A minimal HTTP/1.1 keep-alive client on asyncio streams: on a shared 2-core box, a full
    # client library would cost more CPU than the server it measures.
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    rng = random.Random(1)
    todo = [_vin(rng.randrange(vehicles)) for _ in range(requests)]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while todo:
                vin = todo.pop()
                request = (
                    f"GET /v1/vehicles/{vin}/status HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {key}\r\n\r\n"
                ).encode()
                started = time.perf_counter()
                status = await _get(reader, writer, request)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"status of {vin}: HTTP {status}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def _status_sql(dsn: str, vehicles: int, requests: int, concurrency: int
                      ) -> tuple[float, list[float]]:
    latencies: list[float] = []
    rng = random.Random(1)
    todo = [_vin(rng.randrange(vehicles)) for _ in range(requests)]
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    try:

        async def worker() -> None:
            while todo:
                vins = [todo.pop()]
                started = time.perf_counter()
                async with pool.acquire() as connection:
                    await connection.fetch(STATUS_SQL, vins)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies
    finally:
        await pool.close()


async def _export_http(url: str, key: str, rows: int, fmt: str) -> tuple[float, int, int]:
    params = {"from": _FROM.isoformat(), "to": _TO.isoformat(), "limit": str(rows),
              "format": fmt}
    size = lines = 0
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        started = time.perf_counter()
        async with client.stream("GET", f"/v1/vehicles/{_EXPORT_VIN}/telemetry",
                                 params=params) as response:
            if response.status_code != 200:
                raise RuntimeError(f"export: {response.status_code}")
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                lines += chunk.count(b"\n")
        return time.perf_counter() - started, size, lines - (1 if fmt == "csv" else 0)


async def _export_copy(dsn: str) -> tuple[float, int, int]:
    columns = ", ".join(["ts", "seq", *NUMERIC_FIELDS])
    connection = await asyncpg.connect(dsn, server_settings={"TimeZone": "UTC"})
    size = lines = 0

    async def sink(chunk: bytes) -> None:
        nonlocal size, lines
        size += len(chunk)
        lines += bytes(chunk).count(b"\n")

    try:
        started = time.perf_counter()
        await connection.copy_from_query(
            f"SELECT {columns} FROM samples_decoded WHERE vin = '{_EXPORT_VIN}' "
            "ORDER BY ts, seq", output=sink, format="csv", header=True,
        )
        return time.perf_counter() - started, size, lines - 1
    finally:
        await connection.close()


_StatusRun = Callable[[], Awaitable[tuple[float, list[float]]]]
_ExportRun = Callable[[], Awaitable[tuple[float, int, int]]]


async def _status(make: _StatusRun) -> tuple[float, list[float]]:
    return await make()


async def _export(make: _ExportRun) -> tuple[float, int, int]:
    return await make()


async def _boundary(dsn: str, rows: int) -> tuple[float, int, int]:
    """The page-end lookup an export makes before its first byte (its share of the export)."""
    query = TelemetryQuery(
        vins=(_EXPORT_VIN,), start=_FROM, end=_TO, fields=NUMERIC_FIELDS,
        limit=rows,
    )
    sql, sql_args = boundary_sql(query)
    connection = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await connection.fetch(sql, *sql_args)
        return time.perf_counter() - started, 0, rows
    finally:
        await connection.close()


async def _notify_cost(dsn: str, rounds: int = 3) -> list[tuple[str, float]]:
    """Samples/s of the consumer's writer with and without the live notifications, alternated:
    what the API's NOTIFY costs every write (100 vehicles, writes of 20,000 samples)."""
    results: list[tuple[str, float]] = []
    base = _T0_US + 400 * 86_400_000_000
    batches = [
        Batch(v=1, vin=f"NOTIFY{v:011d}", batch=1,
              samples=list(simulate_samples(v, base, 2000, 10.0)))
        for v in range(100)
    ]
    for r in range(rounds):
        for name, derivations in (("writer alone", []), ("writer + NOTIFY", [StateNotify()])):
            shifted = [
                Batch(v=1, vin=b.vin, batch=b.batch, samples=[
                    msgspec.structs.replace(s, ts=s.ts + (r * 2 + len(derivations)) * 10**9)
                    for s in b.samples
                ])
                for b in batches
            ]
            async with Writer(dsn, pool_size=1, derivations=derivations) as writer:
                started = time.perf_counter()
                for k in range(0, len(shifted), 10):
                    await writer.write(shifted[k : k + 10])
                elapsed = time.perf_counter() - started
            results.append((name, 200_000 / elapsed))
    return results


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; print its table."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    logging.getLogger("revline.consumer.writer").setLevel(logging.WARNING)
    with _database(args.database_url) as dsn:
        started = time.perf_counter()
        asyncio.run(migrate_dsn(dsn, MigrateSettings(database_url=dsn)))
        asyncio.run(_load(dsn, args.vehicles, args.export_rows))
        print(f"# loaded {args.vehicles} vehicles and {args.export_rows} export rows in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)

        async def make_key() -> str:
            connection = await asyncpg.connect(dsn)
            try:
                _, key = await add_key(connection, "bench", ["read:*"], rate_per_s=1e9,
                                       burst=10**9)
            finally:
                await connection.close()
            return key

        print(f"{'consumer writer (200000 samples)':30} {'samples/s':>10}")
        for name, rate in asyncio.run(_notify_cost(dsn)):
            print(f"{name:30} {rate:10.0f}")
        key = asyncio.run(make_key())
        with _api(dsn) as url:
            print(f"api on {url}; {args.concurrency} clients; {os.cpu_count()} cores shared by "
                  "client, server and database")
            print(f"{'live status':30} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
            status_runs: list[tuple[str, _StatusRun]] = [
                ("HTTP GET /status", lambda: _status_http(
                    url, key, args.vehicles, args.status_requests, args.concurrency)),
                ("baseline: same SQL, asyncpg", lambda: _status_sql(
                    dsn, args.vehicles, args.status_requests, args.concurrency)),
            ]
            # Twice, interleaved: on a shared machine the load changes under a run.
            for name, run in [*status_runs, *status_runs]:
                elapsed, latencies = asyncio.run(_status(run))
                print(f"{name:30} {len(latencies) / elapsed:10.0f} "
                      f"{statistics.median(latencies) * 1000:8.2f} "
                      f"{_percentile(latencies, 0.99) * 1000:8.2f}")
            print(f"{'export (' + str(args.export_rows) + ' rows)':30} {'rows/s':>10} "
                  f"{'MB/s':>8} {'s':>8}")
            exports: list[tuple[str, _ExportRun]] = [
                ("HTTP NDJSON", lambda: _export_http(url, key, args.export_rows, "ndjson")),
                ("HTTP CSV", lambda: _export_http(url, key, args.export_rows, "csv")),
                ("baseline: COPY TO STDOUT csv", lambda: _export_copy(dsn)),
                ("HTTP's page-end lookup alone", lambda: _boundary(dsn, args.export_rows)),
            ]
            asyncio.run(_export_copy(dsn))  # warm-up: every contender reads from a warm cache
            for name, export in exports:
                elapsed, size, lines = asyncio.run(_export(export))
                if lines != args.export_rows:
                    raise RuntimeError(f"{name}: {lines} rows, expected {args.export_rows}")
                print(f"{name:30} {lines / elapsed:10.0f} {size / elapsed / 1e6:8.1f} "
                      f"{elapsed:8.2f}")
    return 0
