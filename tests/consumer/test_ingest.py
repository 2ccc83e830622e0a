"""The consumer against a real broker and database: acks, shutdown, bad input, health, and
saying why it cannot reach the broker."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import msgspec

from revline.contract import encode
from tests.fixtures.consumer import (
    ROOT,
    AckListener,
    ConsumerFactory,
    ConsumerProcess,
    PublisherFactory,
    cold_counts,
    make_batches,
    query,
)
from tests.fixtures.services import MosquittoFactory, MosquittoService, free_port, wait_until


def test_committed_batches_are_acked_end_to_end_even_when_duplicate(
    database_url: str,
    unique_vin: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Each committed batch id is published on ack/<vin>, and a resent batch is acked again."""
    batches = make_batches(unique_vin, 2_000, per_message=500)
    consumer = make_consumer()
    pub = make_publisher()
    pub.publish_batches(batches)
    wait_until(lambda: sorted(ack_listener.seen()) == [0, 1, 2, 3], what="acks of 4 batches")
    assert cold_counts(database_url, unique_vin) == (2_000, 2_000)
    pub.publish_batches(batches[1:2])
    wait_until(lambda: len(ack_listener.seen()) == 5, what="ack of the resent batch")
    assert ack_listener.seen()[-1] == 1
    assert cold_counts(database_url, unique_vin) == (2_000, 2_000)
    assert consumer.metric("revline_consumer_inserted_total") == 2_000
    assert consumer.metric("revline_consumer_samples_total") == 2_500


def test_sigterm_commits_the_batch_in_hand_and_exits_zero(
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """On SIGTERM the samples received but not yet due are committed, then the process exits 0."""
    batches = make_batches(unique_vin, 3_000, per_message=300)
    # A batch that would only close after ten minutes: only shutdown can flush it.
    consumer = make_consumer(
        args=["--batch-max-age-ms", "600000", "--batch-max-samples", "1000000"]
    )
    make_publisher().publish_batches(batches)
    wait_until(
        lambda: consumer.metric("revline_consumer_messages_total") == len(batches),
        what="all messages in the consumer's hands",
    )
    assert cold_counts(database_url, unique_vin) == (0, 0)
    assert consumer.terminate() == 0
    assert cold_counts(database_url, unique_vin) == (3_000, 3_000)
    assert "stopping: committing what was received" in consumer.log_text()


def test_healthz_reports_which_dependency_is_down(make_consumer: ConsumerFactory) -> None:
    """/healthz is 200 with broker and database up, /metrics is Prometheus text."""
    consumer = make_consumer()
    status, body = consumer.http("/healthz")
    assert status == 200
    assert msgspec.json.decode(body) == {"broker": True, "database": True}
    status, body = consumer.http("/metrics")
    assert status == 200
    assert "# TYPE revline_consumer_samples_total counter" in body
    assert consumer.http("/nope")[0] == 404


def test_bad_config_stops_at_start_with_one_line_naming_the_key() -> None:
    """A malformed setting exits 2 at once with one line naming the key."""
    result = subprocess.run(
        [sys.executable, "-m", "revline.cli", "consumer", "--batch-max-samples", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "batch_max_samples" in lines[0]
    assert "flag --batch-max-samples" in lines[0]


def test_a_message_the_database_refuses_is_dead_lettered_and_the_rest_stored(
    database_url: str,
    unique_vin: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """A permanent DB error splits the batch: the refused message goes to `rejected` as db_error."""
    # A rule the contract does not know, enforced by the real database: sequence 666 is refused.
    query(
        database_url,
        "CREATE FUNCTION refuse_666() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.seq = 666 THEN RAISE EXCEPTION 'seq 666 refused' USING ERRCODE = '23514'; END IF; "
        "RETURN NEW; END $$",
    )
    query(
        database_url,
        "CREATE TRIGGER refuse_666 BEFORE INSERT ON samples "
        "FOR EACH ROW EXECUTE FUNCTION refuse_666()",
    )
    batches = make_batches(unique_vin, 2_000, per_message=500)  # seq 666 is in batch 1
    consumer = make_consumer()
    make_publisher().publish_batches(batches)
    wait_until(lambda: sorted(ack_listener.seen()) == [0, 1, 2, 3], what="acks of 4 batches")
    assert cold_counts(database_url, unique_vin) == (1_500, 1_500)
    rows = query(database_url, "SELECT reason, detail, payload FROM rejected")
    assert [row["reason"] for row in rows] == ["db_error"]
    assert "23514" in rows[0]["detail"]
    assert bytes(rows[0]["payload"]) == encode(batches[1])
    assert consumer.healthy()


def test_plain_postgres_maintenance_runs_inside_the_consumer(
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """On plain PostgreSQL the consumer creates today's partitions and keeps the rollups fresh."""
    # The database has the schema only: no partition for today exists yet.
    make_consumer(args=["--maintenance-every-s", "1"])
    make_publisher().publish_batches(make_batches(unique_vin, 1_000))
    wait_until(lambda: cold_counts(database_url, unique_vin) == (1_000, 1_000), what="rows")
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT coalesce(sum(sample_count), 0) AS n FROM samples_1m WHERE vin = $1",
                unique_vin,
            )[0]["n"]
            == 1_000
        ),
        what="the 1-minute rollup to count every sample",
    )
    (row,) = query(database_url, "SELECT count(*) AS n FROM samples_default")
    assert row["n"] == 0  # every row sits in its daily partition


def test_unusable_tls_files_stop_at_start_with_one_line_naming_the_key(tmp_path: Path) -> None:
    """A missing or unreadable --ca-file, --cert-file or --key-file: exit 2, one line, its key."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (["--ca-file", str(tmp_path / "missing.pem")], "ca_file", "No such file"),
        (["--ca-file", str(tmp_path)], "ca_file", "Is a directory"),
        (["--ca-file", str(garbage)], "ca_file", "not a PEM CA bundle"),
        (["--cert-file", str(tmp_path / "missing.crt")], "cert_file", "No such file"),
        (["--cert-file", str(garbage), "--key-file", str(tmp_path / "k")], "key_file", "No such"),
        (["--cert-file", str(garbage)], "cert_file", "not a PEM certificate"),
    ]
    for args, key, why in cases:
        result = subprocess.run(
            [sys.executable, "-m", "revline.cli", "consumer", "--mqtt-url", "mqtts://x", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"config error: {key}: " in lines[0]
        assert why in lines[0]


def _unhealthy(consumer: ConsumerProcess) -> bool:
    return consumer.http("/healthz")[0] == 503


def test_each_failed_broker_connection_is_logged_with_its_reason(
    make_mosquitto: MosquittoFactory, make_consumer: ConsumerFactory
) -> None:
    """Closed port, unknown host, anonymous refused: each logged at once with its reason."""
    locked = make_mosquitto(extra_config=["allow_anonymous false"])
    cases = {
        f"mqtt://127.0.0.1:{free_port()}": "connection refused by 127.0.0.1:",
        "mqtt://no-such-host.invalid:1883": "cannot resolve host 'no-such-host.invalid'",
        locked.url: "refused by the broker: Not authorized",
    }
    # drop=False: none of them reaches its broker, so there is no session to drop.
    consumers = {
        url: make_consumer(mqtt_url=url, start=False, drop=False).launch() for url in cases
    }
    for url, reason in cases.items():
        line = consumers[url].wait_for_log("cannot connect to broker")
        assert reason in line, line
        assert "failed_attempts=1" in line
        assert "Traceback" not in consumers[url].log_text()
    for consumer in consumers.values():
        wait_until(functools.partial(_unhealthy, consumer), what="/healthz 503")


def test_a_broker_that_comes_back_is_reported_once_connected(
    make_consumer: ConsumerFactory, fresh_mosquitto: MosquittoService
) -> None:
    """Broker down at start: failures are logged, then one line on connecting with the count."""
    fresh_mosquitto.stop()
    consumer = make_consumer(mqtt_url=fresh_mosquitto.url, start=False).launch()
    line = consumer.wait_for_log("cannot connect to broker")
    assert "connection refused" in line
    fresh_mosquitto.start()
    back = consumer.wait_for_log(r"connected to broker .*after_failed_attempts=\d+")
    assert int(back.rsplit("after_failed_attempts=", 1)[1].split()[0]) >= 1
    wait_until(consumer.healthy, what="the consumer to be healthy")
