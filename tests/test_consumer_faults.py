"""The consumer under faults: kill -9, a shared group, a database outage, hostile input."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import msgspec

from revline.contract import Batch, Sample, encode, encode_json, telemetry_topic
from tests.consumer_fixtures import (
    StreamPublisher,
    cold_counts,
    consumer_process,
    make_batches,
    migrate,
    publisher,
    query,
    wait_until,
)
from tests.services import MosquittoFactory, PostgresService


def test_kill_9_mid_stream_then_restart_stores_every_sample_exactly_once(
    mqtt_url: str, database_url: str, unique_vin: str
) -> None:
    """SIGKILL of the consumer during a 200k-sample stream and a restart lose and double nothing."""
    migrate(database_url)
    total = 200_000
    stream = StreamPublisher(mqtt_url, make_batches(unique_vin, total, per_message=500))
    with consumer_process(
        mqtt_url=mqtt_url,
        database_url=database_url,
        client_id=f"c-{unique_vin}",
        args=["--batch-max-samples", "5000"],
    ) as consumer:
        consumer.start()
        stream.start()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= 40_000, what="40k samples stored"
        )
        consumer.kill()
        stored_at_kill = cold_counts(database_url, unique_vin)[0]
        assert stored_at_kill < total  # the kill really was mid-stream
        consumer.start()
        stream.finish()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= total, what="all samples stored"
        )
        time.sleep(1)  # let any redelivered duplicate land, to be sure it is not inserted
        assert cold_counts(database_url, unique_vin) == (total, total)


def test_shared_group_splits_the_load_and_survives_killing_one_member(
    mqtt_url: str, database_url: str, unique_vin: str
) -> None:
    """Two consumers in one group both commit samples; kill -9 of one and its restart lose none."""
    migrate(database_url)
    total = 100_000
    group = f"g{unique_vin.lower()}"
    stream = StreamPublisher(mqtt_url, make_batches(unique_vin, total, per_message=250))
    args = ["--group", group, "--batch-max-samples", "2500"]
    with (
        consumer_process(
            mqtt_url=mqtt_url, database_url=database_url, client_id=f"a-{unique_vin}", args=args
        ) as first,
        consumer_process(
            mqtt_url=mqtt_url, database_url=database_url, client_id=f"b-{unique_vin}", args=args
        ) as second,
    ):
        first.start()
        second.start()
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
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= total, what="all samples stored"
        )
        time.sleep(1)
        assert cold_counts(database_url, unique_vin) == (total, total)
        assert "$share/" + group + "/telemetry/+" in first.log_text()


def test_database_outage_is_waited_out_with_bounded_memory(
    mqtt_url: str, database_url: str, unique_vin: str, fresh_postgres: PostgresService
) -> None:
    """PostgreSQL stopped for 30 s mid-stream: nothing lost, RSS flat, the consumer resumes."""
    migrate(database_url)
    total = 300_000
    stream = StreamPublisher(mqtt_url, make_batches(unique_vin, total, per_message=500), tick=0.1)
    with consumer_process(
        mqtt_url=mqtt_url,
        database_url=database_url,
        client_id=f"c-{unique_vin}",
        args=[
            "--receive-maximum",
            "40",
            "--batch-max-samples",
            "10000",
            "--retry-max-s",
            "2",
            "--statement-timeout-s",
            "5",
        ],
    ) as consumer:
        consumer.start()
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
        stream.finish()  # the broker took every message while the database was away
        fresh_postgres.start()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= total, what="all samples stored"
        )
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
    mqtt_url: str, database_url: str, unique_vin: str, fresh_postgres: PostgresService
) -> None:
    """Messages received while the database is down are not PUBACKed: after kill -9 they return."""
    migrate(database_url)
    batches = make_batches(unique_vin, 5_000, per_message=500)
    with consumer_process(
        mqtt_url=mqtt_url,
        database_url=database_url,
        client_id=f"c-{unique_vin}",
        args=["--retry-max-s", "1", "--statement-timeout-s", "5"],
    ) as consumer:
        consumer.start()
        fresh_postgres.stop()
        with publisher(mqtt_url) as pub:
            pub.publish_batches(batches)
        wait_until(
            lambda: consumer.metric("revline_consumer_messages_total") == len(batches),
            what="all messages in the consumer's hands",
        )
        wait_until(
            lambda: consumer.metric("revline_consumer_db_errors_total") >= 1,
            what="a failed write",
        )
        consumer.kill()
        fresh_postgres.start()
        assert cold_counts(database_url, unique_vin) == (0, 0)
        consumer.start()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= 5_000, what="all samples stored"
        )
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
    mqtt_url: str, database_url: str, unique_vin: str
) -> None:
    """1,000 bad messages among valid ones: each is in `rejected` with a reason, none stop us."""
    migrate(database_url)
    rng = random.Random(4)
    bad = _hostile_messages(unique_vin, 1_000, rng)
    good = [(telemetry_topic(b.vin), encode(b)) for b in make_batches(unique_vin, 50_000, 100)]
    encoded_json = encode_json(make_batches(unique_vin, 10, 10, first_batch=900_000)[0])
    messages = bad + good
    rng.shuffle(messages)
    with (
        consumer_process(
            mqtt_url=mqtt_url, database_url=database_url, client_id=f"c-{unique_vin}"
        ) as consumer,
        publisher(mqtt_url) as pub,
    ):
        consumer.start()
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
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] == 50_000 + 10, what="JSON batch"
        )


def test_subscription_is_restored_when_the_broker_lost_the_session(
    database_url: str, unique_vin: str, make_mosquitto: MosquittoFactory
) -> None:
    """After a broker kill -9 (session lost), the consumer resubscribes and stores new data."""
    broker = make_mosquitto()
    migrate(database_url)
    with consumer_process(
        mqtt_url=broker.url, database_url=database_url, client_id=f"c-{unique_vin}"
    ) as consumer:
        consumer.start()
        with publisher(broker.url) as pub:
            pub.publish_batches(make_batches(unique_vin, 1_000, first_batch=0))
        wait_until(lambda: cold_counts(database_url, unique_vin)[0] == 1_000, what="first 1k")
        broker.kill()
        broker.start()
        wait_until(consumer.healthy, what="reconnected")
        wait_until(lambda: "session_present=False" in consumer.log_text(), what="fresh session")
        with publisher(broker.url) as pub:
            pub.publish_batches(
                make_batches(unique_vin, 1_000, first_batch=100, t0=int(time.time() * 1e6))
            )
        wait_until(lambda: cold_counts(database_url, unique_vin)[0] == 2_000, what="second 1k")


def test_sigterm_while_the_database_is_down_exits_zero_and_loses_nothing(
    mqtt_url: str, database_url: str, unique_vin: str, fresh_postgres: PostgresService
) -> None:
    """A stop that cannot commit gives up after the timeout, unacked; the next run stores it all."""
    migrate(database_url)
    batches = make_batches(unique_vin, 4_000, per_message=500)
    with consumer_process(
        mqtt_url=mqtt_url,
        database_url=database_url,
        client_id=f"c-{unique_vin}",
        args=["--shutdown-timeout-s", "2", "--retry-max-s", "1", "--statement-timeout-s", "5"],
    ) as consumer:
        consumer.start()
        fresh_postgres.stop()
        with publisher(mqtt_url) as pub:
            pub.publish_batches(batches)
        wait_until(
            lambda: consumer.metric("revline_consumer_db_errors_total") >= 1, what="a failed write"
        )
        assert consumer.terminate() == 0
        assert "shutdown timeout" in consumer.log_text()
        fresh_postgres.start()
        consumer.start()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= 4_000, what="all samples stored"
        )
        assert cold_counts(database_url, unique_vin) == (4_000, 4_000)
