"""``revline bench edge|decode|dictionary|consumer|storage|audit``: figures next to a baseline
measured in the same run (``dictionary`` rebuilds the contract v2 zstd dictionary from its recipe).

Only the standard library and the core at top level; each benchmark imports its side when run.
Each one starts its own broker and database (revline.bench.guard says why, and refuses others
unless ``--yes-really``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
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


def _scratch_database_flags(bench: argparse.ArgumentParser, name: str) -> None:
    """``--database-url`` (a scratch server, where ``revline_bench_<name>_<pid>`` is created and
    dropped) and ``--yes-really``: the flags of a benchmark that needs only a database."""
    add_flags(
        bench,
        BenchSettings,
        keys={"database_url"},
        help_text={
            "database_url": f"a scratch server where a database revline_bench_{name}_<pid> is "
            "created and dropped (needs --yes-really); empty: a private PostgreSQL",
        },
    )
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)


def register(commands: Commands) -> None:
    """Add ``revline bench edge``, ``decode``, ``dictionary``, ``consumer``, ``storage``,
    ``audit`` and ``insight``."""
    group = commands.group("bench", "benchmarks that print figures against a baseline")
    bench = commands.add(
        group, "edge", "spool appends/s, backlog drain to a broker, bytes per sample", _edge
    )
    add_flags(bench, BenchSettings, keys={"mqtt_url"})
    bench.add_argument("--yes-really", action="store_true", help=_YES_REALLY_HELP)
    bench.add_argument("--samples", type=int, default=200_000, help="samples to append and drain")
    bench.add_argument("--dir", type=Path, default=None, help="where to put the bench spool")
    bench.add_argument(
        "--wire-only",
        action="store_true",
        help="only the wire tables: v1 vs v2 bytes/sample, encode cost, batching (no broker)",
    )

    bench = commands.add(
        group, "decode", "contract v2 vs v1: payload to COPY rows, samples/s on one core", _decode
    )
    bench.add_argument("--seconds", type=int, default=300, help="seconds of each of 3 drives")
    bench.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")

    bench = commands.add(
        group,
        "dictionary",
        "train the contract v2 zstd dictionary from its recipe; compare with the shipped file",
        _dictionary,
    )
    bench.add_argument("--id", type=int, default=1, help="dictionary id (its recipe)")
    bench.add_argument("--out", type=Path, default=None, help="write the trained bytes here")

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
    bench.add_argument(
        "--samples", type=int, default=0, help="samples per run (default: 50,000 messages, <= 1M)"
    )
    bench.add_argument(
        "--per-message", default="500", help="samples per MQTT message, e.g. 1,10,500 (500)"
    )
    bench.add_argument("--vehicles", type=int, default=1000, help="distinct VINs (1000)")
    bench.add_argument("--publishers", type=int, default=1, help="publisher processes")
    bench.add_argument("--workers", default="1", help="consumer worker counts, e.g. 1,2,4 (1)")
    bench.add_argument("--batch-max-samples", type=int, default=20_000)
    bench.add_argument("--write-concurrency", type=int, default=2)
    bench.add_argument("--ack-qos", type=int, default=1, help="consumer --ack-qos (1)")
    bench.add_argument(
        "--receive-maximum", type=int, default=0, help="consumer --receive-maximum (its default)"
    )
    bench.add_argument(
        "--rate", type=float, default=0, help="publish at this many samples/s (0: a burst)"
    )
    bench.add_argument(
        "--compare-tree",
        type=Path,
        help="also run the consumer of this checkout (e.g. /path/to/main), 1 worker, its defaults",
    )
    bench.add_argument(
        "--copy-connections",
        help="only the plain staged COPY on these connection counts, e.g. 1,2,4,8 (no MQTT)",
    )
    bench.add_argument(
        "--wire",
        default="1",
        help="contract versions the publishers send, e.g. 1,2 (1; the edge sends 2; "
        "--compare-tree runs on 1 only)",
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
        group, "audit", "writer samples/s with sequence accounting on vs off, same run", _audit
    )
    _scratch_database_flags(bench, "audit")
    bench.add_argument("--samples", type=int, default=400_000, help="samples per mode (400000)")
    bench.add_argument("--per-write", type=int, default=20_000, help="samples per transaction")
    bench.add_argument("--vehicles", type=int, default=500, help="vehicles in each write")

    bench = commands.add(
        group,
        "api",
        "HTTP API: live-status requests/s and p99 for 10,000 vehicles; export rows/s vs COPY",
        _api,
    )
    _scratch_database_flags(bench, "api")
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
    _scratch_database_flags(bench, "insight")
    bench.add_argument("--vehicles", type=int, default=1000, help="simulated cars at 1 Hz")
    bench.add_argument("--seconds", type=int, default=200, help="fleet seconds per round (200)")
    bench.add_argument("--per-write", type=int, default=20_000, help="samples per write")
    bench.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternated")
    bench.add_argument(
        "--fold-every",
        type=int,
        default=0,
        help="fold in line after every N samples per car instead of concurrently with no "
        "settle time (30: a 1 Hz car under the shipped settle_s; 300: a 10 Hz car); 0: "
        "concurrent (the worst case)",
    )


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


def _decode(args: argparse.Namespace) -> int:
    from revline.bench.wire import decode_table  # noqa: PLC0415 - needs the consumer extra

    decode_table(seconds=args.seconds, repeat=args.repeat)
    return 0


def _dictionary(args: argparse.Namespace) -> int:
    from revline.bench.wire import dictionary_main  # noqa: PLC0415

    return dictionary_main(args.out, args.id)


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


def _on_database(args: argparse.Namespace, run: Callable[[str, bool], int]) -> int:
    """The guard for the benchmarks that need only a database, then ``run(url, own)`` on the
    one given (a scratch one, said so) or on a private PostgreSQL started for the run
    (``own``: it is removed afterwards)."""
    settings = _bench_settings(args)
    if _refused(args, settings, ("database_url",)):
        return EXIT_CONFIG
    if _unreachable(args, settings):
        return EXIT_FAILURE
    with contextlib.ExitStack() as stack:
        url = settings.database_url
        own = not url
        if own:
            url = stack.enter_context(_own_postgres())
        return run(url, own)


def _audit(args: argparse.Namespace) -> int:
    from revline.bench.audit import bench_audit  # noqa: PLC0415 - needs asyncpg

    def run(url: str, own: bool) -> int:  # own: the benchmark makes its own scratch database
        asyncio.run(
            bench_audit(url, samples=args.samples, per_write=args.per_write, vehicles=args.vehicles)
        )
        return 0

    return _on_database(args, run)


def _api(args: argparse.Namespace) -> int:
    from revline.bench.api import main  # noqa: PLC0415 - needs the api extra

    def run(url: str, own: bool) -> int:  # own: the benchmark makes its own scratch database
        args.database_url = url
        return main(args)

    return _on_database(args, run)


def _insight(args: argparse.Namespace) -> int:
    from revline.bench.insight import main  # noqa: PLC0415 - needs the consumer extra

    def run(url: str, own: bool) -> int:  # own: the benchmark makes its own scratch database
        args.database_url = url
        return main(args)

    return _on_database(args, run)


def _storage(args: argparse.Namespace) -> int:
    from revline.bench.storage import bench_write  # noqa: PLC0415 - needs asyncpg
    from revline.storage.migrate import MigrateSettings, migrate_dsn  # noqa: PLC0415

    def run(url: str, own: bool) -> int:
        if own:
            report = asyncio.run(migrate_dsn(url, MigrateSettings(database_url=url)))
            print(f"# private database migrated: mode {report.mode}", file=sys.stderr)
        asyncio.run(bench_write(url, args.samples))
        return 0

    return _on_database(args, run)
