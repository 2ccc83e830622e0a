"""The consumer's side of contract v2 without servers: v2 goes straight to the writer's staging
rows, checked as strictly as v1, and charged to the byte budget for what its decoding holds."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from revline.consumer.budget import footprint
from revline.consumer.pipeline import Item, classify, newest_sample, sample_count
from revline.consumer.subscriber import Inbound
from revline.consumer.validate import Invalid, check
from revline.consumer.writer import STAGING_COLUMNS, records
from revline.contract import MAX_BATCH_SAMPLES, Batch, Sample, encode, telemetry_topic
from revline.edge.sim import simulate_samples
from revline.fields import FIELDS
from revline.wire_v2 import ROW_FIELDS, Columns, RowBatch, columns_from_batch, encode_v2

VIN = "1HGCM82633A004352"
TOPIC = telemetry_topic(VIN)
T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z


def _v2(samples: list[Sample], batch_id: int = 3) -> bytes:
    batch = Batch(v=1, vin=VIN, batch=batch_id, samples=samples)
    return encode_v2(VIN, batch_id, columns_from_batch(batch))


def _check(payload: bytes) -> object:
    return check(payload, TOPIC, now_us=T0, max_future_us=300_000_000, max_age_us=10**12)


def test_decoded_rows_have_the_writers_staging_layout() -> None:
    """The v2 row layout is the staging table's column list, field for field."""
    assert ROW_FIELDS == STAGING_COLUMNS


def test_a_v2_batch_is_stored_as_the_same_rows_as_its_v1_twin() -> None:
    """records() of the v2 RowBatch equals records() of the v1 Batch of the same drive."""
    samples = list(simulate_samples(4, T0 - 60_000_000, 200, 10.0))
    v1 = _check(encode(Batch(v=1, vin=VIN, batch=3, samples=samples)))
    v2 = _check(_v2(samples))
    assert isinstance(v1, Batch)
    assert isinstance(v2, RowBatch)
    assert records([v2]) == records([v1])
    assert sample_count(v2) == sample_count(v1) == 200
    assert newest_sample([v2]) == newest_sample([v1]) == samples[-1].ts


@pytest.mark.parametrize(
    ("shift_us", "reason"),
    [(301_000_000, "future_timestamp"), (-(10**12) - 1, "too_old")],
)
def test_v2_samples_outside_the_time_window_are_refused_like_v1(shift_us: int, reason: str) -> None:
    """Future and too-old samples refuse a v2 batch with v1's reasons, batch kept for the ack."""
    samples = [Sample(ts=T0, seq=1, speed=3.0), Sample(ts=T0 + shift_us, seq=2)]
    verdict = _check(_v2(samples))
    assert isinstance(verdict, Invalid)
    assert verdict.reason == reason
    assert isinstance(verdict.batch, RowBatch)
    assert verdict.batch.batch == 3


def test_two_v2_samples_with_one_identity_are_a_duplicate() -> None:
    """(ts, seq) repeated inside a v2 batch is refused; same seq at another ts is not."""
    same = [Sample(ts=T0, seq=1), Sample(ts=T0, seq=1, speed=2.0)]
    verdict = _check(_v2(same))
    assert isinstance(verdict, Invalid)
    assert verdict.reason == "duplicate_sample"
    assert isinstance(_check(_v2([Sample(ts=T0, seq=1), Sample(ts=T0 + 1, seq=1)])), RowBatch)


def test_a_hostile_v2_message_is_a_dead_letter_with_its_raw_bytes() -> None:
    """classify() turns a broken v2 payload into a `rejected` row holding exactly its bytes."""
    payload = _v2([Sample(ts=T0, seq=1, speed=3.0)])[:-2]
    inbound = Inbound(
        mid=1, qos=1, topic=TOPIC, payload=payload, received_at=time.time(), generation=0
    )
    item = classify(inbound, now_us=T0, max_future_us=1, max_age_us=None)
    assert isinstance(item, Item)
    assert item.batch is None
    assert item.rejected is not None
    assert item.rejected.payload == payload
    assert item.rejected.reason in {"invalid", "undecodable"}


def _every_field_constant(n: int) -> Columns:
    """The cheapest v2 batch to send and the dearest to hold: n samples of every field, each
    column one run, a few hundred bytes on the wire."""
    return Columns(
        ts=list(range(T0, T0 + n)),
        seq=list(range(n)),
        values={k: [1] * n for k in range(len(FIELDS))},
        flags=[0] * n,
        extra=[{"TIMING_ADVANCE": 1.0}] * 64 + [None] * (n - 64),
    )


@pytest.mark.parametrize("n", [1, 500, MAX_BATCH_SAMPLES])
def test_footprint_bounds_what_a_decoded_v2_message_holds(n: int) -> None:
    """The bytes charged for a v2 message cover its payload and every object its rows hold,
    however small the payload (runs and zstd make a large batch a few hundred bytes)."""
    columns = _every_field_constant(max(n, 64))
    payload = encode_v2(VIN, 1, columns)
    tracemalloc.start()
    try:
        batch = check(payload, TOPIC, now_us=T0, max_future_us=10**9)
        decoded, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(batch, RowBatch)
    assert footprint(len(payload), batch) >= len(payload) + decoded
