"""``revline trips`` and ``revline vehicle`` against a real database, and their one-line errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.insight.cli import CommandError, parse_since
from revline.insight.store import Insight
from tests.fixtures.consumer import ROOT
from tests.fixtures.insight import KNOWN_STOPS, NOW, US, as_samples, drive


def _revline(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("DATABASE_URL", None)
    env.pop("REVLINE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "revline.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def _store(database_url: str, vin: str) -> None:
    samples = as_samples(drive(KNOWN_STOPS))
    last = samples[-1]
    samples.append(Sample(ts=last.ts + US, seq=last.seq + 1, speed=0.0, battery=12.4,
                          odometer=None, dtc=["P0420"]))

    async def run() -> None:
        insight = Insight(NOW)
        async with Writer(database_url, derivations=[insight]) as writer:
            await writer.write([Batch(v=1, vin=vin, batch=1, samples=samples)])
            while await insight.catch_up(writer.pool):
                pass

    asyncio.run(run())


def test_trips_prints_a_table_of_the_trips_since_a_time(migrated_db: str, unique_vin: str) -> None:
    """The three trips of the known drive, newest first, with their starts and distances."""
    _store(migrated_db, unique_vin)
    done = _revline("trips", unique_vin, "--since", "2024-06-01", "--database-url", migrated_db)
    assert done.returncode == 0, done.stderr
    starts = [line for line in done.stdout.splitlines() if "2024-06-01 1" in line]
    assert [line.split()[2] for line in starts] == ["13:42:00", "12:37:00", "12:00:00"]
    assert "4.2" in starts[1]  # 300 s at 50 km/h
    later = _revline("trips", unique_vin, "--since", "2024-06-01T13:00", "--database-url",
                     migrated_db)
    assert later.returncode == 0
    assert "13:42:00" in later.stdout
    assert "12:37:00" not in later.stdout


def test_vehicle_prints_state_codes_odometer_and_last_trip(
    migrated_db: str, unique_vin: str
) -> None:
    """The latest values, the active code, the accumulated odometer and the last trip."""
    _store(migrated_db, unique_vin)
    done = _revline("vehicle", unique_vin, "--database-url", migrated_db)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "12.40 V" in text
    assert "P0420" in text
    assert "km (distance)" in text
    assert "2024-06-01 13:42 UTC, 5 min, 4.2 km" in text


def test_errors_are_one_line(migrated_db: str, unique_vin: str) -> None:
    """A bad VIN, a bad --since, an unknown vehicle and an unreachable database: one line each."""
    cases = [
        (("trips", "NOT-A-VIN", "--database-url", migrated_db), 2, "not a VIN"),
        (("trips", unique_vin, "--since", "yesterday", "--database-url", migrated_db), 2,
         "--since"),
        (("vehicle", unique_vin, "--database-url", migrated_db), 2, "no data for"),
        (("vehicle", unique_vin, "--database-url", "postgresql://u@127.0.0.1:1/x"), 1,
         "database unreachable"),
    ]
    for args, code, words in cases:
        done = _revline(*args)
        assert done.returncode == code, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert words in done.stderr
        assert done.stderr.startswith(f"revline {args[0]}: ")


def test_since_takes_relative_and_absolute_times() -> None:
    """7d and 12h count back from now; an ISO time without a zone is UTC."""
    now = datetime(2024, 6, 8, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_since("12h", now) == datetime(2024, 6, 8, 0, 0, tzinfo=UTC)
    assert parse_since("2024-06-01T08:00", now) == datetime(2024, 6, 1, 8, 0, tzinfo=UTC)
    with pytest.raises(CommandError):
        parse_since("soon", now)
