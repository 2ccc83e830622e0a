"""The wire benchmark's byte counts (deterministic: simulator drives, no clock, no services)."""

from __future__ import annotations

import pytest

from revline.bench.edge import goals_met
from revline.bench.wire import SENT, batching_table, wire_table


def test_what_the_edge_sends_meets_the_issues_goals_on_a_simulator_drive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """v2 as sent is <= 20 B a sample in 1-s batches and <= 10 B in 5-s batches at 10 Hz,
    MQTT header and topic included, and each codec compared is far below v1."""
    rows = wire_table(drives=1, seconds=300)
    assert goals_met(rows)
    by_label = {(row.label, row.seconds): row.bytes_per_sample for row in rows}
    for seconds in (1, 5):
        v1 = by_label["v1 msgpack", seconds]
        assert all(
            b * 10 < v1
            for (label, s), b in by_label.items()
            if s == seconds and label != "v1 msgpack"
        )
        assert by_label[SENT, seconds] == min(b for (_, s), b in by_label.items() if s == seconds)
    assert "wire bytes/sample" in capsys.readouterr().out


def test_longer_batches_never_cost_more_bytes_per_sample() -> None:
    """In the batching table, bytes per sample fall as batches get longer, at every rate."""
    table = batching_table(drives=1, seconds=120)
    for hz in (1.0, 5.0, 10.0):
        sizes = [v2 for rate, _, v2 in table if rate == hz]
        assert sizes == sorted(sizes, reverse=True)
