"""``revline bench edge|consumer|storage``: figures next to a baseline measured in the same run.

Only the standard library and the core at top level; each benchmark imports its side when run.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register"]


def register(commands: Commands) -> None:
    """Add ``revline bench edge``, ``revline bench consumer``, ``revline bench storage`` and
    ``revline bench insight``."""
    group = commands.group("bench", "benchmarks that print figures against a baseline")
    bench = commands.add(
        group, "edge", "spool appends/s, backlog drain to a broker, bytes per sample", _edge
    )
    bench.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker to drain into")
    bench.add_argument("--samples", type=int, default=200_000, help="samples to append and drain")
    bench.add_argument("--dir", type=Path, default=None, help="where to put the bench spool")
    bench.add_argument(
        "--wire-only", action="store_true", help="only wire bytes/sample, v1 vs v2 (no broker)"
    )

    bench = commands.add(
        group,
        "consumer",
        "end-to-end consumer throughput and latency vs a plain staged COPY",
        run_bench,
    )
    bench.add_argument(
        "--mqtt-url",
        help="use this broker (nobody else should publish telemetry there); "
        "default: a private mosquitto started for the run",
    )
    bench.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="server where a scratch database revline_bench_<pid> is created and dropped",
    )
    bench.add_argument("--samples", type=int, default=1_000_000, help="samples to publish")
    bench.add_argument("--per-message", type=int, default=500, help="samples per MQTT message")
    bench.add_argument("--vehicles", type=int, default=100, help="distinct VINs")
    bench.add_argument("--publishers", type=int, default=1, help="publisher processes")
    bench.add_argument("--batch-max-samples", type=int, default=20_000)
    bench.add_argument("--write-concurrency", type=int, default=2)
    bench.add_argument(
        "--rate", type=float, default=0, help="publish at this many samples/s (0: a burst)"
    )
    bench.add_argument("--profile", type=Path, help="write a cProfile of the consumer here")

    bench = commands.add(
        group,
        "storage",
        "database writer vs a bare staged COPY, samples/s (on a migrated database)",
        _storage,
    )
    bench.add_argument("--database-url", help="postgresql://... (env DATABASE_URL)")
    bench.add_argument("--samples", type=int, default=200_000, help="samples to write (200000)")

    bench = commands.add(
        group,
        "api",
        "HTTP API: live-status requests/s and p99 for 10,000 vehicles; export rows/s vs COPY",
        _api,
    )
    bench.add_argument(
        "--database-url",
        help="a server where a scratch database is created and dropped (default: a private "
        "PostgreSQL started for the run)",
    )
    bench.add_argument("--vehicles", type=int, default=10_000, help="vehicles (10000)")
    bench.add_argument("--status-requests", type=int, default=20_000, help="status GETs (20000)")
    bench.add_argument("--concurrency", type=int, default=32, help="clients at once (32)")
    bench.add_argument("--export-rows", type=int, default=1_000_000, help="export rows (1000000)")

    bench = commands.add(
        group,
        "insight",
        "writer throughput with trip and health maintenance on vs off, same run, own database",
        _insight,
    )
    bench.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="server where a scratch database revline_bench_insight_<pid> is created and dropped",
    )
    bench.add_argument("--vehicles", type=int, default=1000, help="simulated cars at 1 Hz")
    bench.add_argument("--seconds", type=int, default=200, help="fleet seconds per round (200)")
    bench.add_argument("--per-write", type=int, default=20_000, help="samples per write")
    bench.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternated")


def _edge(args: argparse.Namespace) -> int:
    from revline.bench.edge import run_bench  # noqa: PLC0415 - needs the edge extra

    return run_bench(
        mqtt_url=args.mqtt_url, samples=args.samples, directory=args.dir, wire_only=args.wire_only
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run the consumer benchmark and print its table."""
    from revline.bench.consumer import main  # noqa: PLC0415 - needs the consumer extra

    return main(args)


def _api(args: argparse.Namespace) -> int:
    from revline.bench.api import main  # noqa: PLC0415 - needs the api extra

    return main(args)


def _insight(args: argparse.Namespace) -> int:
    from revline.bench.insight import main  # noqa: PLC0415 - needs the consumer extra

    return main(args)


def _storage(args: argparse.Namespace) -> int:
    from revline.bench.storage import bench_write  # noqa: PLC0415 - needs asyncpg
    from revline.storage.migrate import load_settings  # noqa: PLC0415

    settings = load_settings(flags={"database_url": args.database_url})
    asyncio.run(bench_write(settings.database_url, args.samples))
    return 0
