"""Loss you can see, end to end: the real edge, Mosquitto, consumer and PostgreSQL, and
``revline audit`` naming each loss with its cause and count.

The edge samples with the wall clock here (it is the device under test); the consumer accepts
anything from the last year, so no test depends on how fast the machine is beyond its timeouts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from revline.edge.spool import SpoolReader
from tests.fixtures.audit import (
    FAST_AUDIT,
    ROOT,
    audit,
    gap_states,
    online,
    settled,
    status_stored,
)
from tests.fixtures.consumer import ConsumerFactory, ConsumerProcess, cold_counts, query
from tests.fixtures.edge import (
    StoppableSim,
    edge_settings,
    running_edge,
    spool_read,
    spooled_so_far,
)
from tests.fixtures.services import MosquittoFactory, free_port, wait_until


def test_nothing_lost_says_so_and_exits_0(
    tmp_path: Path, mqtt_url: str, migrated_db: str, make_consumer: ConsumerFactory, unique_vin: str
) -> None:
    """A device that delivered everything: the audit counts it all stored and says nothing
    was lost, exit 0; the consumer stored the device's status."""
    consumer = make_consumer(args=FAST_AUDIT)
    stop = threading.Event()
    settings = edge_settings(tmp_path, unique_vin, mqtt_url, status_every_s=0.5)
    with running_edge(settings, source=StoppableSim(stop, hz=10.0, speedup=10.0)):
        wait_until(lambda: spooled_so_far(settings.spool_path) >= 300, what="samples", timeout=60)
        stop.set()
        wait_until(lambda: settled(settings.spool_path, migrated_db, unique_vin), what="stored")
        try:
            wait_until(lambda: status_stored(migrated_db, unique_vin), what="a status", timeout=10)
        except TimeoutError as exc:
            raise AssertionError(consumer.log_tail(60)) from exc
    total = spool_read(settings.spool_path, SpoolReader.sample_count)
    code, out = audit(migrated_db, unique_vin, "--grace", "0")
    assert code == 0, out
    assert f"stored      {total} samples (seq 0..{total - 1}), 0 duplicates" in out
    assert "0 open (0 samples), 0 repaired (0 samples), 0 lost (0 samples)" in out
    assert out.splitlines()[-1].startswith(f"nothing lost: {total} samples of 1 vehicles")


def test_a_spool_that_evicts_is_named_with_its_count(
    tmp_path: Path, mqtt_url: str, migrated_db: str, make_consumer: ConsumerFactory, unique_vin: str
) -> None:
    """A device offline until its 1 MB spool evicts: once back, the audit names the evicted
    samples, as many as the spool counted, as lost with that cause."""
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    offline = edge_settings(
        tmp_path, unique_vin, nowhere, spool_max_mb=1.0, sim_speedup=400.0, status_every_s=0.5
    )
    stop = threading.Event()
    with running_edge(offline, source=StoppableSim(stop, hz=10.0, speedup=400.0)):
        wait_until(
            lambda: (
                int(spool_read(offline.spool_path, SpoolReader.meta).get("evicted_unsent", 0)) > 0
            ),
            what="the spool evicting",
            timeout=120,
        )
        stop.set()
    evicted = int(spool_read(offline.spool_path, SpoolReader.meta)["evicted_unsent"])
    make_consumer(args=FAST_AUDIT)
    online = edge_settings(tmp_path, unique_vin, mqtt_url, spool_max_mb=1.0, status_every_s=0.5)
    with running_edge(online, source=StoppableSim(threading.Event(), hz=1.0, speedup=1.0)):
        wait_until(
            lambda: settled(online.spool_path, migrated_db, unique_vin),
            what="the backlog stored",
            timeout=120,
        )
        wait_until(lambda: status_stored(migrated_db, unique_vin), what="a status")
    code, out = audit(migrated_db, unique_vin, "--grace", "0")
    assert code == 0, out
    assert f"lost        {evicted} samples evicted by the device's full spool" in out
    assert out.splitlines()[-1].startswith(f"losses named above: {evicted} samples")


def test_a_device_killed_between_flushes_is_named_with_its_estimate(
    tmp_path: Path, mqtt_url: str, migrated_db: str, make_consumer: ConsumerFactory, unique_vin: str
) -> None:
    """kill -9 of the edge with samples in memory: its last will says it is offline; on its next
    start it reports the crash, and the audit names the samples lost to it (an estimate: the
    last flush's size)."""
    make_consumer(args=FAST_AUDIT)
    spool = str(tmp_path / "spool.db")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.edge", spool, unique_vin, mqtt_url, "100", "2.0"],
        cwd=ROOT,
        env={**os.environ},
    )
    try:
        wait_until(lambda: spooled_so_far(spool) >= 150, what="a first flush", timeout=60)
        first = spooled_so_far(spool)
        wait_until(lambda: spooled_so_far(spool) > first, what="a second flush", timeout=60)
        threading.Event().wait(1.0)  # mid-way to the next flush: samples only in memory
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    wait_until(  # its last will: the broker saw the connection die
        lambda: online(migrated_db, unique_vin) is False,
        what="the device's last will",
    )
    settings = edge_settings(tmp_path, unique_vin, mqtt_url, status_every_s=0.5)
    with running_edge(settings, source=StoppableSim(threading.Event(), hz=1.0, speedup=1.0)):
        wait_until(lambda: settled(spool, migrated_db, unique_vin), what="stored", timeout=60)
        wait_until(
            lambda: bool(
                query(migrated_db, "SELECT 1 FROM audit_losses WHERE vin = $1", unique_vin)
            ),
            what="the crash reported",
        )
    estimate = int(spool_read(spool, SpoolReader.meta)["crash_lost"])
    assert estimate > 0
    code, out = audit(migrated_db, unique_vin, "--grace", "0")
    assert code == 0, out
    assert f"lost        {estimate} samples lost to a device crash" in out
    assert "(1 restarts)" in out


def test_a_broker_dropping_past_its_queue_limit_is_named(
    tmp_path: Path,
    migrated_db: str,
    make_consumer: ConsumerFactory,
    make_mosquitto: MosquittoFactory,
    unique_vin: str,
) -> None:
    """A broker with max_queued_messages 2 drops for the consumer while it is away: the audit
    counts the drops from $SYS and names them; the devices' resends leave nothing missing."""
    broker = make_mosquitto(extra_config=["max_queued_messages 2", "sys_interval 1"])
    consumer: ConsumerProcess = make_consumer(
        mqtt_url=broker.url, client_id=f"c-{unique_vin[-6:]}", args=FAST_AUDIT
    )
    assert consumer.terminate() == 0  # away; its session stays and the broker queues for it
    stop = threading.Event()
    settings = edge_settings(
        tmp_path, unique_vin, broker.url, ack_timeout_s=1.0, batch_max_age_s=0.2
    )
    with running_edge(settings, source=StoppableSim(stop, hz=10.0, speedup=20.0)):
        wait_until(
            lambda: "Outgoing messages are being dropped" in broker.logs(),
            what="the broker dropping",
            timeout=60,
        )
        stop.set()
        consumer.start()
        wait_until(lambda: settled(settings.spool_path, migrated_db, unique_vin), what="stored")
        wait_until(
            lambda: bool(query(migrated_db, "SELECT 1 FROM audit_broker WHERE dropped_total > 0")),
            what="the drops counted",
        )
        # A pass that ran before the resends landed opened a gap; the next pass closes it.
        wait_until(
            lambda: not query(migrated_db, "SELECT 1 FROM audit_gaps WHERE state = 'open'"),
            what="the audit's passes to close what the resends filled",
        )
    (dropped,) = query(migrated_db, "SELECT dropped_total FROM audit_broker")[0]
    code, out = audit(migrated_db, "--grace", "0")
    assert code == 0, out
    assert f"{dropped} messages dropped past its queue limit" in out
    assert "broker dropped messages past its queue limit" in consumer.log_text()


def test_a_batch_deleted_from_the_cold_table_is_requested_and_repaired(
    tmp_path: Path, mqtt_url: str, migrated_db: str, make_consumer: ConsumerFactory, unique_vin: str
) -> None:
    """Samples deleted from the cold table by hand: the audit finds the hole, asks the device
    on cmd/<vin>, the device resends them from its spool and the gap ends repaired."""
    consumer = make_consumer(args=FAST_AUDIT)
    stop = threading.Event()
    settings = edge_settings(tmp_path, unique_vin, mqtt_url, status_every_s=0.5)
    with running_edge(settings, source=StoppableSim(stop, hz=10.0, speedup=10.0)):
        wait_until(lambda: spooled_so_far(settings.spool_path) >= 300, what="samples", timeout=60)
        stop.set()
        wait_until(lambda: settled(settings.spool_path, migrated_db, unique_vin), what="stored")
        total = cold_counts(migrated_db, unique_vin)[0]
        query(
            migrated_db,
            "DELETE FROM samples WHERE vin = $1 AND seq BETWEEN 100 AND 149",
            unique_vin,
        )
        wait_until(
            lambda: gap_states(migrated_db, unique_vin) == ["repaired"],
            what="the gap repaired",
            timeout=60,
        )
    (state, lo, hi, missing, requests) = query(
        migrated_db,
        "SELECT state, lo, hi, missing, requests FROM audit_gaps WHERE vin = $1",
        unique_vin,
    )[0]
    assert (state, lo, hi, missing) == ("repaired", 100, 149, 50)
    assert requests >= 1
    assert cold_counts(migrated_db, unique_vin) == (total, total)
    assert "asked a device to resend missing samples" in consumer.log_text()
    code, out = audit(migrated_db, unique_vin, "--grace", "0")
    assert code == 0, out
    assert "1 repaired (50 samples)" in out
    assert out.splitlines()[-1].startswith("nothing lost")
