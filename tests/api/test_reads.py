"""Read resources over real HTTP against a real database holding simulator data."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import httpx

from revline.api.queries import from_us
from tests.fixtures.api import (
    ApiProcess,
    KeyMaker,
    auth,
    run,
    sim_batches,
    store,
    with_connection,
)

ISO_T0 = "2024-06-01T12:00:00Z"
ISO_END = "2024-06-02T00:00:00Z"


def _lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


def test_vehicles_are_listed_in_pages_and_only_those_a_key_may_read(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """The vehicle list pages by VIN to the end, and a key scoped to one vehicle sees only it."""
    vins = sorted({unique_vin, *(unique_vin[:-1] + c for c in "0123")})
    for vin in vins:
        store(api.database_url, sim_batches(vin, 10))
    everything = make_key("read:*")
    seen: list[str] = []
    after = ""
    while True:
        page = httpx.get(
            f"{api.url}/v1/vehicles", params={"limit": 2, "after": after}, headers=auth(everything)
        ).json()
        seen += [item["vin"] for item in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == vins
    one = make_key(f"read:{vins[1]}")
    page = httpx.get(f"{api.url}/v1/vehicles", headers=auth(one)).json()
    assert [item["vin"] for item in page["items"]] == [vins[1]]


def test_status_gives_last_seen_position_latest_values_and_odometer(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A vehicle's status is its newest sample's time, its GPS fix and each field's latest value."""
    batches = sim_batches(unique_vin, 50)
    store(api.database_url, batches)
    newest = batches[-1].samples[-1]
    body = httpx.get(
        f"{api.url}/v1/vehicles/{unique_vin}/status", headers=auth(make_key("read:*"))
    ).json()
    assert body["vin"] == unique_vin
    assert body["last_seen"] == from_us(newest.ts).isoformat().replace("+00:00", "Z")
    assert body["seq"] == newest.seq
    assert abs(body["position"]["lat"] - newest.lat) < 1e-6
    assert abs(body["values"]["speed"]["value"] - newest.speed) < 0.06
    assert body["odometer"] is None  # the simulator reads no odometer


def test_telemetry_pages_to_the_end_of_a_large_range_in_both_formats(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """30,000 samples read 7,000 at a time by cursor come back complete, in order, once each,
    as NDJSON and as CSV."""
    batches = sim_batches(unique_vin, 30_000)
    store(api.database_url, batches)
    key = make_key(f"read:{unique_vin}")
    expected = [(s.ts, s.seq) for b in batches for s in b.samples]
    for fmt in ("ndjson", "csv"):
        got: list[tuple[int, int]] = []
        params: dict[str, Any] = {
            "from": ISO_T0, "to": ISO_END, "limit": 7000, "format": fmt, "fields": "speed,rpm",
        }
        pages = 0
        while True:
            response = httpx.get(
                f"{api.url}/v1/vehicles/{unique_vin}/telemetry", params=params, headers=auth(key)
            )
            assert response.status_code == 200, response.text
            pages += 1
            if fmt == "ndjson":
                rows = _lines(response)
                assert set(rows[0]) == {"ts", "seq", "speed", "rpm"}
                got += [(_us(r["ts"]), r["seq"]) for r in rows]
            else:
                reader = list(csv.DictReader(io.StringIO(response.text)))
                assert list(reader[0]) == ["ts", "seq", "speed", "rpm"]
                got += [(_us(r["ts"]), int(r["seq"])) for r in reader]
            cursor = response.headers.get("x-next-cursor")
            if cursor is None:
                break
            assert response.headers["link"].endswith('rel="next"')
            params["cursor"] = cursor
        assert pages == 5
        assert got == expected


def _us(text: str) -> int:
    from datetime import datetime  # noqa: PLC0415

    from revline.api.queries import to_us  # noqa: PLC0415

    moment = datetime.fromisoformat(text.replace(" ", "T"))
    if moment.tzinfo is None:
        raise AssertionError(f"{text!r} has no zone")
    return to_us(moment)


def test_coarser_resolutions_read_the_rollups(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """resolution=1m gives one row per minute from samples_1m, with counts and min/avg/max."""
    store(api.database_url, sim_batches(unique_vin, 3000))  # 5 minutes at 10 Hz
    _refresh_rollups(api.database_url)
    response = httpx.get(
        f"{api.url}/v1/vehicles/{unique_vin}/telemetry",
        params={"from": ISO_T0, "to": ISO_END, "resolution": "1m", "fields": "speed"},
        headers=auth(make_key("read:*")),
    )
    rows = _lines(response)
    assert [r["samples"] for r in rows] == [600] * 5
    assert set(rows[0]) == {"ts", "samples", "speed_avg", "speed_min", "speed_max"}
    assert all(r["speed_min"] <= r["speed_avg"] <= r["speed_max"] for r in rows)


def _refresh_rollups(dsn: str) -> None:
    # The plain-mode refresh alone: a whole maintenance pass would also apply retention, and the
    # test data is from 2024.
    async def refresh(connection: Any) -> None:
        for table, width in (("samples_1m", "1 minute"), ("samples_1h", "1 hour")):
            await connection.execute(
                "SELECT revline_refresh_rollup($1, $2::text::interval, '1 hour')", table, width
            )

    run(with_connection(dsn, refresh))


def test_hostile_query_values_get_400_saying_why(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A NUL, a bad cursor, an unknown field, a range backwards or a limit too large is a 400
    naming the parameter, never a 5xx."""
    key = make_key("read:*")
    url = f"{api.url}/v1/vehicles/{unique_vin}/telemetry"
    cases: list[tuple[str, dict[str, Any]]] = [
        (f"{api.url}/v1/vehicles", {"after": "A\x00B"}),
        (url, {"from": ISO_T0, "to": ISO_END, "cursor": "bm90IGEgY3Vyc29y"}),
        (url, {"from": ISO_T0, "to": ISO_END, "fields": "speed,\x00"}),
        (url, {"from": ISO_END, "to": ISO_T0}),
        (url, {"from": ISO_T0, "to": ISO_END, "limit": 10**9}),
        (url, {"from": "\x00", "to": ISO_END}),
    ]
    for target, params in cases:
        response = httpx.get(target, params=params, headers=auth(key))
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"] in {"bad_query", "bad_request"}
