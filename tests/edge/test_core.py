"""Edge core without servers: clock model, spool rows and batches, eviction, live-first order."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revline.contract import FLAG_CLOCK_UNSYNCED, decode_batch
from revline.edge.clock import ClockModel
from revline.edge.config import load_edge_settings
from revline.edge.reading import Reading
from revline.edge.sampler import Sampler, clean_values
from revline.edge.spool import (
    DURABLE,
    FIELD_SCALES,
    PUBLISHED,
    Spool,
    SpoolBatch,
    SpoolReader,
    encode_batch,
    pack_values,
    row_to_sample,
)
from revline.edge.status import format_status, read_status
from revline.settings import ConfigError

VIN = "1HGCM82633A004352"
T0 = 1_750_000_000_000_000  # a plausible UTC time in µs


class FakeClock:
    """A clock that starts unsynchronised at 1970 and can be synchronised by the test."""

    def __init__(self) -> None:
        self.mono = 5_000_000_000
        self.wall = 10_000_000_000  # 1970-01-01T00:00:10
        self.synced = False

    def mono_ns(self) -> int:
        return self.mono

    def wall_ns(self) -> int:
        return self.wall

    def synchronized(self) -> bool:
        return self.synced

    def advance(self, ns: int) -> None:
        self.mono += ns
        self.wall += ns


def rows(n: int, start_ts: int = T0) -> list[tuple[int, bytes, int | None]]:
    return [
        (start_ts + i * 100_000, pack_values({"rpm": 800 + i % 50, "speed": i % 90}), None)
        for i in range(n)
    ]


def all_seqs(batches: list[SpoolBatch]) -> list[int]:
    return [r[0] for b in batches for r in b.rows]


def test_values_round_trip_at_sensor_resolution() -> None:
    """Every field survives the spool encoding within half its resolution."""
    values = {
        "speed": 88.8,
        "rpm": 2512.25,
        "coolant": 90.4,
        "intake": -12.0,
        "throttle": 23.14,
        "load": 45.1,
        "maf": 12.37,
        "fuel": 55.29,
        "battery": 13.987,
        "lat": 48.1372684,
        "lon": -11.5754945,
        "alt": 519.3,
        "heading": 359.9,
        "gps_speed": 87.5,
    }
    sample = row_to_sample(7, T0, pack_values(values, {"TIMING_ADVANCE": 12.5}), flagged=False)
    for name, scale in FIELD_SCALES[: len(values)]:  # the fields appended since: test_fields.py
        assert abs(getattr(sample, name) - values[name]) <= 0.5 / scale
    assert sample.extra == {"TIMING_ADVANCE": 12.5}
    assert sample.flags == 0


@given(
    st.dictionaries(
        st.sampled_from([n for n, _ in FIELD_SCALES]), st.floats(0, 50, allow_nan=False)
    )
)
def test_encoding_is_deterministic_and_valid(values: dict[str, float]) -> None:
    """The same row always rebuilds the same bytes, and the consumer's decoder accepts them."""
    data = pack_values(values)
    batch = SpoolBatch(id=3, rows=[(1, T0, data, None)])
    payload = encode_batch(VIN, batch)
    assert payload == encode_batch(VIN, SpoolBatch(id=3, rows=[(1, T0, bytes(data), None)]))
    decoded = decode_batch(payload)
    assert decoded.samples[0].seq == 1
    assert set(values) == {k for k, _ in FIELD_SCALES if getattr(decoded.samples[0], k) is not None}


def test_sampler_drops_values_the_contract_would_reject() -> None:
    """NaN and out-of-range values are dropped one by one, never the whole sample."""
    kept, extra, dropped = clean_values(
        {"rpm": float("nan"), "speed": 50.0, "coolant": 900.0, "bogus": 1.0},
        {"X": float("inf"), "a\x00b": 1.0, "A-B": 2.0, "TIMING_ADVANCE": 12.5},
    )
    assert kept == {"speed": 50.0}
    assert extra == {"TIMING_ADVANCE": 12.5}  # names the contract refuses never reach a batch
    assert sorted(dropped) == ["A-B", "X", "a\x00b", "bogus", "coolant", "rpm"]


def test_bytes_on_disk_per_sample_stay_small(tmp_path: Path) -> None:
    """A typical OBD sample costs well under 100 bytes in the spool file, indexes included."""
    with Spool(tmp_path / "s.db") as spool:
        full = {
            "rpm": 2000.25,
            "speed": 80,
            "throttle": 20.39,
            "load": 40.0,
            "maf": 10.5,
            "coolant": 90,
            "intake": 30,
            "fuel": 55.3,
            "battery": 14.1,
        }
        for _ in range(40):
            spool.write([(T0 + i, pack_values(full), None) for i in range(500)])
        per_sample = spool.used_bytes() / 20_000
    assert per_sample <= 100


def test_sequence_and_batch_ids_survive_reopen(tmp_path: Path) -> None:
    """Sequence numbers and batch ids continue after a restart, even when every row was evicted."""
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        spool.write(rows(10))
        batch = spool.take_backlog(100) or spool.take_live(100, 0.0)
        assert batch is not None
        spool.db.execute("DELETE FROM samples")
        spool.db.execute("DELETE FROM batches")
    with Spool(path) as spool:
        assert spool.next_seq == 10
        assert spool.next_batch == batch.id + 1
        assert spool.write(rows(1)) == 10


def test_live_tail_goes_first_and_backlog_oldest_first(tmp_path: Path) -> None:
    """With a backlog the first batch holds the newest samples, the next ones the oldest."""
    with Spool(tmp_path / "s.db") as spool:
        spool.write(rows(2000))
        assert spool.take_backlog(500) is None  # everything is still the live tail
        live = spool.take_live(500, 60.0)
        assert live is not None
        assert (live.lo, live.hi) == (1500, 1999)
        spool.write(rows(3))
        first = spool.take_backlog(500)
        assert first is not None
        assert (first.lo, first.hi) == (0, 499)
        newest = spool.take_live(500, 0.0)
        assert newest is not None
        assert (newest.lo, newest.hi) == (2000, 2002)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from(["write", "live", "backlog", "reopen"]), st.integers(1, 700)),
        max_size=25,
    )
)
def test_every_sample_lands_in_exactly_one_batch(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    """Whatever the order of writes, takes and restarts, batches partition the samples."""
    path = tmp_path_factory.mktemp("spool") / "s.db"
    batches: list[SpoolBatch] = []
    spool = Spool(path).__enter__()
    try:
        for op, n in ops:
            if op == "write":
                spool.write(rows(n))
            elif op in {"live", "backlog"}:
                taken = spool.take_live(n, 0.0) if op == "live" else spool.take_backlog(n)
                batches.extend([taken] if taken else [])
            elif op == "reopen":
                spool.close()
                spool = Spool(path).__enter__()
        while (b := spool.take_backlog(500) or spool.take_live(500, 0.0)) is not None:
            batches.append(b)
        for b in batches:
            assert [r[0] for r in b.rows] == list(range(b.lo, b.hi + 1))
            stored = spool.load_batch(b.id)
            assert stored is not None
            assert encode_batch(VIN, stored) == encode_batch(VIN, b)
        assert sorted(all_seqs(batches)) == list(range(spool.next_seq))
    finally:
        spool.close()


def test_eviction_takes_durable_rows_first_then_oldest_unsent(tmp_path: Path) -> None:
    """Over the cap, acked batches go first; unsent rows only when nothing else is left, counted."""
    path = tmp_path / "s.db"
    with Spool(path, max_bytes=None) as spool:
        spool.write(rows(5000))
        durable = [spool.take_live(1000, 0.0)]
        durable += [spool.take_backlog(1000) for _ in range(2)]
        ids = [b.id for b in durable if b is not None]
        assert len(ids) == 3
        spool.mark(ids, DURABLE)
        # Cap just under the current size: the durable rows alone make enough room.
        spool.max_bytes = int(spool.used_bytes() * 0.8)
        evicted_durable, evicted_unsent = spool.enforce_cap()
        assert evicted_durable > 0
        assert evicted_unsent == 0
        with SpoolReader(path) as reader:
            left = set(reader.samples())
        assert set(range(2000, 4000)) <= left  # unsent rows untouched
        # A cap far below: durable rows are gone, so the oldest unsent rows go, and are counted.
        spool.max_bytes = int(spool.used_bytes() * 0.3)
        evicted_durable, evicted_unsent = spool.enforce_cap()
        assert evicted_unsent > 0
        with SpoolReader(path) as reader:
            remaining = sorted(reader.samples())
        assert remaining == list(range(remaining[0], 4000))
        assert remaining[0] > 2000
        assert read_status(path).evicted_unsent == evicted_unsent
        # What is left still batches cleanly, starting after the evicted rows.
        batch = spool.take_backlog(500)
        assert batch is not None
        assert batch.lo == remaining[0]


def test_clock_model_trusts_ntp_and_reports_jumps() -> None:
    """The model trusts the clock once synchronised and reports steps of more than a second."""
    model = ClockModel("auto")
    assert model.observe(1_000_000_000, 10_000_000_000, synchronized=False) is None
    assert model.stamp(1_000_000_000, 10_000_000_000) == (10_000_000, False)
    first = model.observe(2_000_000_000, T0 * 1000, synchronized=True)
    assert first is not None
    assert first.first_trust
    assert model.stamp(3_000_000_000, 0) == (T0 + 1_000_000, True)
    assert (
        model.observe(4_000_000_000, T0 * 1000 + 2_000_000_000 + 300_000_000, synchronized=True)
        is None
    )
    jump = model.observe(
        5_000_000_000, T0 * 1000 + 3_000_000_000 + 5_000_000_000, synchronized=True
    )
    assert jump is not None
    assert not jump.first_trust
    assert jump.delta_us == 4_700_000  # offset was T0 - 1.7 s, is now T0 + 3 s


def test_gps_time_makes_the_clock_trusted() -> None:
    """A GPS fix time is enough to trust timestamps when NTP never answers."""
    model = ClockModel("auto")
    jump = model.observe(7_000_000_000, 0, synchronized=False, gps_wall_us=T0)
    assert jump is not None
    assert jump.first_trust
    assert model.source == "gps"
    assert model.stamp(8_000_000_000, 0) == (T0 + 1_000_000, True)


def test_untrusted_samples_wait_and_get_exact_timestamps_after_sync(tmp_path: Path) -> None:
    """Samples taken before NTP sync are held back, then stamped mono + offset exactly."""
    clock = FakeClock()

    async def scenario() -> None:
        with Spool(tmp_path / "s.db", boot_id="boot-a") as spool:
            sampler = Sampler(spool, ClockModel("auto"), clock, flush_interval_s=0.1)
            sampler.check_clock()
            monos = []
            for _ in range(5):
                clock.advance(100_000_000)
                monos.append(clock.mono)
                sampler.add(Reading(mono_ns=clock.mono, values={"rpm": 900.0}))
            await sampler.flush()
            assert spool.take_live(1, 0.0) is None  # held: no trusted time yet
            clock.wall = T0 * 1000  # NTP steps the clock to the real time
            clock.synced = True
            sampler.check_clock()
            clock.advance(100_000_000)
            sampler.add(Reading(mono_ns=clock.mono, values={"rpm": 950.0}))
            await sampler.flush()
            batch = spool.take_live(500, 0.0)
            assert batch is not None
            offset = T0 - (clock.mono - 100_000_000) // 1000
            assert [r[1] for r in batch.rows[:5]] == [m // 1000 + offset for m in monos]
            assert batch.rows[5][1] == T0 + 100_000
            assert all(r[3] is None for r in batch.rows)  # not flagged

    asyncio.run(scenario())


def test_samples_of_a_boot_that_never_synced_are_sent_flagged(tmp_path: Path) -> None:
    """After a reboot without sync, untrusted samples go out flagged, not before trusted ones."""
    path = tmp_path / "s.db"
    with Spool(path, boot_id="boot-a") as spool:
        spool.write(rows(3))  # trusted rows from an earlier, synced period
        spool.write([(10_000_000, pack_values({"rpm": 800.0}), 123_000)])  # 1970, untrusted
    with Spool(path, boot_id="boot-b") as spool:
        batch = spool.take_live(500, 0.0)
        assert batch is not None
        payload = decode_batch(encode_batch(VIN, batch))
    assert [s.flags for s in payload.samples] == [0, 0, 0, FLAG_CLOCK_UNSYNCED]
    assert payload.samples[3].ts >= payload.samples[2].ts


def test_spool_survives_a_torn_open(tmp_path: Path) -> None:
    """The spool file passes SQLite's integrity check after writes and reopen."""
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        spool.write(rows(100))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_bad_config_value_names_the_key() -> None:
    """A wrong value stops the program at start with one line naming the key and the source."""
    with pytest.raises(
        ConfigError, match=r"inflight_max \(env REVLINE_EDGE_INFLIGHT_MAX\): expected int >= 1"
    ):
        load_edge_settings(environ={"REVLINE_EDGE_VIN": VIN, "REVLINE_EDGE_INFLIGHT_MAX": "0"})
    with pytest.raises(ConfigError, match="vin"):
        load_edge_settings(environ={})


def test_status_reports_depth_by_state_and_oldest_unsent(tmp_path: Path) -> None:
    """Status splits the spool into unsent, published and durable and ages the oldest unsent."""
    path = tmp_path / "s.db"
    now_us = T0 + 3_600_000_000
    with Spool(path) as spool:
        spool.write(rows(1500))
        done = spool.take_live(500, 0.0)
        sent = spool.take_backlog(500)
        assert done is not None
        assert sent is not None
        spool.mark([done.id], DURABLE)
        spool.mark([sent.id], PUBLISHED)
    status = read_status(path, now=now_us / 1e6)
    assert (status.samples, status.unsent, status.published, status.durable) == (
        1500,
        500,
        500,
        500,
    )
    # Oldest unsent is seq 500 (0-499 PUBACKed): 50 s after T0 at 10 Hz.
    assert status.oldest_unsent_age_s == pytest.approx(3600 - 50.0)
    assert status.last_ack_age_s is not None
    assert "unsent         500" in format_status(status)
