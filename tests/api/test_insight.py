"""Trips, odometer history and trouble codes (insight's tables) over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from revline.contract import Batch, Sample
from revline.tools.localservices import wait_until
from tests.fixtures.api import T0_US, ApiProcess, KeyMaker, auth, sim_batches, store

ISO_T0 = "2024-06-01T00:00:00Z"
ISO_END = "2024-06-03T00:00:00Z"


def test_a_simulated_drive_gives_trips_odometer_points_and_a_last_trip(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """Two hours of simulated driving come back as trips in time order, one odometer point per
    trip end that never goes down, and the latest trip in the vehicle's status."""
    store(api.database_url, sim_batches(unique_vin, 7200, hz=1.0))
    key = make_key(f"read:{unique_vin}")
    window = {"from": ISO_T0, "to": ISO_END}
    trips = httpx.get(
        f"{api.url}/v1/vehicles/{unique_vin}/trips", params=window, headers=auth(key)
    ).json()["items"]
    assert len(trips) >= 2
    assert [t["start_ts"] for t in trips] == sorted(t["start_ts"] for t in trips)
    assert all(t["distance_km"] > 0 for t in trips)
    points = httpx.get(
        f"{api.url}/v1/vehicles/{unique_vin}/odometer", params=window, headers=auth(key)
    ).json()["items"]
    assert [p["ts"] for p in points] == [t["end_ts"] for t in trips]
    km = [p["odometer_km"] for p in points]
    assert km == sorted(km)
    status = httpx.get(f"{api.url}/v1/vehicles/{unique_vin}/status", headers=auth(key)).json()
    assert status["last_trip"]["start_ts"] == trips[-1]["start_ts"]
    assert status["trouble_codes"] == []


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event:
            yield event, json.loads(line[6:])
            event = ""


def _report(vin: str, batch_id: int, seq: int, codes: list[str]) -> Batch:
    sample = Sample(ts=T0_US + seq * 1_000_000, seq=seq, speed=0.0, dtc=codes)
    return Batch(v=1, vin=vin, batch=batch_id, samples=[sample])


def test_trouble_codes_are_listed_shown_in_status_and_alerted_after_commit(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A code reported by the car is alerted as new on the alert stream, listed as active and in
    the status; once the car reports it gone it is alerted as cleared and listed with its time."""
    key = make_key(f"read:{unique_vin}")
    with httpx.stream("GET", f"{api.url}/v1/alerts/live", headers=auth(key), timeout=30) as live:
        wait_until(lambda: api.health()["live_streams"] == 1, what="subscribed", timeout=10)
        events = _events(live.iter_lines())
        store(api.database_url, [_report(unique_vin, 1, 1, ["P0301", "P0420"])])
        assert next(events) == ("trouble_codes", {
            "vin": unique_vin, "new": ["P0301", "P0420"], "cleared": [],
            "active": ["P0301", "P0420"],
        })
        status = httpx.get(f"{api.url}/v1/vehicles/{unique_vin}/status", headers=auth(key))
        assert [c["code"] for c in status.json()["trouble_codes"]] == ["P0301", "P0420"]
        store(api.database_url, [_report(unique_vin, 2, 2, ["P0420"])])
        assert next(events) == ("trouble_codes", {
            "vin": unique_vin, "new": [], "cleared": ["P0301"], "active": ["P0420"],
        })
    url = f"{api.url}/v1/vehicles/{unique_vin}/trouble-codes"
    listed = httpx.get(url, headers=auth(key)).json()["items"]
    assert {(c["code"], c["cleared"] is None) for c in listed} == {
        ("P0301", False), ("P0420", True)
    }
    active = httpx.get(url, params={"active": "true"}, headers=auth(key)).json()["items"]
    assert [c["code"] for c in active] == ["P0420"]
