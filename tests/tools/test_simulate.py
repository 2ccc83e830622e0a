"""`revline simulate` feeds a real consumer: every published sample of every car is stored."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from revline.contract import is_valid_vin
from revline.tools.simulate import fleet_vins
from tests.fixtures.consumer import ConsumerFactory, query
from tests.fixtures.services import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_fleet_vins_are_valid_and_distinct() -> None:
    """Simulated VINs pass the contract's check and never repeat."""
    vins = fleet_vins(1_000, seed=7)
    assert len(set(vins)) == 1_000
    assert all(is_valid_vin(v) for v in vins)


def test_simulated_fleet_lands_in_the_database(
    mqtt_url: str, database_url: str, make_consumer: ConsumerFactory
) -> None:
    """Five cars for three seconds: the cold table holds exactly what the simulator published."""
    make_consumer()
    result = subprocess.run(
        [sys.executable, "-m", "revline.cli", "simulate", "--mqtt-url", mqtt_url,
         "--vehicles", "5", "--hz", "10", "--seconds", "3", "--seed", "42"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    match = re.search(r"published (\d+) samples from 5 cars", result.stdout)
    assert match is not None, result.stdout + result.stderr
    published = int(match.group(1))
    assert published >= 5 * 10 * 3

    def stored() -> int:
        return int(query(database_url, "SELECT count(*) AS n FROM samples")[0]["n"])

    wait_until(lambda: stored() == published, what=f"{published} samples")
    state = query(database_url, "SELECT vin FROM vehicle_state ORDER BY vin")
    assert [r["vin"] for r in state] == sorted(fleet_vins(5, seed=42))
