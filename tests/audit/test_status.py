"""The consumer stores device statuses as untrusted input: what does not decode goes to
``rejected`` with its raw bytes, and the next good status is stored all the same."""

from __future__ import annotations

from revline.contract import Status, encode
from tests.fixtures.audit import FAST_AUDIT, status_stored
from tests.fixtures.consumer import ConsumerFactory, PublisherFactory, query
from tests.fixtures.services import wait_until


def test_bad_statuses_are_dead_lettered_with_their_bytes_and_a_good_one_is_stored(
    migrated_db: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
    unique_vin: str,
) -> None:
    """Garbage, another car's VIN, a NUL in a text field and 70 KB land in ``rejected`` (the
    first 64 KiB of the big one); the status after them is stored, then the offline will."""
    make_consumer(args=FAST_AUDIT)
    topic = f"status/{unique_vin}"
    bad = [
        b"\xc1\x00not msgpack",
        encode(Status(v=1, vin="2HGCM82633A004353")),
        b'{"v":1,"vin":"%s","clock":"ok\\u0000"}' % unique_vin.encode(),
        b'{"v":1,"vin":"%s","version":"%s"}' % (unique_vin.encode(), b"x" * 70_000),
    ]
    publisher = make_publisher()
    for payload in bad:
        publisher.publish(topic, payload).wait_for_publish(10)
    good = Status(v=1, vin=unique_vin, backlog=42, next_seq=1000, durable_below=958)
    publisher.publish(topic, encode(good)).wait_for_publish(10)
    wait_until(lambda: status_stored(migrated_db, unique_vin), what="the good status")
    rows = query(
        migrated_db, "SELECT reason, payload FROM rejected WHERE topic = $1 ORDER BY id", topic
    )
    assert [r["reason"] for r in rows] == ["undecodable", "vin_mismatch", "invalid", "too_large"]
    assert [bytes(r["payload"]) for r in rows[:3]] == bad[:3]
    assert bytes(rows[3]["payload"]) == bad[3][: 64 * 1024]
    (row,) = query(
        migrated_db,
        "SELECT online, backlog, durable_below FROM audit_status WHERE vin = $1",
        unique_vin,
    )
    assert tuple(row) == (True, 42, 958)
    publisher.publish(topic, encode(Status(v=1, vin=unique_vin, online=False))).wait_for_publish(10)
    wait_until(
        lambda: (
            not query(migrated_db, "SELECT online FROM audit_status WHERE vin = $1", unique_vin)[0][
                0
            ]
        ),
        what="the device offline",
    )


def test_a_will_keeps_the_last_backlog_and_a_clean_stop_reports_its_own(
    migrated_db: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
    unique_vin: str,
) -> None:
    """The bare last will marks the device offline and keeps the backlog it last reported; the
    whole status a clean stop sends (online false) replaces it with the backlog left behind."""
    make_consumer(args=FAST_AUDIT)
    topic = f"status/{unique_vin}"
    publisher = make_publisher()

    def stored() -> tuple[object, ...] | None:
        rows = query(
            migrated_db, "SELECT online, backlog FROM audit_status WHERE vin = $1", unique_vin
        )
        return tuple(rows[0]) if rows else None

    publisher.publish(topic, encode(Status(v=1, vin=unique_vin, backlog=42))).wait_for_publish(10)
    wait_until(lambda: stored() == (True, 42), what="the status")
    publisher.publish(topic, encode(Status(v=1, vin=unique_vin, online=False))).wait_for_publish(10)
    wait_until(lambda: stored() == (False, 42), what="the will, keeping the backlog")
    goodbye = Status(v=1, vin=unique_vin, online=False, sent_at=1_717_243_200_000_000, backlog=7)
    publisher.publish(topic, encode(goodbye)).wait_for_publish(10)
    wait_until(lambda: stored() == (False, 7), what="the clean stop's backlog")
