"""The edge's side of the audit (revline.edge.report) on a real SQLite spool, no broker."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from revline.contract import ContractError, decode_status, encode_json
from revline.edge.config import EdgeSettings
from revline.edge.report import Reporter, note_start, note_stop
from revline.edge.spool import DURABLE, Spool, pack_values

VIN: Final = "1HGCM82633A004352"
T0_US: Final = 1_717_243_200_000_000


def _spool(tmp_path: Path, samples: int, batch: int) -> Spool:
    spool = Spool(tmp_path / "spool.db").__enter__()
    spool.write([(T0_US + i * 1000, pack_values({"speed": 1.0}), None) for i in range(samples)])
    while (made := spool.take_backlog(batch)) is not None or (
        made := spool.take_live(batch, 0.0)
    ) is not None:
        spool.mark([made.id], DURABLE)
    return spool


def _settings(tmp_path: Path) -> EdgeSettings:
    return EdgeSettings(vin=VIN, spool_path=str(tmp_path / "spool.db"), clock="trusted")


def test_a_command_queues_the_durable_batches_holding_the_ranges_and_declares_the_rest(
    tmp_path: Path,
) -> None:
    """Ranges the spool holds are resent batch by batch; what it no longer holds is declared."""
    spool = _spool(tmp_path, 100, 10)
    try:
        # As the size cap evicts a durable batch: its rows and the batch go.
        spool.db.execute("DELETE FROM samples WHERE seq BETWEEN 50 AND 59")
        spool.db.execute("DELETE FROM batches WHERE lo = 50")
        reporter = Reporter(_settings(tmp_path), spool)
        reporter.command(b'{"v":1,"vin":"%s","resend":[[15,24],[50,59]]}' % VIN.encode())
        repairs = sorted(reporter.take_repairs())
        status = decode_status(reporter.status(0.0))
    finally:
        spool.close()
    assert [(lo, n) for _, lo, n in repairs] == [(10, 10), (20, 10)]
    assert [(r.lo, r.hi, r.samples) for r in status.not_held] == [(50, 59, 10)]
    assert status.durable_below == 100
    assert status.next_seq == 100
    assert status.backlog == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\x00garbage",
        b'{"v":1,"vin":"2HGCM82633A004353","resend":[[1,2]]}',
        b'{"v":1,"vin":"1HGCM82633A004352","resend":[[9,2]]}',
        b'{"v":1,"vin":"1HGCM82633A004352","resend":[]}',
        b'{"v":1,"vin":"1HGCM82633A004352","resend":[[1,2]],"rm":"-rf"}',
    ],
)
def test_a_bad_command_is_refused_and_asks_for_nothing(tmp_path: Path, payload: bytes) -> None:
    """Undecodable, another car's, a reversed range, none, an unknown field: ContractError."""
    spool = _spool(tmp_path, 20, 10)
    try:
        reporter = Reporter(_settings(tmp_path), spool)
        with pytest.raises(ContractError):
            reporter.command(payload)
        assert reporter.take_repairs() == []
    finally:
        spool.close()


def test_a_start_after_an_unclean_stop_records_a_crash_of_about_one_flush(tmp_path: Path) -> None:
    """A start that finds the spool still running records a crash sized like the last flush;
    a clean stop in between records none."""
    spool = _spool(tmp_path, 0, 10)
    try:
        assert note_start(spool) is None
        spool.write([(T0_US + i, pack_values({"rpm": 900.0}), None) for i in range(37)])
        crash = note_start(spool)  # no note_stop: the process died
        assert crash is not None
        assert (crash.seq, crash.samples) == (37, 37)
        note_stop(spool)
        assert note_start(spool) is None
        status = decode_status(Reporter(_settings(tmp_path), spool).status(0.0))
    finally:
        spool.close()
    assert [(c.seq, c.samples) for c in status.crashes] == [(37, 37)]
    assert status.crash_lost_total == 37
    assert b'"online"' not in encode_json(status)  # online is the default, left out
