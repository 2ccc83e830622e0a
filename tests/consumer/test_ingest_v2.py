"""Contract v2 through the real consumer and PostgreSQL: the same drive, the same cold rows."""

from __future__ import annotations

import functools
import time
import uuid

import msgspec

from revline.contract import Batch, encode, telemetry_topic
from revline.edge.sim import simulate_samples
from revline.fields import FIELDS
from revline.wire_v2 import columns_from_batch, encode_v2
from tests.fixtures.consumer import ConsumerFactory, PublisherFactory, cold_counts, query
from tests.fixtures.services import wait_until


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


def test_the_same_drive_sent_as_v1_and_as_v2_stores_identical_rows(
    database_url: str,
    make_consumer: ConsumerFactory,
    make_publisher: PublisherFactory,
) -> None:
    """Every field of a simulated drive, GPS and extra included, lands the same via v1 and v2."""
    # The consumer refuses samples older than its retention window, so the drive starts an hour
    # ago (the only use of the wall clock; the rows compared do not depend on it).
    start = (int(time.time()) - 3600) * 1_000_000
    samples = list(simulate_samples(11, start, 400, 10.0))
    samples[7] = msgspec.structs.replace(samples[7], extra={"TIMING_ADVANCE": 12.5}, flags=1)
    v1_vin, v2_vin = _vin(), _vin()
    make_consumer()
    publisher = make_publisher()
    infos = []
    for k in range(0, len(samples), 50):
        chunk = samples[k : k + 50]
        batch = Batch(v=1, vin=v1_vin, batch=k, samples=chunk)
        infos.append(publisher.publish(telemetry_topic(v1_vin), encode(batch)))
        v2 = encode_v2(v2_vin, k, columns_from_batch(batch), compress=k % 100 == 0)
        infos.append(publisher.publish(telemetry_topic(v2_vin), v2))
    for info in infos:
        info.wait_for_publish(60)
    both = functools.partial(map, functools.partial(cold_counts, database_url), (v1_vin, v2_vin))
    wait_until(lambda: list(both()) == [(400, 400)] * 2, what="400 rows each", timeout=60)
    v1_rows, v2_rows = _cold(database_url, v1_vin), _cold(database_url, v2_vin)
    assert v1_rows == v2_rows
    assert all(value is not None for value in v1_rows[-1][2:16])  # GPS and OBD fields stored
