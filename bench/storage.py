"""Storage figures: bytes per sample on TimescaleDB after compression, writer throughput.

    python -m bench.storage compression [--vehicles 100] [--samples 10000]
    python -m bench.storage writer --database-url postgresql://... [--samples 200000]

``compression`` runs on TimescaleDB compiled to WASM (tests/timescale/, needs Node.js): the same
migrations, then simulated 1 Hz drives generated inside the database (smooth signals quantised
to what the sensors really report, not random noise), then every chunk compressed.
``writer`` is consumer.writer.bench_write on a migrated database.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from consumer.migrate import MigrateSettings, migrate
from consumer.writer import COLD_SCALES, bench_write, cold_column
from revline.contract import NUMERIC_FIELDS
from tests.storage_fixtures import PGliteSession

# One row per second per vehicle. Values follow slow sines (a drive), quantised to each PID's
# real resolution: speed 1 km/h, rpm 0.25, temperatures 1 degC, percentages 100/255, MAF 0.01 g/s,
# battery 1 mV, GPS 1e-7 degree, altitude 0.1 m, heading and GPS speed 0.1.
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
        round(60 + 40 * sin(i / 300.0 + v)) AS speed,
        round((1800 + 900 * sin(i / 300.0 + v) + 200 * sin(i / 17.0)) * 4) / 4 AS rpm,
        round(least(90, 20 + i / 20.0)) AS coolant,
        round(25 + 3 * sin(i / 2000.0)) AS intake,
        round((20 + 15 * sin(i / 40.0 + v)) * 2.55) / 2.55 AS throttle,
        round((35 + 20 * sin(i / 40.0 + v)) * 2.55) / 2.55 AS load,
        round((12 + 8 * sin(i / 40.0 + v))::numeric, 2) AS maf,
        round((80 - i / 1000.0) * 2.55) / 2.55 AS fuel,
        round((14.1 + 0.2 * sin(i / 100.0))::numeric, 3) AS battery,
        round((48.1 + v * 0.01 + 0.02 * sin(i / 1000.0))::numeric, 7) AS lat,
        round((11.5 + v * 0.01 + 0.02 * cos(i / 1000.0))::numeric, 7) AS lon,
        round((520 + 30 * sin(i / 700.0))::numeric, 1) AS alt,
        round((180 + 179 * sin(i / 900.0))::numeric, 1) AS heading,
        round((60 + 40 * sin(i / 300.0 + v))::numeric, 1) AS gps_speed
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


def main() -> None:
    """Command line: ``compression`` or ``writer``."""
    parser = argparse.ArgumentParser(prog="python -m bench.storage")
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
