"""Untrusted input on ack/<vin>, against a real Mosquitto: poison acks and forged acks.

The edge believes nothing it reads on its ack topic: a payload that does not decode is kept as a
dead letter in the spool (raw bytes) and the edge goes on sampling and publishing; an ack naming
a batch the broker has not PUBACKed is ignored, so it cannot make unsent samples look durable.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
import pytest

from revline.contract import Ack, ack_topic, encode, encode_json
from revline.edge.publisher import Publisher
from revline.edge.spool import CREATED, DURABLE, Spool, SpoolReader, pack_values
from revline.edge.status import format_status, read_dead_letters, read_status
from revline.mqtt import make_client, parse_mqtt_url
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import (
    edge_settings,
    holding_proxy,
    running_acker,
    running_edge,
    spool_read,
)
from tests.fixtures.services import wait_until

T0 = 1_750_000_000_000_000  # test data time, µs: never the wall clock


@contextmanager
def forger(mqtt_url: str) -> Iterator[paho.Client]:
    """Any client of an anonymous broker: it may publish on every car's ack topic."""
    address = parse_mqtt_url(mqtt_url)
    client = make_client(address, f"forger-{uuid.uuid4().hex[:8]}")
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def send(client: paho.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def _mp(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def poison_acks(vin: str) -> dict[str, bytes]:
    """Hostile payloads for ``ack/<vin>``, by name; the ones with a stable reason first."""
    ack = encode(Ack(v=1, vin=vin, batches=[0]))
    # A valid ack plus an unknown field nested 1,000 levels deep: ~1 KB, RecursionError on main.
    v_vin = _mp("v") + _mp(1) + _mp("vin") + _mp(vin)
    head = b"\x84" + v_vin + _mp("batches") + _mp([0])
    deep_json = b'{"v":1,"vin":"%s","batches":[0],"x":%s1%s}' % (
        vin.encode(),
        b"[" * 1000,
        b"]" * 1000,
    )
    return {
        "garbage": b"\xc1\xff\x00 not msgpack",
        "empty": b"",
        "trailing": ack + b"\x00\x01",
        "ext": b"\xd4\x01\x00",
        "nul_key": b'{"v":1,"vin":"%s","batches":[0],"a\\u0000b":1}' % vin.encode(),
        "other_car": encode(Ack(v=1, vin="1HGCM82633A004352", batches=[0])),
        "unknown_batch": encode_json(Ack(v=1, vin=vin, batches=[10**12])),
        "deep_msgpack": head + _mp("x") + b"\x91" * 1000 + b"\x01",
        "deep_json": deep_json,
        "deep_in_batches": b"\x83" + v_vin + _mp("batches") + b"\x91" * 1001 + b"\x00",
    }


def test_poison_acks_are_dead_lettered_and_the_edge_keeps_publishing(
    tmp_path: Path, mqtt_url: str, unique_vin: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No ack payload stops the edge: each is kept with its raw bytes, samples keep flowing."""
    caplog.set_level(logging.WARNING, logger="revline.edge")
    settings = edge_settings(tmp_path, unique_vin, mqtt_url, batch_max_age_s=0.3)
    path = settings.spool_path
    topic = ack_topic(unique_vin)
    poison = poison_acks(unique_vin)
    retained = poison["deep_msgpack"] + b"\x00"  # its own bytes, to tell the copies apart
    with forger(mqtt_url) as bad, running_acker(mqtt_url, unique_vin) as acker:
        # Retained: every (re)subscription gets it again, a brand-new edge's first one included.
        send(bad, topic, retained, retain=True)
        try:
            with running_edge(settings):
                wait_until(
                    lambda: read_status(path).rejected >= 1, what="the retained poison", timeout=30
                )
                wait_until(
                    lambda: len(acker.seqs()) >= 200, what="samples before the poison", timeout=60
                )
                for payload in poison.values():
                    send(bad, topic, payload)
                count = 1 + len(poison)
                wait_until(
                    lambda: read_status(path).rejected >= count,
                    what="every dead letter",
                    timeout=30,
                )
                before = len(acker.seqs())
                wait_until(
                    lambda: len(acker.seqs()) >= before + 200, what="samples after it", timeout=60
                )
            # A restart meets the retained poison again at its first subscription.
            with running_edge(settings):
                wait_until(
                    lambda: read_status(path).rejected >= count + 1, what="the restart", timeout=30
                )
                again = len(acker.seqs())
                wait_until(
                    lambda: len(acker.seqs()) >= again + 200,
                    what="samples after restart",
                    timeout=60,
                )
        finally:
            send(bad, topic, b"", retain=True)  # clear it for the session broker's other tests
        total = spool_read(path, SpoolReader.sample_count)
        wait_until(lambda: len(set(acker.seqs())) >= total, what="every sample", timeout=30)
    assert sorted(set(acker.seqs())) == list(range(total))
    status = read_status(path)
    assert status.durable == total  # stopping waited for the acks: every sample is durable
    assert status.rejected == count + 1
    letters = read_dead_letters(path)
    assert len(letters) == status.rejected_kept == count + 1
    assert sorted(d.payload for d in letters) == sorted([*poison.values(), retained, retained])
    assert all(d.size == len(d.payload) and d.topic == topic and d.reason for d in letters)
    reason = {d.payload: d.reason for d in letters}
    assert reason[poison["garbage"]] == "undecodable"
    assert reason[poison["trailing"]] == "undecodable"
    assert reason[poison["nul_key"]] == "invalid"
    assert reason[poison["other_car"]] == "vin_mismatch"
    assert reason[poison["unknown_batch"]] == "unknown_batch"
    assert status.acks_ignored == 1  # the one batch id of unknown_batch
    assert letters[0].payload == retained  # newest first: the restart's copy
    assert f"bad acks         {count + 1} dead-lettered" in format_status(status)
    # One warning per minute with a count, not one per bad ack; the counts add up.
    # (what was still counted at stop is said then, as earlier: "... (earlier, not reported yet)")
    lines = [r for r in caplog.records if r.getMessage().startswith("bad ack dead-lettered")]
    assert len(lines) < count
    assert sum(r.fields["count"] for r in lines) == count + 1  # type: ignore[attr-defined]


def held_batches(path: str) -> list[int]:
    states = spool_read(path, SpoolReader.batch_states)
    return [batch_id for batch_id, state in states.items() if state == CREATED]


def durable_ids(path: str, ids: list[int]) -> list[int]:
    states = spool_read(path, SpoolReader.batch_states)
    return [batch_id for batch_id in ids if states.get(batch_id) == DURABLE]


def test_forged_ack_before_the_puback_marks_nothing_durable(
    tmp_path: Path,
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
) -> None:
    """Acks for batches sent but not PUBACKed, and for the next ids, are ignored; none is lost."""
    make_consumer()
    with holding_proxy(mqtt_url) as proxy, forger(mqtt_url) as bad:
        settings = edge_settings(tmp_path, unique_vin, proxy.url(), batch_max_age_s=0.3)
        path = settings.spool_path
        with running_edge(settings):
            wait_until(
                lambda: cold_counts(database_url, unique_vin)[0] >= 300, what="300 rows", timeout=60
            )
            proxy.hold()  # the edge's PUBLISHes now wait in front of the broker: no PUBACK
            wait_until(
                lambda: len(held_batches(path)) >= 3, what="batches sent, not PUBACKed", timeout=30
            )
            time.sleep(0.5)  # any PUBACK of a batch sent before the hold has come back by now
            held = held_batches(path)
            next_id = spool_read(path, SpoolReader.next_batch)
            forged = [*held, *range(next_id, next_id + 6)]
            send(bad, ack_topic(unique_vin), encode(Ack(v=1, vin=unique_vin, batches=forged)))
            wait_until(
                lambda: (
                    read_status(path).acks_ignored >= len(forged) or bool(durable_ids(path, held))
                ),
                what="the edge to read the forged ack",
                timeout=30,
            )
            assert durable_ids(path, held) == []
            assert read_status(path).acks_ignored == len(forged)
            proxy.release()
            wait_until(
                lambda: durable_ids(path, held) == held,
                what="the held batches, for real",
                timeout=60,
            )
        total = spool_read(path, SpoolReader.sample_count)
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= total,
            what="every sample",
            timeout=60,
        )
        assert cold_counts(database_url, unique_vin) == (total, total)
    open_ = spool_read(path, SpoolReader.open_batches)
    assert open_ == 0


class FlakyPublisher(Publisher):
    """A publisher whose PUBACK handler fails twice, as a bug or a paho surprise would."""

    failures = 2

    def _on_publish(self, *args: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected failure in on_publish")
        super()._on_publish(*args)


def test_an_exception_in_a_paho_callback_does_not_stop_the_publisher(
    tmp_path: Path, mqtt_url: str, unique_vin: str
) -> None:
    """A callback that raises is logged and its connection started over; every sample arrives."""
    settings = edge_settings(tmp_path, unique_vin, mqtt_url, batch_max_age_s=0.3)
    rows = [(T0 + i * 100_000, pack_values({"rpm": 800.0 + i % 50}), None) for i in range(3000)]
    with Spool(settings.spool_path) as spool, running_acker(mqtt_url, unique_vin) as acker:
        spool.write(rows)
        publisher = FlakyPublisher(settings, spool)
        thread = threading.Thread(target=publisher.run, name="publisher", daemon=True)
        thread.start()
        try:
            wait_until(
                lambda: (
                    (spool.unbatched(), spool.open_batches()) == (0, 0) or not thread.is_alive()
                ),
                what="every batch acked end to end",
                timeout=60,
            )
            assert thread.is_alive()
        finally:
            publisher.stop()
            thread.join(30)
    assert publisher.stats.callback_errors == 2
    assert publisher.stats.connects >= 2  # the failure started the connection over
    assert sorted(set(acker.seqs())) == list(range(3000))
