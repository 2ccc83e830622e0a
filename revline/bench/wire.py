"""Contract v2 on simulator drives: bytes on the air, the batching table, the decode benchmark
and the recipe of the shipped zstd dictionary.

``revline bench edge --wire-only`` prints :func:`wire_table` and :func:`batching_table`;
``revline bench decode`` prints :func:`decode_table`; ``revline bench dictionary`` rebuilds the
dictionary (:func:`train_dictionary`), see docs/wire.md, "The zstd dictionary".
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import zstandard

from revline.contract import Ack, Batch, encode, telemetry_topic
from revline.edge.sim import simulate_samples
from revline.edge.spool import SpoolBatch, batch_columns, encode_batch, pack_values
from revline.fields import FIELDS
from revline.wire_v2 import (
    DICTIONARIES,
    DICTIONARY_ID,
    WIRE_VERSION,
    columns_from_batch,
    encode_body,
    encode_v2,
)

__all__ = [
    "DICTIONARY_RECIPE",
    "SENT",
    "WireRow",
    "batching_table",
    "decode_table",
    "drive_batches",
    "publish_bytes",
    "train_dictionary",
    "wire_table",
]

VIN: Final = "1RVBENCH0EDGE0001"
T0: Final = 1_750_000_000_000_000


def publish_bytes(topic: str, payload_len: int) -> int:
    """Bytes of an MQTT 5 QoS 1 PUBLISH carrying ``payload_len`` bytes: fixed header,
    remaining length, topic, packet id and an empty properties block."""
    rest = 2 + len(topic.encode()) + 2 + 1 + payload_len
    length_bytes = 1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4
    return 1 + length_bytes + rest


_PUBACK: Final = 4  # MQTT 5 PUBACK, reason "success" and no properties: header, length, id


def _ack_bytes(batches_per_ack: int = 1) -> int:
    """Downlink bytes of the consumer's ``ack/<vin>`` naming ``batches_per_ack`` batch ids (of
    a live drive: 3-byte ids) as the device receives it."""
    ack = encode(Ack(v=1, vin=VIN, batches=[70_000 + i for i in range(batches_per_ack)]))
    return publish_bytes(f"ack/{VIN}", len(ack))


def drive_batches(
    seeds: Sequence[int], seconds: int, hz: float, per_batch: int
) -> list[SpoolBatch]:
    """Simulator drives with every field (GPS included) as the edge's spool holds them, cut
    into batches of ``per_batch`` samples (a live batch of a drive is what the edge sends)."""
    batches = []
    for seed in seeds:
        rows: list[tuple[int, int, bytes, int | None]] = []
        for s in simulate_samples(seed, T0, int(seconds * hz), hz):
            values = {f.name: v for f in FIELDS if (v := getattr(s, f.name)) is not None}
            rows.append((s.seq, s.ts, pack_values(values, s.extra), None))
        batches += [
            SpoolBatch(id=70_000 + k, rows=rows[k : k + per_batch])
            for k in range(0, len(rows), per_batch)
        ]
    return batches


def _deflated(batch: SpoolBatch) -> bytes:
    """v2 with its body DEFLATEd (zlib level 9, raw) when that is shorter, in the same envelope:
    the comparison the zstd codec was chosen against; not a codec of v2."""
    raw = encode_body(batch_columns(batch))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = packer.compress(raw) + packer.flush()
    envelope = msgspec.msgpack.decode(
        encode_v2(VIN, batch.id, batch_columns(batch), compress=False)
    )
    envelope[3] = min(envelope[3], b"\x01" + deflated, key=len)
    return msgspec.msgpack.encode(envelope)


SENT: Final = "v2 + zstd + dictionary 1"
"""The encoder the edge uses (``encode_batch`` v2)."""

ENCODERS: Final[dict[str, Callable[[SpoolBatch], bytes]]] = {
    "v1 msgpack": lambda b: encode_batch(VIN, b, 1),
    "v2 raw columns": lambda b: encode_v2(VIN, b.id, batch_columns(b), compress=False),
    "v2 + deflate (compared)": _deflated,
    "v2 + zstd, no dictionary": lambda b: encode_v2(VIN, b.id, batch_columns(b), dictionary=0),
    SENT: lambda b: encode_batch(VIN, b, WIRE_VERSION),
}
"""What ``wire_table`` compares; the last is what the edge sends (``encode_batch`` v2)."""


@dataclass(frozen=True, slots=True)
class WireRow:
    """One encoder on one batch size: bytes per sample on the air, encode cost per sample."""

    label: str
    seconds: float
    hz: float
    bytes_per_sample: float
    encode_us: float


def _measure(name: str, batches: list[SpoolBatch], topic: str) -> tuple[float, float]:
    encoder = ENCODERS[name]
    n = sum(len(b.rows) for b in batches)
    start = time.perf_counter()
    payloads = [encoder(b) for b in batches]
    micros = (time.perf_counter() - start) * 1e6 / n
    return sum(publish_bytes(topic, len(p)) for p in payloads) / n, micros


def wire_table(*, drives: int = 3, seconds: int = 600) -> list[WireRow]:
    """Print and return bytes per sample on the air and encode µs per sample of every encoder
    in :data:`ENCODERS`, for 1-s and 5-s batches at 10 Hz, on simulator drives."""
    topic = telemetry_topic(VIN)
    out = []
    print(f"wire bytes/sample at 10 Hz, {drives} simulator drives of {seconds} s (every field the")
    print("simulator makes, GPS included), MQTT 5 PUBLISH header + topic included; encode cost")
    print("per sample from the spool's rows, as the edge's publisher does it:")
    for batch_s in (1, 5):
        batches = drive_batches(range(drives), seconds, 10.0, batch_s * 10)
        for name in ENCODERS:
            wire, micros = _measure(name, batches, topic)
            label = f"{batch_s} s batch, {name}"
            print(f"  {label:<36} {wire:>7.1f} B/sample   encode {micros:>6.1f} µs/sample")
            out.append(WireRow(name, batch_s, 10.0, wire, micros))
    return out


def batching_table(*, drives: int = 3, seconds: int = 600) -> list[tuple[float, float, float]]:
    """Print the edge's batching trade-off: for 1, 2, 5, 10 s batches at 1, 5, 10 Hz, bytes per
    sample up (PUBLISH) and down (the consumer's PUBACK and ``ack/<vin>``), v1 beside v2, and
    how long a sample waits before it is sent. Returns (hz, seconds, v2 up B/sample)."""
    topic = telemetry_topic(VIN)
    print()
    print("batching: bytes/sample on the air (MQTT header + topic included) and wait before send")
    print(f"({drives} simulator drives of {seconds} s; v2 as the edge sends it; 'down' is the")
    print(
        "consumer's PUBACK and ack/<vin> per batch; the wait adds up to flush_interval_s = 0.5 s)"
    )
    print(f"  {'Hz':>4} {'batch':>6} {'samples':>7} {'v1 up':>7} {'v2 up':>7} {'v2 down':>8}"
          f" {'MB/month v2':>12} {'wait mean':>10} {'wait max':>9}")  # fmt: skip
    out = []
    down = _ack_bytes() + _PUBACK
    for hz in (1.0, 5.0, 10.0):
        for batch_s in (1.0, 2.0, 5.0, 10.0):
            per_batch = round(hz * batch_s)
            batches = drive_batches(range(drives), seconds, hz, per_batch)
            v1, _ = _measure("v1 msgpack", batches, topic)
            v2, _ = _measure(SENT, batches, topic)
            n = sum(len(b.rows) for b in batches)
            v2_down = down * len(batches) / n
            # A month of 2 h a day: both directions, the cellular bill's view.
            month_mb = (v2 + v2_down + _PUBACK * len(batches) / n) * hz * 7200 * 30 / 1e6
            wait_mean = batch_s / 2  # samples arrive evenly over the batch's age
            print(
                f"  {hz:>4.0f} {batch_s:>5.0f}s {per_batch:>7} {v1:>7.1f} {v2:>7.1f} "
                f"{v2_down:>8.1f} {month_mb:>12.1f} {wait_mean:>9.1f}s {batch_s:>8.1f}s"
            )
            out.append((hz, batch_s, v2))
    return out


# -- decoding ------------------------------------------------------------------------------------


def _decode_rate(payloads: list[bytes], n: int, topic: str, repeat: int) -> float:
    """Samples per second through ``check`` (decode + validate) and ``records`` (staging rows),
    the consumer's work per message before the database, on this one thread."""
    # Here, not at the top: `revline bench edge` runs on a Pi without the consumer's extra.
    from revline.consumer.validate import Invalid, check  # noqa: PLC0415
    from revline.consumer.writer import records  # noqa: PLC0415

    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for payload in payloads:
            batch = check(payload, topic, now_us=T0 + 10**12, max_future_us=10**12)
            if isinstance(batch, Invalid):
                raise RuntimeError(f"bench payload refused: {batch.reason} {batch.detail}")
            records([batch])
        best = max(best, n / (time.perf_counter() - start))
    return best


def decode_table(
    *, drives: int = 3, seconds: int = 300, repeat: int = 3
) -> list[tuple[int, float, float]]:
    """Print and return, per batch size, samples/s on one core from payload to COPY rows: v1
    MessagePack beside v2 (as the edge sends it), best of ``repeat`` runs each."""
    topic = telemetry_topic(VIN)
    print(f"decode to COPY rows (consumer.validate.check + writer.records), one core, best of "
          f"{repeat}; {drives} simulator drives of {seconds} s at 10 Hz, every field:")  # fmt: skip
    print(f"  {'samples/message':>15} {'v1 samples/s':>13} {'v2 samples/s':>13} {'v2 / v1':>8}")
    out = []
    for per_batch in (10, 50, 500):
        batches = drive_batches(range(drives), seconds, 10.0, per_batch)
        n = sum(len(b.rows) for b in batches)
        v1 = _decode_rate([encode_batch(VIN, b, 1) for b in batches], n, topic, repeat)
        v2 = _decode_rate([encode_batch(VIN, b, 2) for b in batches], n, topic, repeat)
        print(f"  {per_batch:>15} {v1:>13,.0f} {v2:>13,.0f} {v2 / v1:>7.2f}x")
        out.append((per_batch, v1, v2))
    return out


# -- the dictionary ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recipe:
    """How a shipped dictionary was trained: everything that decides its bytes."""

    seeds: range
    seconds: int
    rates_hz: tuple[float, ...]
    batch_seconds: tuple[float, ...]
    size: int
    k: int
    d: int
    level: int


DICTIONARY_RECIPE: Final = {
    1: Recipe(
        seeds=range(1000, 1006),  # not the drives the benchmarks measure (seeds 0-2)
        seconds=600,
        rates_hz=(1.0, 5.0, 10.0),
        batch_seconds=(1.0, 2.0, 5.0, 10.0),
        size=2048,
        k=50,  # found by zstd's optimizer (train_dictionary with steps=32) on these bodies
        d=6,
        level=19,
    ),
}
"""Dictionary id -> its recipe. A new dictionary is a new id with a recipe of its own."""


def _training_bodies(recipe: Recipe) -> Iterator[bytes]:
    for hz in recipe.rates_hz:
        for batch_s in recipe.batch_seconds:
            per_batch = max(1, round(hz * batch_s))
            for seed in recipe.seeds:
                samples = list(simulate_samples(seed, T0, int(recipe.seconds * hz), hz))
                for k in range(0, len(samples), per_batch):
                    batch = Batch(v=1, vin=VIN, batch=0, samples=samples[k : k + per_batch])
                    yield encode_body(columns_from_batch(batch))


def train_dictionary(dictionary_id: int = DICTIONARY_ID) -> bytes:
    """The bytes of dictionary ``dictionary_id``, trained again from its recipe (deterministic:
    the same recipe gives the same bytes)."""
    recipe = DICTIONARY_RECIPE[dictionary_id]
    bodies: list[bytes | bytearray | memoryview] = list(_training_bodies(recipe))
    trained = zstandard.train_dictionary(
        recipe.size, bodies, k=recipe.k, d=recipe.d, level=recipe.level, threads=1
    )
    return trained.as_bytes()


def dictionary_main(out: Path | None, dictionary_id: int) -> int:
    """``revline bench dictionary``: train, compare with the shipped file, write if asked."""
    data = train_dictionary(dictionary_id)
    name, _ = DICTIONARIES.get(dictionary_id, (f"wire_v2-{dictionary_id}.zdict", ""))
    shipped = Path(__file__).parents[1] / name
    same = shipped.exists() and shipped.read_bytes() == data
    print(f"dictionary {dictionary_id}: {len(data)} bytes, "
          f"{'identical to' if same else 'DIFFERENT from'} {shipped}")  # fmt: skip
    if out is not None:
        out.write_bytes(data)
        print(f"written to {out}")
    return 0 if same or out is not None else 1
