"""``revline bench audit``: refuses a database it did not make, runs on its own by default."""

from __future__ import annotations

import subprocess

from revline.cli import EXIT_CONFIG
from tests.fixtures.bench import run_bench
from tests.fixtures.consumer import query


def _bench(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_bench("audit", *argv, **env)


def test_the_audit_benchmark_leaves_a_database_it_did_not_make_untouched(migrated_db: str) -> None:
    """Given DATABASE_URL without --yes-really: one line, exit 2, not a database more."""
    before = query(migrated_db, "SELECT datname FROM pg_database ORDER BY 1")
    done = _bench(DATABASE_URL=migrated_db)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert "refusing to write benchmark data into the database" in done.stderr
    assert query(migrated_db, "SELECT datname FROM pg_database ORDER BY 1") == before


def test_the_audit_benchmark_measures_on_and_off_on_a_database_of_its_own() -> None:
    """Without a URL it starts a PostgreSQL, and prints both figures and their ratio."""
    done = _bench("--samples", "20000", "--per-write", "10000", "--vehicles", "50")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "private PostgreSQL" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("writer, 20,000 samples in 2 writes of 10,000 (50 vehicles each)")
    assert "accounting off:" in lines[1]
    assert "accounting on:" in lines[2]
    assert "on/off = " in lines[2]
