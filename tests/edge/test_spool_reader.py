"""The spool's read-only API: what status and tests may know, without touching its tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from revline.contract import decode_batch
from revline.edge.spool import (
    CREATED,
    DURABLE,
    PUBLISHED,
    Spool,
    SpoolReader,
    SpoolRow,
    encode_batch,
    pack_values,
)

VIN = "1HGCM82633A004352"
T0 = 1_750_000_000_000_000  # test data time, µs: never the wall clock


def rows(n: int) -> list[SpoolRow]:
    return [(T0 + i * 100_000, pack_values({"rpm": 800.0 + i % 50}), None) for i in range(n)]


def test_a_new_spool_reads_as_empty(tmp_path: Path) -> None:
    """A spool nothing was written to: no samples, no batches, the first ids still to come."""
    path = tmp_path / "s.db"
    with Spool(path):
        pass
    with SpoolReader(path) as spool:
        assert (spool.next_seq(), spool.next_batch(), spool.sample_count()) == (0, 0, 0)
        assert (spool.open_batches(), spool.batch_states(), spool.samples()) == (0, {}, {})
        assert spool.samples_by_state() == {}
        assert spool.oldest_unsent_ts() is None
        assert spool.dead_letters() == []


def test_the_reader_sees_samples_batches_and_their_states(tmp_path: Path) -> None:
    """Counts by state, batch states, the next ids and the samples exactly as they are sent."""
    path = tmp_path / "s.db"
    with Spool(path) as writer:
        writer.write(rows(1000))
        live = writer.take_live(300, 0.0)
        old = writer.take_backlog(200)
        new = writer.take_backlog(200)
        assert live is not None
        assert old is not None
        assert new is not None
        writer.mark([live.id], DURABLE)
        writer.mark([old.id], PUBLISHED)
        with SpoolReader(path) as spool:  # while the writer is open, as the service runs
            assert spool.sample_count() == 1000
            assert spool.next_seq() == writer.next_seq == 1000
            assert spool.next_batch() == writer.next_batch == 3
            assert spool.batch_states() == {live.id: DURABLE, old.id: PUBLISHED, new.id: CREATED}
            assert spool.open_batches() == 2
            assert spool.samples_by_state() == {DURABLE: 300, PUBLISHED: 200, CREATED: 200}
            assert spool.oldest_unsent_ts() == rows(1000)[200][0]  # 0-199 PUBACKed
            samples = spool.samples()
        sent = decode_batch(encode_batch(VIN, new)).samples
    assert sorted(samples) == list(range(1000))
    assert [samples[s.seq] for s in sent] == sent


def test_a_missing_spool_is_named(tmp_path: Path) -> None:
    """Reading a spool that does not exist says where it looked, and creates nothing."""
    with pytest.raises(FileNotFoundError, match="no spool at"), SpoolReader(tmp_path / "x.db"):
        pass
    assert not (tmp_path / "x.db").exists()
