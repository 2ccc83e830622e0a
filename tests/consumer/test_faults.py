"""The consumer under faults: kill -9, a shared group, a database outage, hostile input."""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import msgspec
import pytest

from revline.contract import Batch, Sample, encode, encode_json, telemetry_topic
from revline.storage.migrate import TABLE as MIGRATIONS_TABLE
from tests.fixtures.consumer import (
    ROOT,
    AckListener,
    ConsumerFactory,
    PublisherFactory,
    StreamPublisher,
    cold_counts,
    make_batches,
    query,
)
from tests.fixtures.services import MosquittoFactory, PostgresService, wait_until


def test_kill_9_mid_stream_then_restart_stores_every_sample_exactly_once(
    mqtt_url: str, database_url: str, unique_vin: str, make_consumer: ConsumerFactory
) -> None:
    """SIGKILL of the consumer during a 200k-sample stream and a restart lose and double nothing."""
    total = 200_000
    stream = StreamPublisher(mqtt_url, make_batches(unique_vin, total, per_message=500))
    consumer = make_consumer(args=["--batch-max-samples", "5000"])
    stream.start()
    wait_until(
        lambda: cold_counts(database_url, unique_vin)[0] >= 40_000, what="40k samples stored"
    )
    consumer.kill()
    stored_at_kill = cold_counts(database_url, unique_vin)[0]
    assert stored_at_kill < total  # the kill really was mid-stream
    consumer.start()
    stream.finish()
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= total, what="all samples stored")
    time.sleep(1)  # let any redelivered duplicate land, to be sure it is not inserted
    assert cold_counts(database_url, unique_vin) == (total, total)


def test_shared_group_splits_the_load_and_survives_killing_one_member(
    mqtt_url: str, database_url: str, unique_vin: str, make_consumer: ConsumerFactory
) -> None:
    """Two consumers in one group both commit samples; kill -9 of one and its restart lose none."""
    total = 100_000
    group = f"g{unique_vin.lower()}"
    stream = StreamPublisher(mqtt_url, make_batches(unique_vin, total, per_message=250))
    args = ["--group", group, "--batch-max-samples", "2500"]
    first = make_consumer(client_id=f"a-{unique_vin}", args=args)
    second = make_consumer(client_id=f"b-{unique_vin}", args=args)
    stream.start()
    wait_until(
        lambda: cold_counts(database_url, unique_vin)[0] >= 30_000, what="30k samples stored"
    )
    first_share = first.metric("revline_consumer_samples_total")
    second_share = second.metric("revline_consumer_samples_total")
    assert first_share > 0
    assert second_share > 0
    second.kill()
    assert cold_counts(database_url, unique_vin)[0] < total
    second.start()
    stream.finish()
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= total, what="all samples stored")
    time.sleep(1)
    assert cold_counts(database_url, unique_vin) == (total, total)
    assert "$share/" + group + "/telemetry/+" in first.log_text()


def test_database_outage_is_waited_out_with_bounded_memory(
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    fresh_postgres: PostgresService,
    make_consumer: ConsumerFactory,
) -> None:
    """PostgreSQL stopped for 30 s mid-stream: nothing lost, RSS flat, the consumer resumes."""
    total = 300_000
    stream = StreamPublisher(mqtt_url, make_batches(unique_vin, total, per_message=500), tick=0.1)
    consumer = make_consumer(
        args=[
            *("--receive-maximum", "40", "--batch-max-samples", "10000"),
            *("--retry-max-s", "2", "--statement-timeout-s", "5"),
        ]
    )
    stream.start()
    wait_until(
        lambda: cold_counts(database_url, unique_vin)[0] >= 30_000, what="30k samples stored"
    )
    fresh_postgres.stop()
    outage_started = time.monotonic()
    received_before = consumer.metric("revline_consumer_messages_total")
    rss = [consumer.rss_kib()]
    while time.monotonic() - outage_started < 30:
        time.sleep(0.5)
        rss.append(consumer.rss_kib())
        assert consumer.process is not None
        assert consumer.process.poll() is None
    received_during = consumer.metric("revline_consumer_messages_total") - received_before
    assert consumer.http("/healthz")[0] == 503
    # 30 s of outage: our own line, rate-limited (each kind of error once per 10 s: the few
    # kinds of a shutdown, then "refused" 4 times; a line per retry would be 15 or more),
    # and no library traceback.
    log = consumer.log_text()
    assert 2 <= log.count("database outage") <= 10, log.count("database outage")
    assert "Traceback" not in log
    stream.finish()  # the broker took every message while the database was away
    fresh_postgres.start()
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= total, what="all samples stored")
    time.sleep(1)
    assert cold_counts(database_url, unique_vin) == (total, total)
    wait_until(lambda: consumer.http("/healthz")[0] == 200, what="healthy again")
    # The consumer took at most receive_maximum messages (plus what was in hand) while it could
    # not commit, however many the broker queued; so its memory did not follow the backlog.
    assert received_during <= 40 + 40
    second_half = rss[len(rss) // 2 :]
    assert max(second_half) - rss[len(rss) // 2] < 20 * 1024, repr(rss)
    assert max(rss) < 300 * 1024, rss


def test_unacked_messages_stay_on_the_broker_until_commit(
    database_url: str,
    unique_vin: str,
    fresh_postgres: PostgresService,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Messages received while the database is down are not PUBACKed: after kill -9 they return."""
    batches = make_batches(unique_vin, 5_000, per_message=500)
    consumer = make_consumer(args=["--retry-max-s", "1", "--statement-timeout-s", "5"])
    fresh_postgres.stop()
    make_publisher().publish_batches(batches)
    wait_until(
        lambda: consumer.metric("revline_consumer_messages_total") == len(batches),
        what="all messages in the consumer's hands",
    )
    wait_until(
        lambda: consumer.metric("revline_consumer_db_errors_total") >= 4,
        what="failed writes, retried",
    )
    assert consumer.http("/healthz")[0] == 503
    assert "Traceback" not in consumer.log_text()  # asyncpg's pool used to print one a second
    consumer.kill()
    fresh_postgres.start()
    assert cold_counts(database_url, unique_vin) == (0, 0)
    consumer.start()
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= 5_000, what="all samples stored")
    assert cold_counts(database_url, unique_vin) == (5_000, 5_000)


def _hostile_messages(vin: str, count: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """``count`` bad messages of many kinds, each with the topic it is sent to."""
    topic = telemetry_topic(vin)
    now = int(time.time() * 1e6)
    good = encode(Batch(v=1, vin=vin, batch=1, samples=[Sample(ts=now, seq=1, speed=1.0)]))
    kinds: list[Callable[[int], tuple[str, bytes]]] = [
        lambda i: (topic, rng.randbytes(rng.randint(1, 400))),
        lambda i: (topic, good[: rng.randint(1, len(good) - 1)]),
        lambda i: (
            topic,
            msgspec.msgpack.encode({"v": 1, "vin": vin, "batch": "x", "samples": []}),
        ),
        lambda i: (
            topic,
            msgspec.msgpack.encode(
                {
                    "v": 1,
                    "vin": vin,
                    "batch": i,
                    "samples": [{"ts": now, "seq": 1, "rpm": math.nan}],
                }
            ),
        ),
        lambda i: (
            topic,
            msgspec.msgpack.encode(
                {"v": 1, "vin": vin, "batch": i, "samples": [{"ts": now, "seq": 1}] * 6_000}
            ),
        ),
        lambda i: (
            topic,
            encode(Batch(v=1, vin="2HGCM82633A004352", batch=i, samples=[Sample(ts=now, seq=i)])),
        ),
        lambda i: (topic, msgspec.msgpack.encode({"v": 99, "vin": vin, "batch": i, "samples": []})),
        lambda i: (
            topic,
            encode(Batch(v=1, vin=vin, batch=10**6 + i, samples=[Sample(ts=now + 10**12, seq=i)])),
        ),
        lambda i: (topic, b'{"hello": "world", "v": 1}'),
        lambda i: (topic, b"{" * 5_000),
        lambda i: ("telemetry/not-a-vin", good),
        lambda i: (topic, b""),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def test_hostile_messages_are_dead_lettered_and_valid_ones_stored(
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """1,000 bad messages among valid ones: each is in `rejected` with a reason, none stop us."""
    rng = random.Random(4)
    bad = _hostile_messages(unique_vin, 1_000, rng)
    good = [(telemetry_topic(b.vin), encode(b)) for b in make_batches(unique_vin, 50_000, 100)]
    encoded_json = encode_json(make_batches(unique_vin, 10, 10, first_batch=900_000)[0])
    messages = bad + good
    rng.shuffle(messages)
    consumer = make_consumer()
    pub = make_publisher()
    infos = [pub.publish(topic, payload) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(60)
    wait_until(
        lambda: consumer.metric("revline_consumer_messages_total") >= len(messages),
        what="every message received",
    )
    wait_until(
        lambda: query(database_url, "SELECT count(*) AS n FROM rejected")[0]["n"] >= 1_000,
        what="1000 rejected rows",
    )
    assert cold_counts(database_url, unique_vin) == (50_000, 50_000)
    rows = query(database_url, "SELECT reason, count(*) AS n FROM rejected GROUP BY reason")
    reasons = {row["reason"]: row["n"] for row in rows}
    assert sum(reasons.values()) == 1_000, reasons
    assert set(reasons) >= {
        "undecodable",
        "invalid",
        "vin_mismatch",
        "unsupported_version",
        "future_timestamp",
        "bad_topic",
    }, reasons
    empty = query(database_url, "SELECT count(*) AS n FROM rejected WHERE detail = ''")
    assert empty[0]["n"] == 0
    assert consumer.process is not None
    assert consumer.process.poll() is None
    assert consumer.healthy()
    # Rejections are logged with their reason, but a flood is capped, not 1,000 lines.
    logged = consumer.log_text().count("message rejected")
    assert 10 <= logged < 1_000
    assert "message rejected topic=" in consumer.log_text()
    # A JSON batch, as published by hand with mosquitto_pub, is accepted too.
    pub.publish(telemetry_topic(unique_vin), encoded_json).wait_for_publish(30)
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] == 50_000 + 10, what="JSON batch")


def test_subscription_is_restored_when_the_broker_lost_the_session(
    database_url: str,
    unique_vin: str,
    make_mosquitto: MosquittoFactory,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """After a broker kill -9 (session lost), the consumer resubscribes and stores new data."""
    broker = make_mosquitto()
    consumer = make_consumer(mqtt_url=broker.url)
    make_publisher(broker.url).publish_batches(make_batches(unique_vin, 1_000, first_batch=0))
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] == 1_000, what="first 1k")
    broker.kill()
    broker.start()
    wait_until(consumer.healthy, what="reconnected")
    wait_until(lambda: "session_present=False" in consumer.log_text(), what="fresh session")
    make_publisher(broker.url).publish_batches(
        make_batches(unique_vin, 1_000, first_batch=100, t0=int(time.time() * 1e6))
    )
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] == 2_000, what="second 1k")


def test_sigterm_while_the_database_is_down_exits_zero_and_loses_nothing(
    database_url: str,
    unique_vin: str,
    fresh_postgres: PostgresService,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """A stop that cannot commit gives up after the timeout, unacked; the next run stores it all."""
    batches = make_batches(unique_vin, 4_000, per_message=500)
    consumer = make_consumer(
        args=["--shutdown-timeout-s", "2", "--retry-max-s", "1", "--statement-timeout-s", "5"]
    )
    fresh_postgres.stop()
    make_publisher().publish_batches(batches)
    wait_until(
        lambda: consumer.metric("revline_consumer_db_errors_total") >= 1, what="a failed write"
    )
    assert consumer.terminate() == 0
    assert "shutdown timeout" in consumer.log_text()
    fresh_postgres.start()
    consumer.start()
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= 4_000, what="all samples stored")
    assert cold_counts(database_url, unique_vin) == (4_000, 4_000)


T0_US = 1_717_243_200_000_000
"""2024-06-01T12:00:00Z: test data is stamped from this instant, never from the wall clock."""

ACCEPT_T0 = ("--max-age-s", str(100 * 365 * 86_400))
"""The consumer refuses samples older than ``max_age_s`` behind its clock (``too_old``); the tests
stamped from :data:`T0_US` lift that limit so their data stays storable whatever the date."""


def _revline(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``revline`` command to its end; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "revline.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("case", "code", "expected"),
    [
        ("missing database", 1, 'database "t_never_created" does not exist (SQLSTATE 3D000)'),
        ("unknown login", 1, 'login refused: role "t_nobody" does not exist (SQLSTATE 28000)'),
        ("not migrated", 1, "database is not migrated: run `revline migrate`"),
        ("metrics port taken", 2, "metrics_port: cannot listen on 127.0.0.1:"),
    ],
)
def test_consumer_says_in_one_line_why_it_cannot_start(
    postgres: PostgresService, database_url: str, case: str, code: int, expected: str
) -> None:
    """A database that waiting cannot fix, or a taken metrics port, stops `revline consumer`
    at once: one line on stderr naming the cause, no traceback, a non-zero exit."""
    server = urlsplit(postgres.url).netloc.split("@")[-1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        urls = {
            "missing database": postgres.database_url("t_never_created"),
            "unknown login": f"postgresql://t_nobody@{server}/postgres",
            "not migrated": database_url,
            "metrics port taken": database_url,
        }
        port = taken.getsockname()[1] if case == "metrics port taken" else 0
        result = _revline(
            "consumer",
            *("--database-url", urls[case]),
            *("--mqtt-url", "mqtt://127.0.0.1:1"),  # never reached: each case stops before
            *("--metrics-host", "127.0.0.1", "--metrics-port", str(port)),
        )
    assert result.returncode == code
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("revline consumer: ")
    assert expected in result.stderr


@contextlib.contextmanager
def _consumer_login(database_url: str, *, revoke: str) -> Iterator[tuple[str, str]]:
    """A role of its own for the consumer, owning nothing, granted exactly what the consumer
    needs except ``revoke`` (e.g. ``INSERT ON samples``): yields (its URL, the GRANT that
    mends it). Dropped afterwards (roles belong to the whole server)."""
    role = f"t_consumer_{secrets.token_hex(4)}"
    query(database_url, f"CREATE ROLE {role} LOGIN")
    try:
        for grant in (
            f"SELECT ON {MIGRATIONS_TABLE}",
            "SELECT, INSERT ON samples",  # SELECT: ON CONFLICT (vin, ts, seq) reads the key
            "SELECT, INSERT, UPDATE ON vehicle_state",
            "INSERT ON rejected",
            # insight (sql/008_insight.sql): marks and trouble codes in each write, the fold after
            "SELECT, INSERT, UPDATE, DELETE ON insight_dirty, dtc_reports, dtc_events, trips, "
            "odometer_history, vehicle_events, vehicle_activity, insight_checkpoints",
            # revline.audit: accounting in every write, and its task's tables
            "SELECT, INSERT, UPDATE, DELETE ON audit_vehicles, audit_ranges, audit_gaps, "
            "audit_losses, audit_status, audit_broker",
        ):
            query(database_url, f"GRANT {grant} TO {role}")
        query(database_url, f"REVOKE {revoke} FROM {role}")
        url = urlsplit(database_url)
        yield (
            url._replace(netloc=f"{role}@{url.netloc.split('@')[-1]}").geturl(),
            f"GRANT {revoke} TO {role}",
        )
    finally:
        query(database_url, f"DROP OWNED BY {role}")
        query(database_url, f"DROP ROLE {role}")


@pytest.mark.parametrize(
    ("revoke", "recovery", "maintenance_every_s"),
    [
        ("INSERT ON vehicle_state", "kill -9, GRANT, restart", "0"),
        ("INSERT ON samples", "GRANT while running", "0"),
        ("INSERT ON rejected", "GRANT while running", "0.5"),
    ],
)
def test_a_missing_privilege_is_an_outage_not_bad_data(
    database_url: str,
    unique_vin: str,
    revoke: str,
    recovery: str,
    maintenance_every_s: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Without a privilege it needs, the consumer dead-letters nothing, acks nothing (neither
    PUBACK nor ack/<vin>), says why in one line and turns /healthz red; after the GRANT every
    sample is stored exactly once and every batch acked. Maintenance, which this role may not
    do, is postponed with a line, never a crash; 0 turns it off."""
    batches = make_batches(unique_vin, 2_000, per_message=500, t0=T0_US)
    garbage = (telemetry_topic(unique_vin), b"\xc1 not a batch")  # a real dead letter, first
    table = revoke.rsplit(maxsplit=1)[-1]
    with _consumer_login(database_url, revoke=revoke) as (login_url, grant):
        consumer = make_consumer(
            database_url=login_url,
            args=["--maintenance-every-s", maintenance_every_s, "--retry-max-s", "1", *ACCEPT_T0],
        )
        pub = make_publisher()
        started = time.monotonic()
        pub.publish(*garbage).wait_for_publish(30)
        pub.publish_batches(batches)
        wait_until(
            lambda: consumer.metric("revline_consumer_db_errors_total") >= 3,
            what="the write failing and retried",
            timeout=30,
        )
        wait_until(lambda: consumer.http("/healthz")[0] == 503, what="health red")
        assert query(database_url, "SELECT count(*) AS n FROM rejected")[0]["n"] == 0
        if table != "rejected":  # a dead letter comes after its batch's samples commit
            assert cold_counts(database_url, unique_vin) == (0, 0)
        assert ack_listener.seen() == []
        assert consumer.metric("revline_consumer_batches_total") == 0
        log = consumer.log_text()
        most = 1 + int((time.monotonic() - started) // 10)  # rate-limited: one per 10 s
        outage = [line for line in log.splitlines() if "database outage" in line]
        assert 1 <= len(outage) <= most, outage
        assert "sqlstate=42501" in outage[0]
        assert f"permission denied for table {table}" in outage[0]
        assert "Traceback" not in log
        postponed = log.count("storage maintenance postponed error='42501")
        assert (postponed == 0) if maintenance_every_s == "0" else (1 <= postponed <= most)
        if recovery.startswith("kill"):
            consumer.kill()  # whatever it had PUBACKed without storing would be lost now
            query(database_url, grant)
            consumer.start()
        else:
            query(database_url, grant)
        wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= 2_000, what="all stored")
        wait_until(lambda: sorted(set(ack_listener.seen())) == [0, 1, 2, 3], what="e2e acks")
        wait_until(lambda: consumer.http("/healthz")[0] == 200, what="health green")
        assert cold_counts(database_url, unique_vin) == (2_000, 2_000)
        rows = query(database_url, "SELECT reason, payload FROM rejected")
        assert [(r["reason"], bytes(r["payload"])) for r in rows] == [("undecodable", garbage[1])]
        if not recovery.startswith("kill"):
            assert "database usable again" in consumer.log_text()
        consumer.close()  # before its login is dropped


def test_lag_comes_from_stored_samples_and_is_never_negative(
    database_url: str,
    unique_vin: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """A dead-lettered batch dated far in the future leaves lag_s alone (never negative); a
    stored batch from the past sets it."""
    future = make_batches(unique_vin, 10, 10, first_batch=7, t0=7_000_000_000_000_000)  # 2191
    past = make_batches(unique_vin, 10, 10, first_batch=8, t0=T0_US)
    consumer = make_consumer(args=ACCEPT_T0)
    pub = make_publisher()
    pub.publish_batches(future)
    wait_until(lambda: ack_listener.seen() == [7], what="the future batch acked")
    assert query(database_url, "SELECT reason FROM rejected")[0]["reason"] == "future_timestamp"
    assert consumer.metric("revline_consumer_lag_seconds") == 0
    pub.publish_batches(past)
    wait_until(lambda: ack_listener.seen() == [7, 8], what="the past batch acked")
    assert consumer.metric("revline_consumer_lag_seconds") > 0


def test_a_trigger_refusing_every_row_is_an_outage_not_bad_data(
    database_url: str,
    unique_vin: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """A data-class error (22023) that every write raises, a probe write included, is the
    deployment's fault: nothing is dead-lettered or acked until the trigger is fixed, then
    every sample is stored once."""
    query(
        database_url,
        "CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'broken trigger' USING ERRCODE = '22023'; END $$",
    )
    query(
        database_url,
        "CREATE TRIGGER refuse_all BEFORE INSERT ON samples "
        "FOR EACH ROW EXECUTE FUNCTION refuse_all()",
    )
    batches = make_batches(unique_vin, 1_000, per_message=250, t0=T0_US)
    consumer = make_consumer(args=["--retry-max-s", "1", *ACCEPT_T0])
    make_publisher().publish_batches(batches)
    wait_until(
        lambda: consumer.metric("revline_consumer_db_errors_total") >= 3,
        what="writes failing and retried",
        timeout=30,
    )
    wait_until(lambda: consumer.http("/healthz")[0] == 503, what="health red")
    assert "writing its messages one by one" in consumer.log_text()
    assert query(database_url, "SELECT count(*) AS n FROM rejected")[0]["n"] == 0
    assert ack_listener.seen() == []
    query(database_url, "DROP TRIGGER refuse_all ON samples")
    wait_until(lambda: sorted(set(ack_listener.seen())) == [0, 1, 2, 3], what="e2e acks")
    assert cold_counts(database_url, unique_vin) == (1_000, 1_000)
    assert query(database_url, "SELECT count(*) AS n FROM rejected")[0]["n"] == 0


def test_a_backlog_right_behind_the_connack_is_acked_on_its_connection(
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Messages queued on the broker while the consumer was away arrive right behind its CONNACK
    (often in the same read); they are acked on that connection: with a Receive Maximum of 5, a
    backlog of 200 drains only if each window of 5 is PUBACKed."""
    consumer = make_consumer(args=["--receive-maximum", "5", "--batch-max-age-ms", "20"])
    assert consumer.terminate() == 0
    make_publisher().publish_batches(make_batches(unique_vin, 200, per_message=1))
    consumer.start()
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] == 200, what="the backlog stored")
    assert "disconnected from broker" not in consumer.log_text()
