"""``revline bench edge|consumer|storage``: figures next to a baseline measured in the same run.

Only the standard library and the core at top level; each benchmark imports its side when run.
Each one starts its own broker and database (revline.bench.guard says why, and refuses others
unless ``--yes-really``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from revline.bench.guard import BenchSettings, refusal
from revline.cli import EXIT_CONFIG, EXIT_FAILURE
from revline.settings import add_flags, flag_values, load

if TYPE_CHECKING:
    from revline.cli import Commands

__all__ = ["register", "run_bench"]

_YES_REALLY_HELP = "the broker/database given are scratch ones: write benchmark data into them"


def _bench_settings(args: argparse.Namespace) -> BenchSettings:
    return load(BenchSettings, flags=flag_values(args, BenchSettings))


def _refused(args: argparse.Namespace, settings: BenchSettings, uses: tuple[str, ...]) -> bool:
    """Print the guard's one line and say so if the benchmark must not run."""
    line = refusal(settings, uses=uses, yes_really=args.yes_really)
    if line is not None:
        print(f"revline bench {args.bench}: {line}", file=sys.stderr)
    return line is not None


def _unreachable(args: argparse.Namespace, settings: BenchSettings) -> bool:
    """Check the services we were given answer, so that a closed port or a refused login is
    one line before the benchmark starts processes, not a traceback in one of them."""
    from revline.mqtt import MqttClientSettings, connect_problem  # noqa: PLC0415
    from revline.storage.errors import connect_problem as database_problem  # noqa: PLC0415

    problem = None
    if settings.mqtt_url:
        broker = MqttClientSettings(mqtt_url=settings.mqtt_url)
        problem = connect_problem(broker, "revline-bench-probe")
    if problem is None and settings.database_url:
        problem = database_problem(settings.database_url)
    if problem is not None:
        print(f"revline bench {args.bench}: {problem}", file=sys.stderr)
    return problem is not None


@contextlib.contextmanager
def _own_postgres() -> Iterator[str]:
    """A PostgreSQL server of our own for the run: the URL of its admin database."""
    from revline.tools.localservices import PostgresService  # noqa: PLC0415

    print("# starting a private PostgreSQL for the benchmark", file=sys.stderr)
    with PostgresService() as server:
        yield server.url


@contextlib.contextmanager
def _own_broker() -> Iterator[str]:
    from revline.tools.localservices import MosquittoService  # noqa: PLC0415

    print("# starting a private Mosquitto for the benchmark", file=sys.stderr)
    with MosquittoService(use_docker=False) as broker:
        yield broker.url


def register(commands: Commands) -> None:
    """Add ``revline bench edge``, ``revline bench consumer``, ``revline bench storage`` and
    ``revline bench insight``."""
    group = commands.group("bench", "benchmarks that print figures against a baseline")
    bench = commands.add(
        group, "edge", "spool appends/s, backlog drain to a broker, bytes per sample", _edge
    )
    add_flags(bench, BenchSettings, keys={"mqtt_url"})
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)
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
    add_flags(
        bench,
        BenchSettings,
        help_text={
            "mqtt_url": "a scratch broker (nobody else may publish telemetry there; "
            "needs --yes-really); empty: a private Mosquitto",
            "database_url": "a scratch server where databases revline_bench_<pid>_* are created "
            "and dropped (needs --yes-really); empty: a private PostgreSQL",
        },
    )
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)
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
    add_flags(bench, BenchSettings, keys={"database_url"})
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)
    bench.add_argument("--samples", type=int, default=200_000, help="samples to write (200000)")

    bench = commands.add(
        group,
        "api",
        "HTTP API: live-status requests/s and p99 for 10,000 vehicles; export rows/s vs COPY",
        _api,
    )
    add_flags(
        bench,
        BenchSettings,
        keys={"database_url"},
        help_text={
            "database_url": "a scratch server where a database revline_bench_api_<pid> is "
            "created and dropped (needs --yes-really); empty: a private PostgreSQL",
        },
    )
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)
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
    add_flags(
        bench,
        BenchSettings,
        keys={"database_url"},
        help_text={
            "database_url": "a scratch server where a database revline_bench_insight_<pid> is "
            "created and dropped (needs --yes-really); empty: a private PostgreSQL",
        },
    )
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)
    bench.add_argument("--vehicles", type=int, default=1000, help="simulated cars at 1 Hz")
    bench.add_argument("--seconds", type=int, default=200, help="fleet seconds per round (200)")
    bench.add_argument("--per-write", type=int, default=20_000, help="samples per write")
    bench.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternated")


def _edge(args: argparse.Namespace) -> int:
    from revline.bench.edge import run_bench  # noqa: PLC0415 - needs the edge extra

    settings = _bench_settings(args)
    if args.wire_only:  # no broker at all
        return run_bench(mqtt_url="", samples=args.samples, directory=args.dir, wire_only=True)
    if _refused(args, settings, ("mqtt_url",)):
        return EXIT_CONFIG
    if _unreachable(args, settings):
        return EXIT_FAILURE
    with contextlib.ExitStack() as stack:
        url = settings.mqtt_url or stack.enter_context(_own_broker())
        return run_bench(mqtt_url=url, samples=args.samples, directory=args.dir)


def run_bench(args: argparse.Namespace) -> int:
    """Run the consumer benchmark and print its table."""
    from revline.bench.consumer import main  # noqa: PLC0415 - needs the consumer extra

    settings = _bench_settings(args)
    if _refused(args, settings, ("mqtt_url", "database_url")):
        return EXIT_CONFIG
    if _unreachable(args, settings):
        return EXIT_FAILURE
    with contextlib.ExitStack() as stack:
        # The benchmark starts its own broker when given none (mqtt_url None).
        args.mqtt_url = settings.mqtt_url or None
        args.database_url = settings.database_url or stack.enter_context(_own_postgres())
        return main(args)


def _api(args: argparse.Namespace) -> int:
    from revline.bench.api import main  # noqa: PLC0415 - needs the api extra

    settings = _bench_settings(args)
    if _refused(args, settings, ("database_url",)):
        return EXIT_CONFIG
    if _unreachable(args, settings):
        return EXIT_FAILURE
    with contextlib.ExitStack() as stack:
        args.database_url = settings.database_url or stack.enter_context(_own_postgres())
        return main(args)


def _insight(args: argparse.Namespace) -> int:
    from revline.bench.insight import main  # noqa: PLC0415 - needs the consumer extra

    settings = _bench_settings(args)
    if _refused(args, settings, ("database_url",)):
        return EXIT_CONFIG
    if _unreachable(args, settings):
        return EXIT_FAILURE
    with contextlib.ExitStack() as stack:
        args.database_url = settings.database_url or stack.enter_context(_own_postgres())
        return main(args)


def _storage(args: argparse.Namespace) -> int:
    from revline.bench.storage import bench_write  # noqa: PLC0415 - needs asyncpg
    from revline.storage.migrate import MigrateSettings, migrate_dsn  # noqa: PLC0415

    settings = _bench_settings(args)
    if _refused(args, settings, ("database_url",)):
        return EXIT_CONFIG
    if _unreachable(args, settings):
        return EXIT_FAILURE
    with contextlib.ExitStack() as stack:
        url = settings.database_url
        if not url:
            url = stack.enter_context(_own_postgres())
            migrate = MigrateSettings(database_url=url)
            report = asyncio.run(migrate_dsn(url, migrate))
            print(f"# private database migrated: mode {report.mode}", file=sys.stderr)
        asyncio.run(bench_write(url, args.samples))
    return 0
