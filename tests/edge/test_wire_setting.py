"""Which contract version the edge sends: v2 unless told v1, by file, environment or flag."""

from __future__ import annotations

import pytest

from revline.cli import build_parser, main
from revline.edge.config import EdgeSettings, load_edge_settings
from revline.settings import flag_values

VIN = "1HGCM82633A004352"


def test_the_edge_sends_v2_unless_told_v1_by_environment_or_flag() -> None:
    """Default 2; REVLINE_EDGE_WIRE_VERSION=1 and --wire-version 1 each choose v1."""
    environ = {"REVLINE_EDGE_VIN": VIN}
    assert load_edge_settings(environ=environ).wire_version == 2
    env = load_edge_settings(environ={**environ, "REVLINE_EDGE_WIRE_VERSION": "1"})
    assert env.wire_version == 1
    args = build_parser().parse_args(["edge", "--vin", VIN, "--wire-version", "1"])
    flags = flag_values(args, EdgeSettings)
    assert load_edge_settings(flags=flags, environ={}).wire_version == 1


def test_an_unknown_wire_version_stops_at_start_naming_the_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--wire-version 3 is one line naming wire_version and a non-zero exit, nothing started."""
    assert main(["edge", "--vin", VIN, "--wire-version", "3"]) == 2
    err = capsys.readouterr().err
    assert "wire_version" in err
    assert len(err.strip().splitlines()) == 1
