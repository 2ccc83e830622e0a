"""The consumer under a flood of maximum-size messages: memory bounded by bytes in flight."""

from __future__ import annotations

import functools
import hashlib
import string
import threading
import time
from collections.abc import Mapping

import msgspec

from revline.contract import MAX_PAYLOAD_BYTES, NUMERIC_FIELDS, telemetry_topic
from tests.fixtures.consumer import (
    ConsumerFactory,
    ConsumerProcess,
    PublisherFactory,
    make_batches,
    query,
)
from tests.fixtures.services import PostgresService, wait_until

# Short keys with integer values are the cheapest extra entries on the wire (6-7 bytes) and
# among the dearest once decoded (a dict slot, a float, a key): the hostile case for memory.
_KEYS = [a + b for a in string.ascii_letters for b in string.ascii_letters][:64]
_FAR_FUTURE_US = 7_000_000_000_000_000  # year 2191: refused as future_timestamp by any clock


def _fit(
    samples: list[dict[str, object]], pad: Mapping[str, object], vin: str, batch: int
) -> bytes:
    """A batch message of exactly MAX_PAYLOAD_BYTES: ``pad`` (a last sample) takes up the rest,
    at most 15 x 33 bytes (a fixmap of keys of up to 31 characters with the integer 0)."""
    extra: dict[str, int] = {}
    message = {"v": 1, "vin": vin, "batch": batch, "samples": [*samples, {**pad, "extra": extra}]}
    for first in string.ascii_letters[:15]:
        deficit = MAX_PAYLOAD_BYTES - len(msgspec.msgpack.encode(message))
        if deficit < 3:
            break
        cost = min(33, deficit)  # 1 (fixstr header) + len(key) + 1 (the value)
        if deficit - cost in (1, 2):  # leave 0 or at least one more entry's worth
            cost = deficit - 3
        extra[first + "p" * (cost - 3)] = 0
    payload = msgspec.msgpack.encode(message)
    assert len(payload) == MAX_PAYLOAD_BYTES, len(payload)
    return payload


def hostile_future_batch(vin: str, batch: int) -> bytes:
    """Exactly MAX_PAYLOAD_BYTES: a well-formed batch that decodes to ~30 MB of objects and is
    refused as ``future_timestamp`` (so it is held decoded until acked, then dead-lettered)."""
    short = [key * 2 for key in _KEYS]  # 4 characters
    long = [key + "_" for key in short]  # 5: one byte more per entry, 64 per sample
    samples = [
        {"ts": _FAR_FUTURE_US + seq, "seq": seq, "extra": dict.fromkeys(short, 0)}
        for seq in range(4_999)
    ]
    pad = {"ts": _FAR_FUTURE_US + 4_999, "seq": 4_999}
    message = {"v": 1, "vin": vin, "batch": batch, "samples": [*samples, pad]}
    deficit = MAX_PAYLOAD_BYTES - len(msgspec.msgpack.encode(message))
    for sample in samples[: (deficit - 300) // 64]:
        sample["extra"] = dict.fromkeys(long, 0)
    return _fit(samples, pad, vin, batch)


def max_valid_batch(vin: str, batch: int, t0: int, first_seq: int) -> bytes:
    """Exactly MAX_PAYLOAD_BYTES: 5,000 samples with every typed field and long extra keys."""
    extras = [{f"{name}_{'x' * 30}": 1.5 for name in "ABC"} for _ in range(4_999)]
    samples = [
        {
            "ts": t0 + i * 1_000,
            "seq": first_seq + i,
            **{name: float(i % 50) + 0.25 for name in NUMERIC_FIELDS},
            "extra": extra,
        }
        for i, extra in enumerate(extras)
    ]
    pad = {"ts": t0 + 4_999_000, "seq": first_seq + 4_999}
    message = {"v": 1, "vin": vin, "batch": batch, "samples": [*samples, pad]}
    # One more entry per sample takes up most of the rest: 1 + len(key) + 9 bytes (a float64).
    per_sample = (MAX_PAYLOAD_BYTES - len(msgspec.msgpack.encode(message)) - 300) // len(extras)
    for extra in extras:
        extra["D" * (per_sample - 10)] = 2.5
    # What rounding left over: one byte more in the first samples' keys.
    deficit = MAX_PAYLOAD_BYTES - len(msgspec.msgpack.encode(message))
    for extra in extras[: deficit - 300]:
        extra["D" * (per_sample - 9)] = extra.pop("D" * (per_sample - 10))
    return _fit(samples, pad, vin, batch)


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``every`` seconds until stopped."""

    def __init__(self, consumer: ConsumerProcess, every: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.consumer = consumer
        self.every = every
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        """Sample until stopped (or the process is gone)."""
        while not self._done.is_set():
            try:
                self.samples.append(self.consumer.rss_kib())
            except (OSError, AssertionError):
                return
            self._done.wait(self.every)

    def stop(self) -> int:
        """Stop sampling; the peak in KiB."""
        self._done.set()
        self.join(10)
        return max(self.samples)


def _flood(vin: str, first: int, t0: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(oversized, hostile, valid) messages of one flood round, all distinct from other rounds."""
    oversized = [bytes([(first + i) % 256]) * (MAX_PAYLOAD_BYTES + 1) for i in range(40)]
    hostile = [hostile_future_batch(vin, 1_000 + first + i) for i in range(12)]
    # Each valid batch spans 5 s of samples, in the recent past, none overlapping another.
    valid = [
        max_valid_batch(vin, first + i, t0 - (first + i) * 5_000_000, (first + i) * 5_000)
        for i in range(4)
    ]
    return oversized, hostile, valid


def test_a_flood_of_maximum_size_messages_keeps_consumer_memory_bounded(
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Two floods of 2 MiB and 2 MiB + 1 messages, many times the byte budget: RSS stays under
    200 MiB, gives back most of it afterwards, does not grow flood over flood, and every message
    is stored or dead-lettered with its bytes."""
    topic = telemetry_topic(unique_vin)
    t0 = make_batches(unique_vin, 1)[0].samples[0].ts - 60_000_000
    rounds = [_flood(unique_vin, first, t0) for first in (0, 100)]
    rejected: list[tuple[str, str]] = []
    stored = 0
    consumer = make_consumer()
    time.sleep(1)  # let start-up allocations settle before taking the baseline
    before = consumer.rss_kib()
    figures = [before]
    for oversized, hostile, valid in rounds:
        rejected += [("too_large", hashlib.md5(p).hexdigest()) for p in oversized]
        rejected += [("future_timestamp", hashlib.md5(p).hexdigest()) for p in hostile]
        stored += 5_000 * len(valid)
        assert all(len(p) == MAX_PAYLOAD_BYTES for p in hostile + valid)
        # Interleaved, so that every kind meets every other in the same write batches.
        messages = valid[:2]
        for i, message in enumerate(hostile):
            messages += [*oversized[i :: len(hostile)], message]
        messages += valid[2:]
        assert len(messages) == len(oversized) + len(hostile) + len(valid)
        sampler = RssSampler(consumer)
        sampler.start()
        pub = make_publisher()
        for info in [pub.publish(topic, payload) for payload in messages]:
            info.wait_for_publish(120)
        _wait_accounted(consumer, database_url, len(rejected), stored)
        peak = sampler.stop()
        # Comes back down: gives back more than half of what the flood took.
        back = before + (peak - before) // 2
        wait_until(
            functools.partial(_rss_below, consumer, back),
            what=f"RSS back down from a peak of {peak} KiB (baseline {before} KiB)",
            timeout=30,
        )
        figures += [peak, consumer.rss_kib()]
    print("RSS KiB before, then peak and after of each flood:", figures)
    rows = query(database_url, "SELECT reason, md5(payload) AS md5 FROM rejected")
    assert sorted((row["reason"], row["md5"]) for row in rows) == sorted(rejected)
    assert consumer.healthy()
    _, peak_1, after_1, peak_2, after_2 = figures
    assert max(peak_1, peak_2) < 200 * 1024, figures
    assert after_2 < after_1 + 24 * 1024, figures  # what is kept is reused, not accumulated


def _rss_below(consumer: ConsumerProcess, kib: int) -> bool:
    return consumer.rss_kib() < kib


def _wait_accounted(
    consumer: ConsumerProcess, database_url: str, rejected: int, stored: int
) -> None:
    """Wait until ``rejected`` dead letters and ``stored`` samples are in the database."""

    def accounted() -> tuple[int, int]:
        (row,) = query(
            database_url,
            "SELECT (SELECT count(*) FROM rejected) AS r, (SELECT count(*) FROM samples) AS s",
        )
        return int(row["r"]), int(row["s"])

    try:
        wait_until(lambda: accounted() == (rejected, stored), what="", timeout=120)
    except TimeoutError:
        raise AssertionError(
            f"(rejected, samples) {accounted()}, expected {(rejected, stored)}\n"
            f"{consumer.log_tail()}"
        ) from None


def test_a_full_byte_budget_outlasting_the_keepalive_loses_nothing(
    database_url: str,
    unique_vin: str,
    fresh_postgres: PostgresService,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Database down while big messages fill the budget: reading pauses (logged) for longer than
    1.5 keepalives, the link survives (PINGREQs go on), and after recovery every message is
    accounted."""
    oversized = [bytes([i]) * (MAX_PAYLOAD_BYTES + 1) for i in range(12)]  # 3x an 8 MiB budget
    consumer = make_consumer(
        args=["--max-inflight-mb", "8", "--keepalive-s", "5", "--retry-max-s", "1"]
    )
    fresh_postgres.stop()
    pub = make_publisher()
    for info in [pub.publish(telemetry_topic(unique_vin), p) for p in oversized]:
        info.wait_for_publish(60)
    consumer.wait_for_log("reading from the broker paused")
    # Past 1.5 keepalives, after which the broker would close the link of a silent client.
    time.sleep(10)
    fresh_postgres.start()
    consumer.wait_for_log("reading from the broker resumed")
    want = {hashlib.md5(p).hexdigest() for p in oversized}
    wait_until(
        lambda: (
            {r["md5"] for r in query(database_url, "SELECT md5(payload) FROM rejected")} == want
        ),
        what="every message dead-lettered",
    )
    wait_until(consumer.healthy, what="healthy again")
    assert "disconnected from broker" not in consumer.log_text()
