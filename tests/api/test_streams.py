"""Live streams fed after commit, clients that go away mid-stream, bulk queries, odometer history
and the OpenAPI document, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.storage.derive import Staged
from revline.storage.notify import StateNotify
from revline.tools.localservices import wait_until
from tests.fixtures.api import (
    ApiFactory,
    ApiProcess,
    KeyMaker,
    auth,
    run,
    sim_batches,
    store,
    with_connection,
)

ISO_T0 = "2024-06-01T12:00:00Z"
ISO_END = "2024-06-03T00:00:00Z"


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of each Server-Sent Event read from ``lines``."""
    event, data = "", ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and event:
            yield event, json.loads(data)
            event, data = "", ""


class _Gate:
    """A derivation that holds each write's transaction open until released."""

    name = "gate"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def prepare(self, connection: Any) -> None:
        del connection

    async def apply(self, connection: Any, write: Staged) -> None:
        del connection, write
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)


def test_a_live_stream_tells_of_a_write_only_after_it_commits(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """The vehicle's stream sends its state at once, nothing while a write's transaction is
    open, and the new state right after it commits."""
    store(api.database_url, sim_batches(unique_vin, 10))
    later = sim_batches(unique_vin, 10, start_us=1_717_243_300_000_000, seed=2)
    later = [Batch(v=1, vin=unique_vin, batch=99, samples=[
        Sample(ts=s.ts, seq=s.seq + 1000, speed=s.speed) for s in later[0].samples
    ])]
    gate = _Gate()

    async def write() -> None:
        async with Writer(api.database_url, pool_size=1,
                          derivations=[StateNotify(), gate]) as writer:
            await writer.write(later)

    writer = threading.Thread(target=lambda: run(write()))
    with httpx.stream(
        "GET", f"{api.url}/v1/vehicles/{unique_vin}/live",
        headers=auth(make_key(f"read:{unique_vin}")), timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
        event, first = next(events)
        assert (event, first["seq"]) == ("state", 9)
        writer.start()
        assert gate.entered.wait(30)
        # The write's NOTIFY is queued but its transaction is open: nothing may arrive.
        assert api.health()["live_streams"] == 1
        threading.Timer(1.0, gate.release.set).start()
        event, second = next(events)
        assert gate.release.is_set()
        assert (event, second["seq"]) == ("state", 1009)
    writer.join(30)
    wait_until(lambda: api.health()["live_streams"] == 0, what="the stream to close", timeout=10)


def test_the_fleet_stream_sends_only_vehicles_the_key_may_read(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A key for one vehicle hears of that vehicle's writes on /v1/live, never of another's."""
    other = "WDB1240221J123456"
    with httpx.stream(
        "GET", f"{api.url}/v1/live", headers=auth(make_key(f"read:{unique_vin}")), timeout=30
    ) as response:
        wait_until(lambda: api.health()["live_streams"] == 1, what="subscribed", timeout=10)
        store(api.database_url, sim_batches(other, 5))
        store(api.database_url, sim_batches(unique_vin, 5))
        event, data = next(_events(response.iter_lines()))
        assert (event, data["vin"]) == ("state", unique_vin)


def _pool_settled(api: ApiProcess) -> bool:
    health = api.health()
    return bool(
        health["streams"] == 0 and health["live_streams"] == 0
        and health["pool_idle"] == health["pool_size"]
    )


def _copies_running(dsn: str) -> int:
    async def work(connection: Any) -> int:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'revline-api' "
            "AND state = 'active' AND query ILIKE 'COPY%'"
        )
        return count

    result: int = run(with_connection(dsn, work))
    return result


def test_a_client_that_goes_away_mid_stream_frees_its_connection(
    make_api: ApiFactory, make_key: KeyMaker, unique_vin: str
) -> None:
    """An export dropped after its first chunk stops its COPY and gives its connection back;
    so does a live stream; the server goes on serving the next export in full."""
    # A gone SSE client is noticed at the next keepalive: 1 s here, not the 15 s default, so
    # that the wait below does not race the heartbeat on a busy machine.
    api = make_api(["--rate-per-s", "10000", "--burst", "10000", "--heartbeat-s", "1"])
    store(api.database_url, sim_batches(unique_vin, 60_000))
    key = make_key("read:*")
    url = f"{api.url}/v1/vehicles/{unique_vin}/telemetry"
    params: dict[str, str | int] = {"from": ISO_T0, "to": ISO_END, "limit": 60_000}
    for _ in range(3):
        # A small receive buffer (no autotuning): the kernel cannot take the whole export.
        small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)])
        with httpx.Client(transport=small, timeout=30) as client, client.stream(
            "GET", url, params=params, headers=auth(key)
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            received = sum(len(next(chunks)) for _ in range(3))
            assert received < 1_000_000
            assert api.health()["streams"] >= 1  # still streaming when the client goes
        with httpx.stream(
            "GET", f"{api.url}/v1/vehicles/{unique_vin}/live", headers=auth(key), timeout=30
        ) as live:
            next(live.iter_lines())
    wait_until(lambda: _pool_settled(api), what="every connection back in the pool", timeout=60)
    assert _copies_running(api.database_url) == 0
    whole = httpx.get(url, params=params, headers=auth(key), timeout=60)
    assert len(whole.text.splitlines()) == 60_000


def test_a_bulk_query_pages_over_many_vehicles_in_vin_then_time_order(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """Rows of three vehicles come back by VIN then time, each naming its vehicle, across pages;
    a vehicle the key may not read is refused with 403."""
    vins = sorted({unique_vin, unique_vin[:-1] + "1", unique_vin[:-1] + "2"} - {unique_vin} |
                  {unique_vin})
    for vin in vins:
        store(api.database_url, sim_batches(vin, 500))
    key = make_key(*(f"read:{vin}" for vin in vins))
    body: dict[str, Any] = {"vins": vins[::-1], "from": ISO_T0, "to": ISO_END,
                            "fields": ["speed"], "limit": 400}
    got: list[tuple[str, int]] = []
    while True:
        response = httpx.post(f"{api.url}/v1/telemetry/query", json=body, headers=auth(key))
        assert response.status_code == 200, response.text
        got += [(r["vin"], r["seq"]) for r in map(json.loads, response.text.splitlines())]
        if "x-next-cursor" not in response.headers:
            break
        body["cursor"] = response.headers["x-next-cursor"]
    assert got == [(vin, seq) for vin in vins for seq in range(500)]
    one: dict[str, Any] = {"vins": [vins[0]], "from": ISO_T0, "to": ISO_END, "limit": 300}
    first = httpx.post(f"{api.url}/v1/telemetry/query", json=one, headers=auth(key))
    one["cursor"] = first.headers["x-next-cursor"]
    second = httpx.post(f"{api.url}/v1/telemetry/query", json=one, headers=auth(key))
    assert "x-next-cursor" not in second.headers
    rows = [json.loads(line) for line in (first.text + second.text).splitlines()]
    assert [(r["vin"], r["seq"]) for r in rows] == [(vins[0], seq) for seq in range(500)]
    body = {"vins": [*vins, "WDB1240221J123456"], "from": ISO_T0, "to": ISO_END}
    refused = httpx.post(f"{api.url}/v1/telemetry/query", json=body, headers=auth(key))
    assert refused.status_code == 403


def test_the_openapi_document_and_its_page_are_served(api: ApiProcess) -> None:
    """/schema/openapi.json documents every /v1 route and the bearer key; /schema is a page."""
    document = httpx.get(f"{api.url}/schema/openapi.json").json()
    paths = set(document["paths"])
    assert {
        "/v1/vehicles", "/v1/vehicles/{vin}/status", "/v1/vehicles/{vin}/telemetry",
        "/v1/vehicles/{vin}/odometer", "/v1/telemetry/query", "/v1/vehicles/{vin}/live",
        "/v1/live", "/v1/vehicles/{vin}/batches", "/v1/vehicles/{vin}/trips",
        "/v1/vehicles/{vin}/trouble-codes", "/v1/alerts/live",
    } <= paths
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    page = httpx.get(f"{api.url}/schema")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
