"""Keys, scopes and rate limits over real HTTP; the key store and its command line."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import pytest

from revline.api.keys import hash_key, parse_key, parse_scopes
from revline.api.ratelimit import Buckets
from tests.fixtures.api import ROOT, ApiFactory, ApiProcess, KeyMaker, auth, sim_batches, store


def test_scopes_parse_and_refuse_what_is_not_a_scope() -> None:
    """read:*, read:<VIN> and ingest:<VIN> parse; anything else is refused by name."""
    scopes = parse_scopes(["read:*", "ingest:1HGCM82633A004352"])
    assert scopes.may_read("WDB1240221J123456")
    assert scopes.may_ingest("1HGCM82633A004352")
    assert not scopes.may_ingest("WDB1240221J123456")
    for bad in ("write:*", "read:", "ingest:*", "read:1HGCM82633A00435O"):
        with pytest.raises(ValueError, match="scope"):
            parse_scopes([bad])


def test_a_key_is_found_by_id_and_stored_only_as_its_hash() -> None:
    """A made key parses into its id and SHA-256; near-misses are not keys at all."""
    key = "rvl_abcdefghijkl_" + "A" * 43
    presented = parse_key(key)
    assert presented is not None
    assert presented.id == "abcdefghijkl"
    assert presented.digest == hash_key(key)
    assert parse_key(key + "A") is None
    assert parse_key(key.replace("rvl_", "rvk_")) is None


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    """burst requests pass at once, the next waits 1/rate, and time refills the bucket."""
    buckets = Buckets()
    assert [buckets.take("k", 2.0, 3, now=0.0) for _ in range(4)] == [0, 0, 0, 1]
    assert buckets.take("k", 2.0, 3, now=0.5) == 0
    assert buckets.take("other", 2.0, 3, now=0.5) == 0


def _get(api: ApiProcess, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{api.url}{path}", headers=headers or {}, timeout=10)


def test_requests_without_a_good_key_get_401_saying_why(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """No key, a malformed one, an unknown one and a wrong secret are each refused with a reason,
    and the key is in no log line."""
    path = f"/v1/vehicles/{unique_vin}/status"
    good = make_key("read:*")
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "missing_key"),
        ({"Authorization": "Basic abc"}, "malformed_key"),
        (auth("not-a-key"), "malformed_key"),
        (auth("rvl_zzzzzzzzzzzz_" + "A" * 43), "unknown_key"),
        (auth(wrong_secret), "unknown_key"),
    ]
    for headers, error in cases:
        response = _get(api, path, headers)
        assert response.status_code == 401, response.text
        body: dict[str, Any] = response.json()
        assert body["error"] == error
        assert "Bearer" in body["detail"]
    assert _get(api, path, {"X-API-Key": good}).status_code == 404  # known key, no data yet
    assert good not in api.log_text()
    assert wrong_secret not in api.log_text()


def test_a_key_reads_only_its_vehicles_and_posts_only_for_its_own(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """A key for one vehicle gets 403 naming the missing scope elsewhere; a read key cannot post."""
    other = "WDB1240221J123456"
    store(api.database_url, sim_batches(unique_vin, 5) + sim_batches(other, 5))
    mine = make_key(f"read:{unique_vin}")
    assert _get(api, f"/v1/vehicles/{unique_vin}/status", auth(mine)).status_code == 200
    refused = _get(api, f"/v1/vehicles/{other}/status", auth(mine))
    assert refused.status_code == 403
    assert f"read:{other}" in refused.json()["detail"]
    for path in (f"/v1/vehicles/{other}/telemetry?from=0&to=1", f"/v1/vehicles/{other}/live"):
        assert _get(api, path, auth(mine)).status_code == 403
    posted = httpx.post(
        f"{api.url}/v1/vehicles/{unique_vin}/batches", content=b"{}", headers=auth(mine)
    )
    assert posted.status_code == 403
    assert f"ingest:{unique_vin}" in posted.json()["detail"]
    ingest_only = make_key(f"ingest:{unique_vin}")
    assert _get(api, f"/v1/vehicles/{unique_vin}/status", auth(ingest_only)).status_code == 403


def test_a_key_over_its_rate_gets_429_with_retry_after(
    make_api: ApiFactory, make_key: KeyMaker
) -> None:
    """Past its burst a key is refused with 429 and Retry-After; another key is not affected."""
    api = make_api(["--rate-per-s", "0.5", "--burst", "3"])
    busy, calm = make_key("read:*"), make_key("read:*")
    codes = [_get(api, "/v1/vehicles", auth(busy)).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200]
    assert codes[3:] == [429, 429]
    limited = _get(api, "/v1/vehicles", auth(busy))
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert _get(api, "/v1/vehicles", auth(calm)).status_code == 200
    own = make_key("read:*", rate_per_s=100.0, burst=50)
    assert {_get(api, "/v1/vehicles", auth(own)).status_code for _ in range(10)} == {200}


def test_keys_are_made_listed_and_revoked_from_the_command_line(api: ApiProcess) -> None:
    """`revline api-key add` prints a working key once; `list` never shows it; `revoke` stops it
    on a running server at once (however long the server would cache it)."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "revline.cli", "api-key", *args,
             "--database-url", api.database_url],
            cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
        )

    made = cli("add", "nightly-export", "--scope", "read:*")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    presented = parse_key(key)
    assert presented is not None
    assert _get(api, "/v1/vehicles", auth(key)).status_code == 200
    listing = cli("list")
    assert presented.id in listing.stdout
    assert "nightly-export" in listing.stdout
    assert key not in listing.stdout
    assert key[20:] not in listing.stdout + listing.stderr
    assert cli("add", "x", "--scope", "write:*").returncode == 2
    revoked = cli("revoke", presented.id)
    assert revoked.returncode == 0, revoked.stderr

    def refused() -> bool:
        return _get(api, "/v1/vehicles", auth(key)).status_code == 401

    from revline.tools.localservices import wait_until  # noqa: PLC0415

    wait_until(refused, what="the revocation to reach the server", timeout=5)
    assert _get(api, "/v1/vehicles", auth(key)).json()["error"] == "revoked_key"
    assert cli("revoke", presented.id).returncode == 1
    assert key not in api.log_text()
