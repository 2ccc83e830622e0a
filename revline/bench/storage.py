"""Storage figures: bytes per sample on TimescaleDB after compression, writer throughput.

    python -m revline.bench.storage compression [--vehicles 100] [--samples 10000]
    python -m revline.bench.storage writer --database-url postgresql://... [--samples 200000]

``compression`` runs on TimescaleDB compiled to WASM (revline/tools/pglite/, needs Node.js): the
same migrations, then simulated 1 Hz drives generated inside the database (smooth signals quantised
to what the sensors really report, not random noise), then every chunk compressed.
``writer`` is :func:`bench_write`: the consumer's writer vs a bare staged COPY.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Final

from revline.consumer.writer import (
    COLD_SCALES,
    INSERT_SAMPLES_SQL,
    STAGING_COLUMNS,
    STAGING_TABLE,
    Writer,
    cold_column,
    records,
)
from revline.contract import NUMERIC_FIELDS, Batch, Sample
from revline.fields import FIELDS, Field
from revline.storage.migrate import MigrateSettings, migrate
from revline.tools.pglite import PGliteSession

# One row per second per vehicle. Values follow slow sines (a drive), quantised to each PID's
# real resolution: speed 1 km/h, rpm 0.25, temperatures 1 degC, percentages 100/255, MAF 0.01 g/s,
# battery 1 mV, GPS 1e-7 degree, altitude 0.1 m, heading and GPS speed 0.1.
_DRIVE: Final = {
    "speed": "round(60 + 40 * sin(i / 300.0 + v))",
    "rpm": "round((1800 + 900 * sin(i / 300.0 + v) + 200 * sin(i / 17.0)) * 4) / 4",
    "coolant": "round(least(90, 20 + i / 20.0))",
    "intake": "round(25 + 3 * sin(i / 2000.0))",
    "throttle": "round((20 + 15 * sin(i / 40.0 + v)) * 2.55) / 2.55",
    "load": "round((35 + 20 * sin(i / 40.0 + v)) * 2.55) / 2.55",
    "maf": "round((12 + 8 * sin(i / 40.0 + v))::numeric, 2)",
    "fuel": "round((80 - i / 1000.0) * 2.55) / 2.55",
    "battery": "round((14.1 + 0.2 * sin(i / 100.0))::numeric, 3)",
    "lat": "round((48.1 + v * 0.01 + 0.02 * sin(i / 1000.0))::numeric, 7)",
    "lon": "round((11.5 + v * 0.01 + 0.02 * cos(i / 1000.0))::numeric, 7)",
    "alt": "round((520 + 30 * sin(i / 700.0))::numeric, 1)",
    "heading": "round((180 + 179 * sin(i / 900.0))::numeric, 1)",
    "gps_speed": "round((60 + 40 * sin(i / 300.0 + v))::numeric, 1)",
}


def _drive(field: Field) -> str:
    """A measurement's simulated value: its own curve, or (a field added since) a slow sine in the
    middle of its bounds at the device's resolution."""
    if field.name in _DRIVE:
        return _DRIVE[field.name]
    mid, half, scale = (field.lo + field.hi) / 2, (field.hi - field.lo) / 8, field.device_scale
    return f"round(({mid} + {half} * sin(i / 600.0 + v)) * {scale}) / {scale}"


_GENERATE = f"""
INSERT INTO samples (vin, ts, seq, received_at, {", ".join(cold_column(n) for n in NUMERIC_FIELDS)},
                     flags)
SELECT vin, ts, seq, received_at,
       {", ".join(f"round({n}::real::float8 * 1e{COLD_SCALES[n][0]})" for n in NUMERIC_FIELDS)},
       0
FROM (
    SELECT
        'SIM' || lpad(v::text, 14, '0') AS vin,
        t0 + i * interval '1 second' AS ts,
        i AS seq,
        t0 + i * interval '1 second' + interval '2 seconds' AS received_at,
        {", ".join(f"{_drive(f)} AS {f.name}" for f in FIELDS)}
    FROM generate_series(1, $1::int) AS v,
         generate_series(0, $2::int - 1) AS i,
         (SELECT date_trunc('day', now()) - interval '3 days' AS t0) AS start
) AS drive
"""


async def compression(vehicles: int, per_vehicle: int) -> dict[str, float]:
    """Bytes per sample before and after compression, printed and returned."""
    async with PGliteSession() as db:
        await migrate(db, MigrateSettings())
        began = time.perf_counter()
        for v in range(1, vehicles + 1, 10):
            # In slices: one giant INSERT would need the whole result in WASM memory.
            await db.execute(
                _GENERATE.replace("generate_series(1, $1::int)", f"generate_series({v}, $1::int)"),
                min(v + 9, vehicles),
                per_vehicle,
            )
        load_s = time.perf_counter() - began
        rows = (await db.fetch("SELECT count(*)::bigint AS n FROM samples"))[0]["n"]
        before = (await db.fetch("SELECT hypertable_size('samples')::bigint AS b"))[0]["b"]
        began = time.perf_counter()
        await db.execute("SELECT compress_chunk(c) FROM show_chunks('samples') c")
        compress_s = time.perf_counter() - began
        stats = (
            await db.fetch(
                "SELECT before_compression_total_bytes::bigint AS before, "
                "after_compression_total_bytes::bigint AS after, "
                "number_compressed_chunks::int AS chunks "
                "FROM hypertable_compression_stats('samples')"
            )
        )[0]
        after = (await db.fetch("SELECT hypertable_size('samples')::bigint AS b"))[0]["b"]
    result = {
        "rows": float(rows),
        "bytes_per_sample_uncompressed": before / rows,
        "bytes_per_sample_compressed": after / rows,
        "compressed_chunk_bytes_per_sample": stats["after"] / rows,
        "ratio": before / after,
    }
    print(
        f"{rows:,} samples ({vehicles} vehicles x {per_vehicle} at 1 Hz), "
        f"{stats['chunks']} chunks compressed; loaded in {load_s:.0f} s, "
        f"compressed in {compress_s:.0f} s (WASM)\n"
        f"uncompressed: {before:,} bytes = {result['bytes_per_sample_uncompressed']:.1f} B/sample "
        f"(heap + unique index)\n"
        f"compressed:   {after:,} bytes = {result['bytes_per_sample_compressed']:.1f} B/sample "
        f"(hypertable_size; compressed chunks alone: "
        f"{result['compressed_chunk_bytes_per_sample']:.1f} B/sample), "
        f"ratio {result['ratio']:.1f}x"
    )
    return result


def _simulated(vins: int, per_vin: int, start_us: int) -> list[Batch]:
    batches = []
    for v in range(vins):
        vin = f"1BENCH{v:011d}"
        samples = [
            Sample(
                ts=start_us + i * 1_000_000,
                seq=i,
                speed=50.0 + (i % 60),
                rpm=2000.0 + (i % 300),
                coolant=90.0,
                throttle=20.0,
                battery=13.8,
                lat=48.1 + i * 1e-5,
                lon=11.5 + i * 1e-5,
            )
            for i in range(per_vin)
        ]
        batches.append(Batch(v=1, vin=vin, batch=v, samples=samples))
    return batches


async def bench_write(dsn: str, n: int = 200_000, *, per_write: int = 20_000) -> dict[str, float]:
    """Print and return samples/s of :meth:`Writer.write` against a bare staged COPY of the same
    rows into the same tables (the baseline), on an already migrated database. Writes rows for
    ``1BENCH...`` VINs one year back."""
    start_us = int((time.time() - 365 * 86400) * 1_000_000)
    vins = max(1, per_write // 500)
    writes = max(1, n // per_write)
    async with Writer(dsn, pool_size=1) as writer:
        plan = [_simulated(vins, per_write // vins, start_us + k * 10**12) for k in range(writes)]
        baseline_plan = [
            _simulated(vins, per_write // vins, start_us + (k + writes) * 10**12)
            for k in range(writes)
        ]
        began = time.perf_counter()
        for batches in plan:
            await writer.write(batches)
        writer_s = time.perf_counter() - began

        began = time.perf_counter()
        async with writer._require_pool().acquire() as connection:
            for batches in baseline_plan:
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        STAGING_TABLE, records=records(batches), columns=STAGING_COLUMNS
                    )
                    await connection.execute(INSERT_SAMPLES_SQL)
        baseline_s = time.perf_counter() - began
    total = writes * per_write
    result = {
        "samples": float(total),
        "writer_per_s": total / writer_s,
        "staged_copy_per_s": total / baseline_s,
        "ratio": baseline_s / writer_s,
    }
    print(
        f"writer: {result['writer_per_s']:,.0f} samples/s; staged COPY + cold insert only: "
        f"{result['staged_copy_per_s']:,.0f} samples/s; writer/baseline = {result['ratio']:.0%} "
        f"({total:,} samples, {per_write:,} per transaction)"
    )
    return result


def main() -> None:
    """Command line: ``compression`` or ``writer``."""
    parser = argparse.ArgumentParser(prog="python -m revline.bench.storage")
    sub = parser.add_subparsers(dest="what", required=True)
    comp = sub.add_parser("compression", help="bytes per sample on TimescaleDB (WASM)")
    comp.add_argument("--vehicles", type=int, default=100)
    comp.add_argument("--samples", type=int, default=10_000, help="per vehicle")
    writer = sub.add_parser("writer", help="writer vs bare staged COPY on a migrated database")
    writer.add_argument("--database-url", required=True)
    writer.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    if args.what == "compression":
        asyncio.run(compression(args.vehicles, args.samples))
    else:
        asyncio.run(bench_write(args.database_url, args.samples))


if __name__ == "__main__":
    main()
