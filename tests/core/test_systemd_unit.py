"""The edge's systemd unit: valid, no restart loop on a config error, no bluetooth group needed."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from revline.cli import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "edge" / "revline-edge.service"
BLE_DROP_IN = ROOT / "edge" / "revline-edge.service.d" / "ble.conf"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_the_unit_does_not_restart_on_a_config_error() -> None:
    """RestartPreventExitStatus names the CLI's configuration-error exit code, and nothing else
    that a runtime failure (1) would need to restart."""
    service = _unit(UNIT)["Service"]
    assert service["Restart"] == "always"
    assert service["RestartPreventExitStatus"].split() == [str(EXIT_CONFIG)]


def test_a_bad_config_exits_with_the_code_the_unit_does_not_restart(tmp_path: Path) -> None:
    """`revline edge --config` with a bad value exits EXIT_CONFIG with one line naming the key."""
    config = tmp_path / "edge.toml"
    config.write_text('vin = "1HGCM82633A004352"\nfast_hz = -1\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REVLINE_", "MQTT_URL"))}
    done = subprocess.run(
        [sys.executable, "-m", "revline.cli", "edge", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.splitlines() == [
        f"revline edge: config error: fast_hz (file {config}): expected float > 0.0, got -1"
    ]


def test_the_unit_needs_no_bluetooth_group_and_the_ble_drop_in_adds_it() -> None:
    """A group that does not exist stops a unit (216/GROUP): the unit asks only for dialout;
    the BLE drop-in adds bluetooth for those who use it."""
    assert _unit(UNIT)["Service"]["SupplementaryGroups"].split() == ["dialout"]
    assert _unit(BLE_DROP_IN)["Service"]["SupplementaryGroups"].split() == ["bluetooth"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_unit_and_its_drop_in(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong (ExecStart pointed at a binary that exists
    here, since /opt/revline is the Pi's)."""
    unit = tmp_path / "revline-edge.service"
    unit.write_text(UNIT.read_text().replace("/opt/revline/.venv/bin/revline", "/bin/true"))
    drop_in = tmp_path / "revline-edge.service.d"
    drop_in.mkdir()
    shutil.copy(BLE_DROP_IN, drop_in / "ble.conf")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "revline-edge.service" not in done.stderr, done.stderr
