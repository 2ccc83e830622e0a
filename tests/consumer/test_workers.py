"""``revline consumer --workers N``: N processes in one shared group behind one command and one
metrics endpoint; a worker killed -9 is restarted under its client id and the broker redelivers
what it had not acked."""

from __future__ import annotations

import os
import re
import secrets
import signal
from pathlib import Path

import pytest

from revline.consumer.config import load_settings, worker_settings
from revline.consumer.metrics import WorkerMetrics
from revline.consumer.subscriber import puback_packets
from revline.consumer.workers import restart_delay
from revline.settings import ConfigError
from tests.fixtures.consumer import (
    ConsumerFactory,
    ConsumerProcess,
    StreamPublisher,
    cold_counts,
    drop_session,
    make_batches,
)
from tests.fixtures.services import PostgresService, wait_until

T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z, µs: test data never comes from the clock
# Samples from 2024 are accepted, and no maintenance pass applies retention to them meanwhile.
ACCEPT_T0 = ("--max-age-s", str(100 * 365 * 86_400), "--maintenance-every-s", "0")


def _workers(consumer: ConsumerProcess) -> list[int]:
    """Pids of the supervisor's worker processes (children of any of its threads)."""
    pids: list[int] = []
    for task in Path(f"/proc/{consumer.pid}/task").glob("*"):
        try:
            pids.extend(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_each_worker_gets_its_own_client_id_and_login() -> None:
    """Worker i is ``<id>-w<i>``, logs in as ``<login>-w<i>`` with the same password, serves no
    endpoint of its own and runs one worker."""
    settings = load_settings(
        environ={"MQTT_URL": "mqtts://revline-consumer-1:p%40ss@broker:8883"},
        flags={"group": "revline", "workers": 3},
    )
    second = worker_settings(settings, 2)
    assert second.effective_client_id == "revline-consumer-1-w2"
    assert second.mqtt_url == "mqtts://revline-consumer-1-w2:p%40ss@broker:8883"
    assert (second.metrics_port, second.workers, second.group) == (0, 1, "revline")
    audited = load_settings(
        environ={"MQTT_URL": "mqtt://revline-consumer-1:p@broker:1883"},
        flags={"group": "g", "workers": 2, "audit_mqtt_url": "mqtt://revline-audit-1:a@broker"},
    )
    # The audit's own login is one client id: worker 1 keeps it, the others account only.
    assert worker_settings(audited, 1).audit_mqtt_url == "mqtt://revline-audit-1:a@broker"
    assert worker_settings(audited, 2).audit_mqtt_url == ""
    anonymous = load_settings(
        environ={}, flags={"group": "g", "workers": 2, "client_id": "c"}
    )
    assert worker_settings(anonymous, 1).mqtt_url == anonymous.mqtt_url
    assert worker_settings(anonymous, 1).effective_client_id == "c-w1"


def test_workers_without_a_group_are_refused_naming_the_key() -> None:
    """Without a shared group every worker would get every message: refused at start."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, flags={"workers": 2, "client_id": "c"})
    assert info.value.key == "workers"
    assert "\n" not in str(info.value)


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly_up_to_a_cap() -> None:
    """Restart delays double from 1 s and stop at 30 s."""
    assert [restart_delay(n) for n in (1, 2, 3, 4, 5, 6, 7, 50)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_worker_killed_9_is_restarted_and_nothing_is_lost_or_doubled(
    mqtt_url: str, database_url: str, unique_vin: str, make_consumer: ConsumerFactory
) -> None:
    """Three workers share a stream; one is SIGKILLed mid-stream, restarted under its client id,
    the broker redelivers what it held unacked: every sample stored exactly once, one endpoint
    sums all workers, SIGTERM stops them all cleanly."""
    total = 60_000
    group = f"g{unique_vin.lower()}"
    stream = StreamPublisher(
        mqtt_url, make_batches(unique_vin, total, per_message=100, t0=T0), per_tick=20
    )
    consumer = make_consumer(
        args=["--workers", "3", "--group", group, "--batch-max-samples", "2000", *ACCEPT_T0]
    )
    workers = _workers(consumer)
    try:
        assert len(workers) == 3
        stream.start()
        wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= 10_000, what="10k stored")
        victim = workers[1]
        os.kill(victim, signal.SIGKILL)
        assert cold_counts(database_url, unique_vin)[0] < total  # the kill was mid-stream
        consumer.wait_for_log(r"worker died; restarting it .* exited=.?signal 9")
        consumer.wait_for_log(r"worker started .*restarts=1")
        wait_until(lambda: len(_workers(consumer)) == 3 and consumer.healthy(), what="3 again")
        stream.finish()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= total, what="every sample stored"
        )
        assert cold_counts(database_url, unique_vin) == (total, total)
        # One endpoint for all: the sum over the workers, the dead one's count included.
        assert consumer.metric("revline_consumer_samples_total") >= total
        _, body = consumer.http("/metrics")
        live = re.findall(r'^revline_consumer_broker_up\{pid="(\d+)"\} 1\.0$', body, re.M)
        assert sorted(map(int, live)) == _workers(consumer)
        now = _workers(consumer)
        assert consumer.terminate() == 0
        assert not any(_alive(pid) for pid in now)
        assert consumer.log_text().count("stopping: committing what was received") >= 3
    finally:
        for i in (1, 2, 3):
            drop_session(mqtt_url, f"{consumer.client_id}-w{i}")


def test_a_worker_that_cannot_use_the_database_stops_all_with_exit_code_1(
    mqtt_url: str, postgres: PostgresService, make_consumer: ConsumerFactory
) -> None:
    """An unmigrated database is not waited for: the workers say so and the command exits 1."""
    name = f"t_workers_unmigrated_{secrets.token_hex(4)}"
    url = postgres.create_database(name)
    try:
        consumer = make_consumer(
            database_url=url, args=["--workers", "2", "--group", "g"], start=False
        )
        consumer.launch()
        assert consumer.process is not None
        assert consumer.process.wait(60) == 1
        assert "database is not migrated" in consumer.log_text()
        assert "worker stopped for good" in consumer.log_text()
    finally:
        postgres.drop_database(name)


def test_a_commits_pubacks_are_the_packets_paho_would_send_in_order() -> None:
    """One write of PUBACKs is, byte for byte, paho's ``ack(mid, 1)`` packets one after another."""
    mids = [1, 258, 65535, 7]
    expected = b"".join(bytes([0x40, 0x02, mid >> 8, mid & 0xFF]) for mid in mids)
    assert puback_packets(mids) == expected
    assert puback_packets([]) == b""


def test_the_endpoint_skips_a_worker_file_being_created(tmp_path: Path) -> None:
    """A worker's metrics file of size 0 (being created) neither fails a scrape nor /healthz."""
    (tmp_path / "gauge_liveall_4242.db").write_bytes(b"")
    (tmp_path / "counter_4242.db").write_bytes(b"")
    metrics = WorkerMetrics(str(tmp_path), expected=1, running=lambda: {4242})
    assert list(metrics.registry.collect()) == []
    assert metrics.healthy == {"broker": False, "database": False}
