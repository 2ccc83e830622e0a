"""HTTP ingest: the consumer's validation and writer behind POST /v1/vehicles/{vin}/batches."""

from __future__ import annotations

from typing import Any

import httpx

from revline.contract import decode_ack, encode, encode_json
from revline.tools.localservices import wait_until
from revline.wire_v2 import columns_from_batch, encode_v2
from tests.fixtures.api import (
    ApiProcess,
    KeyMaker,
    auth,
    run,
    sim_batches,
    with_connection,
)
from tests.fixtures.services import PostgresService

MSGPACK = {"Content-Type": "application/msgpack"}


def _post(api: ApiProcess, vin: str, key: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{api.url}/v1/vehicles/{vin}/batches",
        content=body,
        headers={**auth(key), **headers},
        timeout=30,
    )


def _count(dsn: str, sql: str, *args: Any) -> Any:
    async def work(connection: Any) -> Any:
        return await connection.fetchval(sql, *args)

    return run(with_connection(dsn, work))


def test_a_batch_posted_twice_is_stored_once_and_acked_both_times(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A MessagePack batch is answered with its ack after commit; the same bytes again get the
    same ack and add no row; JSON and v2 columns are taken too."""
    key = make_key(f"ingest:{unique_vin}")
    first, second, third = sim_batches(unique_vin, 300, per_batch=100)
    payload = encode(first)
    for _ in range(2):
        response = _post(api, unique_vin, key, payload, **MSGPACK)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/msgpack")
        ack = decode_ack(response.content)
        assert (ack.vin, ack.batches) == (unique_vin, [first.batch])
    json_type = {"Content-Type": "application/json"}
    as_json = _post(api, unique_vin, key, encode_json(second), **json_type)
    assert decode_ack(as_json.content).batches == [second.batch]
    v2 = encode_v2(unique_vin, third.batch, columns_from_batch(third))
    assert decode_ack(_post(api, unique_vin, key, v2, **MSGPACK).content).batches == [third.batch]
    stored = _count(api.database_url, "SELECT count(*) FROM samples WHERE vin = $1", unique_vin)
    assert stored == 300


def test_a_bad_batch_gets_4xx_and_is_dead_lettered_with_its_bytes(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """Garbage (400), a batch of another vehicle (409) and future samples (422, with the ack the
    consumer would send) are each kept in `rejected` with their raw bytes; nothing is stored."""
    key = make_key(f"ingest:{unique_vin}")
    garbage = b"\xc1\x00not a batch"
    other = encode(sim_batches("WDB1240221J123456", 5)[0])
    future = encode(sim_batches(unique_vin, 5, start_us=7_000_000_000_000_000)[0])
    answers = [_post(api, unique_vin, key, body, **MSGPACK) for body in (garbage, other, future)]
    assert [a.status_code for a in answers] == [400, 409, 422]
    assert [a.json()["error"] for a in answers] == ["undecodable", "vin_mismatch",
                                                    "future_timestamp"]
    assert answers[2].json()["ack"] == {"v": 1, "vin": unique_vin, "batches": [1]}

    async def rejected(connection: Any) -> list[tuple[str, str, bytes]]:
        rows = await connection.fetch(
            "SELECT topic, reason, payload FROM rejected ORDER BY id"
        )
        return [(r["topic"], r["reason"], bytes(r["payload"])) for r in rows]

    topic = f"telemetry/{unique_vin}"
    assert run(with_connection(api.database_url, rejected)) == [
        (topic, "undecodable", garbage),
        (topic, "vin_mismatch", other),
        (topic, "future_timestamp", future),
    ]
    assert _count(api.database_url, "SELECT count(*) FROM samples") == 0


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A declared length over the limit gets 413 at once, and so does a chunked body that grows
    past it; a bad VIN in the path is 404."""
    key = make_key(f"ingest:{unique_vin}")
    big = _post(api, unique_vin, key, b"x" * (3 * 1024 * 1024))
    assert big.status_code == 413
    assert big.json()["error"] == "too_large"

    def chunks() -> Any:
        for _ in range(40):
            yield b"y" * 65536

    streamed = httpx.post(
        f"{api.url}/v1/vehicles/{unique_vin}/batches", content=chunks(), headers=auth(key)
    )
    assert streamed.status_code == 413
    assert _post(api, "NOT-A-VIN", key, b"{}").status_code == 404


def test_a_batch_posted_while_the_database_is_down_gets_503_and_is_stored_when_retried(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str, fresh_postgres: PostgresService
) -> None:
    """With the database stopped a post (and a read) is answered 503 with Retry-After and nothing
    is dead-lettered; posted again after it is back, every sample is stored once."""
    key = make_key(f"ingest:{unique_vin}")
    reader = make_key("read:*")
    batches = sim_batches(unique_vin, 200, per_batch=100)
    assert _post(api, unique_vin, key, encode(batches[0]), **MSGPACK).status_code == 200
    fresh_postgres.stop()
    try:
        down = _post(api, unique_vin, key, encode(batches[1]), **MSGPACK)
        assert down.status_code == 503, down.text
        assert down.json()["error"] == "unavailable"
        assert int(down.headers["retry-after"]) >= 1
        read = httpx.get(f"{api.url}/v1/vehicles/{unique_vin}/status", headers=auth(reader))
        assert read.status_code == 503, read.text
        assert "retry-after" in read.headers
    finally:
        fresh_postgres.start()
    answers: list[httpx.Response] = []

    def retried() -> bool:
        answers.append(_post(api, unique_vin, key, encode(batches[1]), **MSGPACK))
        return answers[-1].status_code == 200

    wait_until(retried, what="the post to succeed after the outage", timeout=60)
    assert {a.status_code for a in answers} <= {200, 503}
    assert decode_ack(answers[-1].content).batches == [batches[1].batch]
    dsn = api.database_url
    assert _count(dsn, "SELECT count(*) FROM samples WHERE vin = $1", unique_vin) == 200
    assert _count(dsn, "SELECT count(*) FROM rejected") == 0
    assert "Traceback" not in api.log_text()


