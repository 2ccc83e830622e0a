"""Starting and stopping ``revline api``: one line for what stops it, a clean stop on SIGTERM."""

from __future__ import annotations

import secrets
import subprocess
import sys
from urllib.parse import urlsplit

import asyncpg
import httpx

from revline.contract import encode
from tests.fixtures.api import (
    ACCEPT_T0,
    ROOT,
    ApiFactory,
    ApiProcess,
    KeyMaker,
    auth,
    run,
    sim_batches,
)
from tests.fixtures.services import PostgresService


def _api(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "revline.cli", "api", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


def test_bad_settings_stop_the_api_with_one_line_naming_the_key() -> None:
    """A bad port or URL stops it at start, exit 2, one line naming the key."""
    for args, key in ((["--port", "-1"], "port"), (["--database-url", "mysql://x"],
                                                   "database_url")):
        done = _api(*args)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert key in lines[0]


def test_a_database_that_cannot_be_used_stops_the_api_with_one_line(
    postgres: PostgresService,
) -> None:
    """A database that does not exist (waiting cannot cure it) stops it with one line, no
    traceback."""
    done = _api("--database-url", postgres.database_url("revline_no_such_database"))
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert "revline_no_such_database" in done.stdout + done.stderr


def test_sigterm_stops_the_api_cleanly_ending_live_streams(
    make_api: ApiFactory, make_key: KeyMaker
) -> None:
    """SIGTERM ends an open live stream and the server, exit 0, no traceback in its log."""
    api = make_api()
    assert api.process is not None
    headers = {"Authorization": f"Bearer {make_key('read:*')}"}
    with httpx.stream("GET", f"{api.url}/v1/live", headers=headers, timeout=30) as live:
        lines = live.iter_lines()
        assert next(lines).startswith("retry:")
        api.process.terminate()
        assert list(lines) == [""]  # the stream ends: the rest of the event, then nothing
    assert api.process.wait(timeout=30) == 0
    assert "Traceback" not in api.log_text()
    assert "api stopped" in api.log_text()


def test_metrics_count_requests_by_handler_and_ingest_outcomes(
    api: ApiProcess, make_key: KeyMaker, unique_vin: str
) -> None:
    """/metrics counts responses by handler and status, and HTTP ingest's refusals by reason."""
    key = make_key(f"ingest:{unique_vin}")
    httpx.post(f"{api.url}/v1/vehicles/{unique_vin}/batches", content=b"{", headers={
        "Authorization": f"Bearer {key}"})
    httpx.get(f"{api.url}/v1/vehicles")
    text = httpx.get(f"{api.url}/metrics").text
    assert 'revline_api_requests_total{handler="vehicles",status="401"} 1.0' in text
    assert 'revline_api_requests_total{handler="post_batch",status="400"} 1.0' in text
    assert 'revline_api_ingest_refused_total{reason="undecodable"} 1.0' in text
    assert "revline_api_live_streams 0.0" in text


def test_the_api_reads_as_a_read_only_role_and_ingests_as_the_writer(
    migrated_db: str, make_key: KeyMaker, unique_vin: str
) -> None:
    """Run as compose runs it: reads, keys and the live feed as a member of revline_reader with
    read-only transactions (as revline_api, sql/011_roles.sql), HTTP ingest as the owner."""
    role = f"t_api_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(migrated_db)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    run(admin(f"CREATE ROLE {role} LOGIN IN ROLE revline_reader"))
    run(admin(f"ALTER ROLE {role} SET default_transaction_read_only = on"))
    reader_url = urlsplit(migrated_db)._replace(
        netloc=f"{role}@{urlsplit(migrated_db).hostname}:{urlsplit(migrated_db).port}"
    ).geturl()
    api = ApiProcess(reader_url, [*ACCEPT_T0, "--ingest-database-url", migrated_db])
    try:
        api.start()
        key = make_key(f"read:{unique_vin}", f"ingest:{unique_vin}")
        batch = encode(sim_batches(unique_vin, 20)[0])
        posted = httpx.post(f"{api.url}/v1/vehicles/{unique_vin}/batches", content=batch,
                            headers={**auth(key), "Content-Type": "application/msgpack"})
        assert posted.status_code == 200, posted.text
        status = httpx.get(f"{api.url}/v1/vehicles/{unique_vin}/status", headers=auth(key))
        assert status.json()["seq"] == 19
        telemetry = httpx.get(f"{api.url}/v1/vehicles/{unique_vin}/telemetry",
                              params={"from": "0", "to": "2000000000000000"}, headers=auth(key))
        assert len(telemetry.text.splitlines()) == 20
    finally:
        api.close()
        run(admin(f"DROP OWNED BY {role}"))
        run(admin(f"DROP ROLE {role}"))
