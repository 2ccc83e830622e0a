"""``revline bench audit``: what sequence accounting costs the writer, on and off in the same run.

A scratch database of its own (``revline_bench_audit_<pid>``, created, migrated and dropped on
the server given, by default a private PostgreSQL started for the run), two writers on it: one
without derivations, one with the audit's accounting
(:class:`revline.audit.accounting.Accounting`). They take turns, write for write, with the same
shape of data for different vehicles (each write: ``vehicles`` cars, consecutive sequence numbers
continuing the previous write's, as a live fleet sends them), so that drift of the machine
(another job, autovacuum) falls on both. Then one redelivery pass (every write again: all
duplicates) for each.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from revline.audit.accounting import Accounting
from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.storage.derive import Derivation
from revline.storage.migrate import MigrateSettings, migrate_dsn

__all__ = ["bench_audit"]

_T0_US: Final = 1_717_243_200_000_000


def _writes(prefix: str, writes: int, per_write: int, vehicles: int) -> list[list[Batch]]:
    per_vin = max(1, per_write // vehicles)
    now_us = int(time.time() * 1e6)
    start = now_us - writes * per_vin * 1_000_000  # 1 Hz, ending now: recent, like live data
    plan = []
    for k in range(writes):
        batches = []
        for v in range(vehicles):
            first = k * per_vin
            samples = [
                Sample(ts=start + (first + i) * 1_000_000, seq=first + i, speed=50.0, rpm=2000.0)
                for i in range(per_vin)
            ]
            batches.append(Batch(v=1, vin=f"{prefix}{v:012d}", batch=k, samples=samples))
        plan.append(batches)
    return plan


async def _timed(writer: Writer, batches: Sequence[Batch]) -> float:
    began = time.perf_counter()
    await writer.write(batches)
    return time.perf_counter() - began


def _scratch(server_url: str) -> tuple[str, str]:
    parts = urlsplit(server_url)
    name = f"revline_bench_audit_{os.getpid()}"
    return name, urlunsplit(parts._replace(path=f"/{name}"))


async def bench_audit(
    server_url: str, *, samples: int = 400_000, per_write: int = 20_000, vehicles: int = 500
) -> dict[str, float]:
    """Print and return samples/s of the writer with accounting on and off, same run."""
    name, url = _scratch(server_url)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await migrate_dsn(url, MigrateSettings(database_url=url))
            return await _run(url, samples, per_write, vehicles)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _run(url: str, samples: int, per_write: int, vehicles: int) -> dict[str, float]:
    writes = max(1, samples // per_write)
    plans = {"off": _writes("2BENCHOFF", writes, per_write, vehicles)}
    plans["on"] = _writes("3BENCHON0", writes, per_write, vehicles)
    derived: dict[str, list[Derivation]] = {"off": [], "on": [Accounting()]}
    spent = {"off": 0.0, "on": 0.0}
    again = {"off": 0.0, "on": 0.0}
    async with (
        Writer(url, pool_size=1, derivations=derived["off"]) as off,
        Writer(url, pool_size=1, derivations=derived["on"]) as on,
    ):
        writers = {"off": off, "on": on}
        for k in range(writes):
            for mode in ("off", "on") if k % 2 == 0 else ("on", "off"):
                spent[mode] += await _timed(writers[mode], plans[mode][k])
        for k in range(writes):
            for mode in ("off", "on"):
                again[mode] += await _timed(writers[mode], plans[mode][k])
    stored = writes * (per_write // vehicles) * vehicles
    result = {
        "samples": float(stored),
        "off_per_s": stored / spent["off"],
        "on_per_s": stored / spent["on"],
        "ratio": spent["off"] / spent["on"],
        "redelivery_off_per_s": stored / again["off"],
        "redelivery_on_per_s": stored / again["on"],
    }
    print(
        f"writer, {stored:,} samples in {writes} writes of {per_write:,} "
        f"({vehicles} vehicles each), same run, alternating:\n"
        f"  accounting off: {result['off_per_s']:>10,.0f} samples/s\n"
        f"  accounting on:  {result['on_per_s']:>10,.0f} samples/s  "
        f"(on/off = {result['ratio']:.0%})\n"
        f"  redelivery (every write again, all duplicates): off "
        f"{result['redelivery_off_per_s']:,.0f}, on {result['redelivery_on_per_s']:,.0f} "
        f"samples/s"
    )
    return result
