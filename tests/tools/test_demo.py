"""The README's pipeline command: `revline demo` runs everything here and checks for loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from revline.tools.cli import DEMO_FLEET_SIZE
from revline.tools.demo import DEMO_VINS

ROOT = Path(__file__).resolve().parents[2]


def test_demo_survives_a_broker_kill_and_stores_every_sample_once() -> None:
    """Two simulated cars, a broker SIGKILL and a bad message: exit 0, nothing lost or doubled."""
    result = subprocess.run(
        [sys.executable, "-m", "revline.cli", "demo", "--vehicles", "2", "--seconds", "15"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "*** chaos: killing the broker with SIGKILL" in out
    assert "OK: every sample stored exactly once" in out
    assert out.count("lost 0, duplicated 0, not yet acked 0") == 2
    assert "rejected: telemetry/1HGCM82633A004352 invalid" in out
    assert "trips (what `revline trips VIN` lists):" in out  # folded at the end


def test_the_demo_command_offers_exactly_the_demo_fleet() -> None:
    """`revline demo --vehicles` allows as many cars as the demo has VINs."""
    assert len(DEMO_VINS) == DEMO_FLEET_SIZE
