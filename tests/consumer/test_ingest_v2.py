"""Contract v2 through the real consumer and PostgreSQL: the same drive, the same rows; hostile
v2 payloads dead-lettered with their bytes while the consumer goes on."""

from __future__ import annotations

import functools
import uuid

import msgspec
import zstandard

from revline.contract import Batch, encode, telemetry_topic
from revline.edge.sim import simulate_samples
from revline.edge.spool import SpoolBatch, encode_batch, pack_values
from revline.fields import FIELD_BY_NAME, FIELDS
from revline.wire_v2 import CODEC_RAW, CODEC_ZSTD, columns_from_batch, encode_body, encode_v2
from tests.fixtures.consumer import (
    AckListener,
    ConsumerFactory,
    PublisherFactory,
    cold_counts,
    query,
)
from tests.fixtures.services import wait_until

T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z: fixed, so the consumer is told to accept it
ACCEPT_T0 = ("--max-age-s", str(100 * 365 * 86_400))


def _vin() -> str:
    return "1RV2" + uuid.uuid4().hex[:13].upper().replace("I", "J").replace("O", "P")


def _cold(database_url: str, vin: str) -> list[tuple[object, ...]]:
    columns = ", ".join(field.cold_column for field in FIELDS)
    rows = query(
        database_url,
        f"SELECT ts, seq, {columns}, extra, flags FROM samples WHERE vin = $1 ORDER BY seq",
        vin,
    )
    return [tuple(row) for row in rows]


def _hot(database_url: str, vin: str) -> tuple[object, ...]:
    names = ", ".join(f"{f.name}, {f.name}_ts" for f in FIELDS)
    (row,) = query(database_url, f"SELECT ts, seq, {names} FROM vehicle_state WHERE vin = $1", vin)
    return tuple(row)


def _spool_batch(samples: list[Batch], batch_id: int) -> SpoolBatch:
    """The edge's stored form of samples (what `revline edge` encodes from), flags as boots."""
    rows: list[tuple[int, int, bytes, int | None]] = []
    for batch in samples:
        for s in batch.samples:
            values = {f.name: v for f in FIELDS if (v := getattr(s, f.name)) is not None}
            rows.append((s.seq, s.ts, pack_values(values, s.extra), 7 if s.flags else None))
    return SpoolBatch(id=batch_id, rows=rows)


def test_the_same_drive_sent_as_v1_and_as_v2_stores_identical_rows(
    database_url: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Every field of a simulated drive, GPS and extra included, lands the same via v1 and v2
    (raw and zstd bodies, from samples and from the edge's spool): cold rows and hot state."""
    samples = list(simulate_samples(11, T0, 400, 10.0))
    samples[7] = msgspec.structs.replace(samples[7], extra={"TIMING_ADVANCE": 12.5}, flags=1)
    # Some fields in only some samples (slow PIDs, GPS dropping out): partial columns.
    for i in range(0, 400, 3):
        samples[i] = msgspec.structs.replace(samples[i], coolant=None, lat=None, lon=None)
    v1_vin, v2_vin, edge_vin = _vin(), _vin(), _vin()
    make_consumer(args=ACCEPT_T0)
    publisher = make_publisher()
    infos = []
    for k in range(0, len(samples), 50):
        batch = Batch(v=1, vin=v1_vin, batch=k, samples=samples[k : k + 50])
        infos.append(publisher.publish(telemetry_topic(v1_vin), encode(batch)))
        v2 = encode_v2(v2_vin, k, columns_from_batch(batch), compress=k % 100 == 0)
        infos.append(publisher.publish(telemetry_topic(v2_vin), v2))
        edge = encode_batch(edge_vin, _spool_batch([batch], k), 2)
        infos.append(publisher.publish(telemetry_topic(edge_vin), edge))
    for info in infos:
        info.wait_for_publish(60)
    vins = (v1_vin, v2_vin, edge_vin)
    counts = functools.partial(map, functools.partial(cold_counts, database_url), vins)
    wait_until(lambda: list(counts()) == [(400, 400)] * 3, what="400 rows each", timeout=90)
    v1_rows = _cold(database_url, v1_vin)
    assert _cold(database_url, v2_vin) == v1_rows
    assert _cold(database_url, edge_vin) == v1_rows
    assert all(value is not None for value in v1_rows[-2][2:16])  # GPS and OBD fields stored
    assert v1_rows[0][2 + FIELDS.index(FIELD_BY_NAME["lat"])] is None  # a gap stays a gap
    assert _hot(database_url, v2_vin) == _hot(database_url, v1_vin) == _hot(database_url, edge_vin)


def _frame(raw: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=0
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(raw)


def test_hostile_v2_payloads_are_dead_lettered_with_their_bytes_and_the_consumer_goes_on(
    database_url: str,
    unique_vin: str,
    ack_listener: AckListener,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Truncated bodies, huge counts, an unknown dictionary, a zstd bomb, bytes behind a frame,
    an unknown section: each lands in `rejected` with its raw bytes and reason; a valid v2
    batch after them is stored and acked."""
    vin = unique_vin
    good = Batch(v=1, vin=vin, batch=99, samples=list(simulate_samples(2, T0, 30, 10.0)))
    raw = encode_body(columns_from_batch(good))
    too_fast = columns_from_batch(good)
    too_fast.values[FIELDS.index(FIELD_BY_NAME["speed"])][3] = 5001  # 500.1 km/h: beyond bounds

    def payload(body: bytes, *rest: object) -> bytes:
        return msgspec.msgpack.encode([2, vin, 5, body, *rest])

    hostile = {
        "truncated": (payload(bytes((CODEC_RAW,)) + raw[: len(raw) // 2]), "undecodable"),
        "huge count": (payload(bytes((CODEC_RAW, 0xFF, 0xFF, 0xFF, 0x7F))), "invalid"),
        "unknown dictionary": (
            payload(bytes((CODEC_ZSTD, 9)) + _varint(len(raw)) + _frame(raw)),
            "unsupported_version",
        ),
        "bomb": (payload(bytes((CODEC_ZSTD, 0, 100)) + _frame(bytes(50_000_000))), "undecodable"),
        "bytes behind the frame": (
            payload(bytes((CODEC_ZSTD, 0)) + _varint(len(raw)) + _frame(raw) + b"\x00"),
            "undecodable",
        ),
        "unknown section": (payload(bytes((CODEC_RAW,)) + raw, {"dtc": [[0, "P0301"]]}), "invalid"),
        "value out of bounds": (encode_v2(vin, 6, too_fast), "invalid"),
    }
    consumer = make_consumer(args=ACCEPT_T0)
    publisher = make_publisher()
    for bad, _ in hostile.values():
        publisher.publish(telemetry_topic(vin), bad).wait_for_publish(30)
    publisher.publish(telemetry_topic(vin), encode_v2(vin, 99, columns_from_batch(good)))
    wait_until(lambda: 99 in ack_listener.seen(), what="the valid batch acked")
    assert cold_counts(database_url, vin) == (30, 30)
    rows = query(database_url, "SELECT reason, payload FROM rejected ORDER BY id")
    stored = {bytes(row["payload"]): row["reason"] for row in rows}
    for name, (bad, reason) in hostile.items():
        assert stored.get(bad) == reason, name
    assert consumer.healthy()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
