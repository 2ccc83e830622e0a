"""The edge over HTTP (transport = "http"): the real edge service, spool and simulator posting to
a real ``revline api``, through a database outage."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from revline.edge.sim import SimSource
from revline.tools.localservices import wait_until
from tests.fixtures.api import ApiProcess, KeyMaker, run, with_connection
from tests.fixtures.edge import (
    StoppableSim,
    edge_settings,
    running_edge,
    spool_settled,
    spooled,
)
from tests.fixtures.services import PostgresService


def _stored(dsn: str, vin: str) -> int:
    async def work(connection: Any) -> int:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM samples WHERE vin = $1", vin
        )
        return count

    result: int = run(with_connection(dsn, work))
    return result


def test_an_edge_posting_over_http_stores_every_sample_once_through_a_database_outage(
    api: ApiProcess,
    make_key: KeyMaker,
    unique_vin: str,
    tmp_path: Path,
    fresh_postgres: PostgresService,
) -> None:
    """The edge posts its spool to the API; while the database is down it gets 503s and keeps
    every sample; once back, every spooled sample is stored exactly once and acked."""
    settings = edge_settings(
        tmp_path, unique_vin, "mqtt://127.0.0.1:1", transport="http", api_url=api.url,
        api_key=make_key(f"ingest:{unique_vin}"), wire_version=2, reconnect_max_s=0.5,
    )
    stop = threading.Event()
    source: SimSource = StoppableSim(stop, hz=10.0, speedup=10.0)
    dsn = api.database_url
    with running_edge(settings, source=source):
        wait_until(lambda: _stored(dsn, unique_vin) > 100, what="samples stored", timeout=30)
        fresh_postgres.stop()
        try:
            time.sleep(2.0)  # the edge keeps sampling into its spool and gets 503s
        finally:
            fresh_postgres.start()
        time.sleep(1.0)
        stop.set()
        wait_until(
            lambda: spool_settled(settings.spool_path, lambda: _stored(dsn, unique_vin)),
            what="every spooled sample stored and acked", timeout=60,
        )
    assert _stored(dsn, unique_vin) == spooled(settings.spool_path)
    assert "503" in api.log_text() or "unavailable" in api.log_text()
