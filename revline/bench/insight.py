"""``revline bench insight``: the writer with trip and health maintenance on vs off, same run.

1. Creates a scratch database ``revline_bench_insight_<pid>`` on the server of
   ``--database-url`` and migrates it (dropped at the end): the bench writes nowhere else.
2. A simulated fleet (``--vehicles`` cars at 1 Hz, each driving 10 minutes then standing 10,
   phase-shifted, with GPS, coolant and battery) is cut into writes of ``--per-write`` samples,
   in time order, like the consumer's batches of a live fleet. The batches are built before any
   timing.
3. Rounds alternate **off** (the consumer's writer without derivations) and **on** (the writer
   with :class:`revline.insight.store.Insight`, its background fold running concurrently on the
   same pool, as in the consumer, with no settle time so that it folds while the writes go on),
   each on vehicles of its own. Reported: write
   throughput of each (median over rounds), their ratio, and for **on** how long after the last
   write the background task had folded every dirty span (the settle time included) and how many
   vehicle recomputes it made. A short warm-up round comes first and is not counted.
4. At the end, every vehicle's whole history is marked dirty and recomputed at once (by window,
   as for a late upload): that path's own rate, in vehicles and samples re-read per second.

Every round also counts CPU per sample, of this process (writer and fold) and of the database
server's processes (read from /proc; only when the server runs on this machine, as the private
one does): unlike samples/s, busy neighbours on a shared machine hardly move it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import statistics
import sys
import time
from typing import Any, Final

from revline.bench.consumer import _scratch_database
from revline.bench.proc import cpu_seconds, parent_pid
from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.insight.store import Insight
from revline.insight.thresholds import Thresholds

__all__ = ["main"]

_VIN_CHARS: Final = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
_T0: Final = 1_717_243_200_000_000  # 2024-06-01T12:00Z: a fixed origin, reproducible drives
_US: Final = 1_000_000


def _vin(round_: int, index: int) -> str:
    digits = []
    for _ in range(6):
        index, rest = divmod(index, len(_VIN_CHARS))
        digits.append(_VIN_CHARS[rest])
    return f"2RVBENCH{round_:03d}" + "".join(reversed(digits))


def _sample(vehicle: int, second: int) -> Sample:
    phase = (second + 137 * vehicle) % 1200  # 600 s driving, 600 s standing
    moving = phase < 600
    speed = round(50 + 30 * math.sin(phase / 60 + vehicle)) if moving else 0.0
    return Sample(
        ts=_T0 + second * _US,
        seq=second + 1,
        speed=float(speed),
        rpm=800.0 + 30 * speed,
        coolant=90.0,
        battery=14.1 if moving else 12.6,
        lat=48.0 + vehicle * 1e-3,
        lon=round(11.0 + second * 1e-4, 7),
    )


def _plan(round_: int, vehicles: int, seconds: int, per_write: int) -> list[list[Batch]]:
    """Writes of ``per_write`` samples: each vehicle's next seconds, the fleet in time order."""
    per_vehicle = max(1, per_write // vehicles)
    writes = []
    for first in range(0, seconds, per_vehicle):
        span = range(first, min(first + per_vehicle, seconds))
        writes.append(
            [
                Batch(v=1, vin=_vin(round_, v), batch=first,
                      samples=[_sample(v, s) for s in span])
                for v in range(vehicles)
            ]
        )
    return writes


class _Cpu:
    """CPU seconds used since it was made: this process, and the database server's process tree
    (its postmaster, found as the parent of a backend of ``pool``; None if not on this machine)."""

    def __init__(self, postmaster: int | None) -> None:
        self._postmaster = postmaster
        self._client = time.process_time()
        self._server = cpu_seconds(postmaster) if postmaster else 0.0

    @staticmethod
    async def postmaster(pool: Any) -> int | None:
        backend: int = await pool.fetchval("SELECT pg_backend_pid()")
        try:
            return parent_pid(backend)
        except OSError:
            return None  # a server elsewhere: its CPU is not ours to read

    def used(self) -> dict[str, float]:
        server = cpu_seconds(self._postmaster) - self._server if self._postmaster else math.nan
        return {"client_cpu": time.process_time() - self._client, "server_cpu": server}


async def _dirty(pool: Any) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM insight_dirty")
    return count


async def _round_inline(
    url: str, plan: list[list[Batch]], *, fold_every: int, per_vehicle: int
) -> dict[str, float]:
    """Writes with the fold done in line every ``fold_every`` fleet seconds (each car's
    ``fold_every`` newest samples at 1 Hz: what the shipped settle time of 30 s gives a 1 Hz car
    at 30, a 10 Hz car at 300): one sequence of work, so samples per second of the whole is the
    cost of writing and maintaining, with no concurrency to hide or inflate it."""
    insight = Insight(Thresholds(settle_s=0))
    every = max(1, math.ceil(fold_every / max(1, per_vehicle)))  # writes between two folds
    async with Writer(url, pool_size=4, derivations=[insight]) as writer:
        samples = sum(len(b.samples) for batches in plan for b in batches)
        cpu = _Cpu(await _Cpu.postmaster(writer.pool))
        began = time.perf_counter()
        for k, batches in enumerate(plan, 1):
            await writer.write(batches)
            if k % every == 0 or k == len(plan):
                while await insight.catch_up(writer.pool, settle_s=0):
                    pass
        took = time.perf_counter() - began
        used = cpu.used()
    return {"samples": float(samples), "per_s": samples / took, "caught_up_s": 0.0,
            "recomputes": float(insight.recomputed), "folded_per_s": samples / took, **used}


async def _round(
    url: str, plan: list[list[Batch]], *, on: bool, fold_every: int = 0, per_vehicle: int = 1
) -> dict[str, float]:
    if on and fold_every:
        return await _round_inline(url, plan, fold_every=fold_every, per_vehicle=per_vehicle)
    # No settle time: the background folds while the writes go on (the worst case for the
    # writer), each vehicle's new samples on from its checkpoint after its first fold.
    insight = Insight(Thresholds(settle_s=0)) if on else None
    async with Writer(url, pool_size=4, derivations=[insight] if insight else []) as writer:
        background = (
            asyncio.create_task(insight.run(writer.pool), name="insight") if insight else None
        )
        samples = sum(len(b.samples) for batches in plan for b in batches)
        cpu = _Cpu(await _Cpu.postmaster(writer.pool))
        began = time.perf_counter()
        for batches in plan:
            await writer.write(batches)
        write_s = time.perf_counter() - began
        result = {"samples": float(samples), "per_s": samples / write_s}
        if insight is not None and background is not None:
            written = time.perf_counter()
            while True:  # polling the database: nothing in this process can signal it
                if not await _dirty(writer.pool):
                    break
                await asyncio.sleep(0.1)
            result["caught_up_s"] = time.perf_counter() - written
            result["recomputes"] = float(insight.recomputed)
            result["folded_per_s"] = samples / (time.perf_counter() - began)
            background.cancel()
        result.update(cpu.used())  # on: the fold's catch-up after the last write included
    return result


async def _trips(url: str) -> int:
    import asyncpg  # noqa: PLC0415

    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM trips")
        return count
    finally:
        await connection.close()


async def _full_recompute(url: str) -> dict[str, float]:
    """Every vehicle's whole history marked dirty at once, then folded with no settle time:
    the background task's own rate (vehicles and samples re-read per second)."""
    insight = Insight()
    async with Writer(url, pool_size=4, derivations=[insight]) as writer:
        samples = await writer.pool.fetchval("SELECT count(*) FROM samples")
        await writer.pool.execute(
            "INSERT INTO insight_dirty (vin, ts_min, ts_max) "
            "SELECT vin, min(ts), max(ts) FROM samples GROUP BY vin "
            "ON CONFLICT (vin) DO NOTHING"
        )
        began = time.perf_counter()
        vehicles = 0
        while folded := await insight.catch_up(writer.pool, settle_s=0):
            vehicles += folded
        took = time.perf_counter() - began
    return {"vehicles_per_s": vehicles / took, "samples_per_s": samples / took,
            "vehicles": float(vehicles), "seconds": took}


def _cpu_line(off: list[dict[str, float]], on: list[dict[str, float]]) -> str:
    """CPU µs per sample, off and on (median of rounds), and what insight adds."""

    def per_sample(rounds: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] / r["samples"] * 1e6 for r in rounds)

    client = [per_sample(off, "client_cpu"), per_sample(on, "client_cpu")]
    server = [per_sample(off, "server_cpu"), per_sample(on, "server_cpu")]
    total = [c + s for c, s in zip(client, server, strict=True)]
    return (
        f"CPU per sample (this process + database server): insight off {total[0]:.1f} µs "
        f"({client[0]:.1f} + {server[0]:.1f}), on {total[1]:.1f} µs ({client[1]:.1f} + "
        f"{server[1]:.1f}): insight adds {total[1] - total[0]:.1f} µs per sample "
        f"({client[1] - client[0]:.1f} + {server[1] - server[0]:.1f}), "
        f"{(total[1] - total[0]) / total[0]:.0%} of the write's own"
    )


def main(args: argparse.Namespace) -> int:
    """Run the rounds and print the comparison."""
    name = f"revline_bench_insight_{os.getpid()}"
    from revline.tools.localservices import PostgresService  # noqa: PLC0415

    with (
        PostgresService(url=args.database_url, use_docker=False) as server,
        _scratch_database(server, name) as url,
    ):
        off: list[dict[str, float]] = []
        on: list[dict[str, float]] = []
        # A first round of each mode warms the caches and the new database up; not counted.
        warm = asyncio.run(_round(url, _plan(999, args.vehicles, 20, args.per_write), on=False))
        print(f"warm-up round: {warm['per_s']:,.0f} samples/s (not counted)", file=sys.stderr)
        for k in range(args.rounds * 2):
            plan = _plan(k, args.vehicles, args.seconds, args.per_write)
            per_vehicle = max(1, args.per_write // args.vehicles)
            # The whole round's input (up to a million Sample structs) is built before timing;
            # frozen, the garbage collector does not walk it over and over in the round (a
            # consumer holds only the messages in flight). Both modes alike.
            gc.collect()
            gc.freeze()
            try:
                result = asyncio.run(
                    _round(url, plan, on=k % 2 == 1, fold_every=args.fold_every,
                           per_vehicle=per_vehicle)
                )
            finally:
                gc.unfreeze()
                del plan
            (on if k % 2 else off).append(result)
            mode = "on " if k % 2 else "off"
            extra = (
                f", caught up {result['caught_up_s']:.1f} s after the last write "
                f"({result['recomputes']:.0f} vehicle recomputes)"
                if k % 2 else ""
            )
            print(f"round {k + 1} insight {mode}: {result['per_s']:,.0f} samples/s{extra}",
                  file=sys.stderr)
        trips = asyncio.run(_trips(url))
        full = asyncio.run(_full_recompute(url))
    off_rate = statistics.median(r["per_s"] for r in off)
    on_rate = statistics.median(r["per_s"] for r in on)
    caught = statistics.median(r["caught_up_s"] for r in on)
    folded = statistics.median(r["folded_per_s"] for r in on)
    samples = int(off[0]["samples"])
    print(_cpu_line(off, on))
    if args.fold_every:
        print(
            f"writer, insight off: {off_rate:,.0f} samples/s; written and folded in line every "
            f"{args.fold_every} samples per car: {on_rate:,.0f} samples/s (on/off = "
            f"{on_rate / off_rate:.0%}); {trips} trips derived ({args.vehicles} vehicles at "
            f"1 Hz, {samples:,} samples per round, {args.per_write:,} per write, median of "
            f"{args.rounds} rounds each)"
        )
        return 0
    print(
        f"writer, insight off: {off_rate:,.0f} samples/s; insight on: {on_rate:,.0f} samples/s "
        f"(on/off = {on_rate / off_rate:.0%}); background caught up {caught:.1f} s after the "
        f"last write (no settle time): written and folded {folded:,.0f} samples/s "
        f"(vs written {off_rate:,.0f}: {folded / off_rate:.0%}); {trips} trips derived "
        f"({args.vehicles} vehicles at 1 Hz, {samples:,} samples per round, "
        f"{args.per_write:,} per write, median of {args.rounds} rounds each)"
    )
    print(
        f"background recompute alone, every vehicle's whole history at once: "
        f"{full['vehicles_per_s']:,.0f} vehicles/s, {full['samples_per_s']:,.0f} samples "
        f"re-read/s ({full['vehicles']:.0f} vehicles in {full['seconds']:.1f} s)"
    )
    return 0
