"""Benchmarks write only into services of their own unless told --yes-really."""

from __future__ import annotations

import pytest

from revline.bench.guard import BenchSettings, refusal
from revline.cli import EXIT_CONFIG
from tests.fixtures.bench import run_bench
from tests.fixtures.consumer import query


def _tables(url: str) -> list[str]:
    rows = query(url, "SELECT relname FROM pg_class WHERE relkind IN ('r', 'p') ORDER BY 1")
    return [row["relname"] for row in rows]


def _state(url: str) -> tuple[list[str], int]:
    """The tables of a database and its vehicles."""
    return _tables(url), int(query(url, "SELECT count(*) FROM vehicle_state")[0][0])


def test_the_guard_refuses_given_services_unless_told_they_are_scratch() -> None:
    """No URL: the benchmark's own services, fine. A URL: refused, unless --yes-really. The
    refusal never prints a password."""
    assert refusal(BenchSettings(), uses=("mqtt_url", "database_url"), yes_really=False) is None
    given = BenchSettings(
        mqtt_url="mqtt://user:s3cret@broker:1883", database_url="postgresql://u:s3cret@db/revline"
    )
    line = refusal(given, uses=("mqtt_url", "database_url"), yes_really=False)
    assert line is not None
    assert "broker mqtt://user@broker:1883" in line
    assert "database postgresql://u@db/revline" in line
    assert "s3cret" not in line
    assert "\n" not in line
    assert refusal(given, uses=("mqtt_url",), yes_really=True) is None
    assert refusal(BenchSettings(database_url=given.database_url), uses=("mqtt_url",),
                   yes_really=False) is None  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["storage", "--database-url", "{db}"], {}),
        (["storage"], {"DATABASE_URL": "{db}"}),
        (["storage"], {"REVLINE_DATABASE_URL": "{db}"}),
        (["consumer", "--samples", "1000"], {"DATABASE_URL": "{db}"}),
    ],
    ids=["flag", "DATABASE_URL", "REVLINE_DATABASE_URL", "consumer"],
)
def test_a_benchmark_leaves_a_database_it_did_not_make_untouched(
    migrated_db: str, argv: list[str], env: dict[str, str]
) -> None:
    """Given a database (flag or environment) without --yes-really, a benchmark refuses in one
    line, exit 2, and the database has not a row or a table more."""
    before = _state(migrated_db)
    done = run_bench(
        *(a.format(db=migrated_db) for a in argv),
        **{k: v.format(db=migrated_db) for k, v in env.items()},
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "refusing to write benchmark data into the database" in done.stderr
    assert done.stdout == ""
    assert _state(migrated_db) == before


@pytest.mark.parametrize("what", ["edge", "consumer"])
def test_a_benchmark_refuses_a_broker_named_in_mqtt_url(mqtt_url: str, what: str) -> None:
    """MQTT_URL (as compose sets it) is refused too: the fake telemetry of a benchmark never
    reaches a broker that a real consumer might read."""
    done = run_bench(what, MQTT_URL=mqtt_url)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "refusing to write benchmark data into the broker" in done.stderr


def test_a_scratch_database_said_so_gets_the_benchmark(migrated_db: str) -> None:
    """--yes-really on a scratch database: the storage benchmark runs there and prints figures."""
    done = run_bench("storage", "--database-url", migrated_db, "--yes-really", "--samples", "20000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "writer:" in done.stdout
    assert query(migrated_db, "SELECT count(*) FROM vehicle_state")[0][0] > 0


def test_the_storage_benchmark_starts_its_own_database_by_default() -> None:
    """Without a URL the storage benchmark migrates a PostgreSQL of its own and measures there."""
    done = run_bench("storage", "--samples", "20000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "private PostgreSQL" in done.stderr
    assert "writer:" in done.stdout


@pytest.mark.parametrize("fold_every", ["0", "10"])
def test_the_insight_benchmark_runs_on_its_own_database_in_both_modes(fold_every: str) -> None:
    """The insight benchmark (concurrent fold, and in line every N samples) runs on a PostgreSQL
    of its own and prints its comparison with trips derived."""
    done = run_bench(
        "insight", "--vehicles", "5", "--seconds", "40", "--per-write", "50", "--rounds", "1",
        "--fold-every", fold_every,
    )
    assert done.returncode == 0, done.stderr
    assert "writer, insight off:" in done.stdout
    assert "trips derived" in done.stdout
    assert "CPU per sample (this process + database server): insight off" in done.stdout
    assert " nan " not in done.stdout  # the private server's CPU was read


def test_the_consumer_benchmark_runs_on_its_own_broker_and_database() -> None:
    """The consumer benchmark, small, with one and two workers and both contract versions: its
    own Mosquitto and PostgreSQL, a row per worker count and version beside the COPY baseline."""
    done = run_bench(
        "consumer", "--samples", "2000", "--per-message", "10", "--vehicles", "20",
        "--workers", "1,2", "--wire", "1,2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs a plain staged COPY" in done.stdout
    assert "COPY" in done.stdout
    assert "2 v2" in done.stdout
    # Where the time goes: the private broker's and database server's CPU were read.
    header = next(line for line in done.stdout.splitlines() if "samples/s" in line)
    assert header.split()[-3:] == ["broker", "db", "commit<="]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("  10 ")]
    assert rows
    assert "nan" not in {cell for row in rows for cell in row}


def test_the_api_benchmark_runs_on_its_own_database() -> None:
    """The API benchmark, small: live status and export figures beside their baselines."""
    done = run_bench(
        "api", "--vehicles", "50", "--status-requests", "200", "--concurrency", "4",
        "--export-rows", "5000",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HTTP GET /status" in done.stdout
    assert "baseline: COPY TO STDOUT csv" in done.stdout
