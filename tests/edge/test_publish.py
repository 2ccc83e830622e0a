"""The edge service against a real Mosquitto: delivery, broker outage, kill -9 of either side."""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from revline.edge.spool import Spool, SpoolReader
from tests.fixtures.edge import (
    all_durable,
    edge_settings,
    published,
    running_acker,
    running_edge,
    spool_read,
    spooled,
    spooled_so_far,
)
from tests.fixtures.services import MosquittoService, wait_until

# The issue asks for a 2-minute outage: long enough for paho's reconnect backoff to reach its
# ceiling and for a backlog of ~12k samples. REVLINE_EDGE_OUTAGE_S shortens it while iterating.
OUTAGE_S = float(os.environ.get("REVLINE_EDGE_OUTAGE_S", "120"))


def test_sim_samples_reach_the_broker_once_and_are_acked(
    tmp_path: Path, mqtt_url: str, unique_vin: str
) -> None:
    """Simulated samples arrive as valid batches, every seq exactly once, all acked in the spool."""
    settings = edge_settings(tmp_path, unique_vin, mqtt_url)
    with running_acker(mqtt_url, unique_vin) as acker:
        with running_edge(settings):
            wait_until(
                lambda: len(acker.seqs()) >= 300, what="300 samples at the acker", timeout=60
            )
        total = spooled(settings.spool_path)
        wait_until(
            lambda: len(acker.seqs()) >= total, what="every spooled sample at the acker", timeout=30
        )
    seqs = acker.seqs()
    assert sorted(seqs) == list(range(total))  # each once: no loss, no duplicate
    sample = acker.snapshot()[0].samples[0]
    assert sample.rpm is not None
    assert sample.speed is not None
    assert sample.ts > 1_600_000_000_000_000
    assert all_durable(settings.spool_path)


def test_broker_outage_loses_nothing_and_sends_live_data_first(
    tmp_path: Path, fresh_mosquitto: MosquittoService, unique_vin: str
) -> None:
    """With the broker down the edge spools; after, the newest batch goes first, then backlog."""
    url = fresh_mosquitto.url
    settings = edge_settings(tmp_path, unique_vin, url, ack_timeout_s=5.0)
    path = settings.spool_path
    with running_acker(url, unique_vin, persistent=True) as acker:
        with running_edge(settings):
            wait_until(
                lambda: len(acker.seqs()) >= 200, what="samples before the outage", timeout=60
            )
            fresh_mosquitto.stop()
            time.sleep(3)  # the edge has noticed: no batch is created while disconnected
            last_id = spool_read(path, SpoolReader.next_batch) - 1
            seq_down = spooled(path) - 1
            time.sleep(OUTAGE_S)
            backlog = spooled(path) - 1 - seq_down
            assert backlog >= 500  # sampling went on while the broker was away
            fresh_mosquitto.start()
            wait_until(
                lambda: all_durable(path) and len(set(acker.seqs())) >= seq_down + backlog,
                what="the backlog to drain",
                timeout=120,
            )
        total = spooled(path)
        wait_until(lambda: len(set(acker.seqs())) >= total, what="the last samples", timeout=30)
        arrivals = acker.snapshot()
    assert sorted(set(acker.seqs())) == list(range(total))
    after = [b for b in arrivals if b.batch > last_id]
    live, first_backlog = after[0], after[1]
    assert live.samples[0].seq > seq_down  # samples from the end of the outage
    assert live.samples[-1].seq > seq_down + backlog - 100  # ... indeed the newest
    assert first_backlog.samples[0].seq <= seq_down + 1  # then the oldest unsent
    assert first_backlog.samples[0].seq < live.samples[0].seq


def test_broker_killed_after_puback_before_commit_resends_every_sample(
    tmp_path: Path, fresh_mosquitto: MosquittoService, unique_vin: str
) -> None:
    """A broker crash loses PUBACKed batches; the missing end-to-end ack makes the edge resend."""
    url = fresh_mosquitto.url
    settings = edge_settings(tmp_path, unique_vin, url, ack_timeout_s=3.0)
    path = settings.spool_path
    with running_acker(url, unique_vin) as acker:
        acker.acking = False  # the consumer has not committed anything yet
        with running_edge(settings):
            # PUBACKed to the edge and delivered to the consumer, which has not committed them.
            wait_until(
                lambda: published(path) >= 4 and len(acker.batches) >= 4,
                what="batches PUBACKed and delivered but not acked",
                timeout=60,
            )
            fresh_mosquitto.kill()  # SIGKILL: no persistence written since the last autosave
            fresh_mosquitto.start()
            acker.acking = True
            wait_until(
                lambda: len(acker.batches) > 0 and all_durable(path),
                what="every batch acked",
                timeout=120,
            )
        total = spooled(path)
        wait_until(lambda: len(set(acker.seqs())) >= total, what="the last samples", timeout=30)
        arrivals = acker.snapshot()
    seqs = acker.seqs()
    assert sorted(set(seqs)) == list(range(total))  # nothing lost
    assert len(seqs) > len(set(seqs))  # ... because some batches did come twice
    by_id: dict[int, list[object]] = collections.defaultdict(list)
    for batch in arrivals:
        by_id[batch.batch].append(batch)
    resent = [copies for copies in by_id.values() if len(copies) > 1]
    assert resent
    assert all(c == copies[0] for copies in resent for c in copies)  # same batch, same samples


def test_kill_9_during_heavy_writing_keeps_the_spool_sound(
    tmp_path: Path, mqtt_url: str, unique_vin: str
) -> None:
    """SIGKILL of the edge mid-burst: the spool opens cleanly with every committed sample."""
    path = str(tmp_path / "spool.db")
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.edge", path, unique_vin, mqtt_url, "5000", "0.2"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: spooled_so_far(path) >= 5000, what="a heavy write burst", timeout=90)
        committed = spooled(path)  # rows a reader sees are committed: they must survive
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    seqs = sorted(spool_read(path, SpoolReader.samples))
    assert len(seqs) >= committed
    assert seqs == list(range(len(seqs)))  # contiguous: nothing committed went missing
    with Spool(path) as spool:
        assert spool.next_seq == len(seqs)
    settings = edge_settings(tmp_path, unique_vin, mqtt_url, spool_path=path)
    with running_acker(mqtt_url, unique_vin) as acker, running_edge(settings):
        wait_until(
            lambda: len(set(acker.seqs())) >= len(seqs),
            what="the spool to drain after restart",
            timeout=120,
        )
    assert set(range(len(seqs))) <= set(acker.seqs())


def test_sigterm_flushes_publishes_and_exits_cleanly(
    tmp_path: Path, mqtt_url: str, unique_vin: str
) -> None:
    """On SIGTERM the edge flushes its buffer, publishes what is open, waits for acks, exits 0."""
    path = str(tmp_path / "spool.db")
    with running_acker(mqtt_url, unique_vin) as acker:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.edge", path, unique_vin, mqtt_url, "200", "0.5"],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: len(acker.seqs()) >= 400, what="samples at the acker", timeout=60)
            child.send_signal(signal.SIGTERM)
            _, stderr = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, stderr.decode()[-2000:]
        total = spooled(path)
        assert sorted(acker.seqs()) == list(range(total))
    assert all_durable(path)
