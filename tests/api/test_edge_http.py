"""The edge over HTTP (transport = "http"): the real edge service, spool and simulator posting to
a real ``revline api``, through a database outage."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from revline.contract import Ack, encode
from revline.edge.http_transport import HttpPublisher
from revline.edge.sim import SimSource
from revline.edge.spool import Spool, SpoolReader, pack_values
from revline.tools.localservices import wait_until
from revline.wire_v2 import decode_any
from tests.fixtures.api import ApiProcess, KeyMaker, run, with_connection
from tests.fixtures.edge import (
    StoppableSim,
    edge_settings,
    running_edge,
    spool_read,
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


class _Hostile(http.server.BaseHTTPRequestHandler):
    """A server that answers the edge's posts from a script: a forged ack, garbage, then the
    true ack of what was posted."""

    answers: ClassVar[list[str]] = []
    posted: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        batch = decode_any(body)
        type(self).posted.append(batch.batch)
        kind = type(self).answers.pop(0) if type(self).answers else "true"
        if kind == "forged":
            answer = encode(Ack(v=1, vin=batch.vin, batches=[batch.batch + 1000]))
        elif kind == "other_vin":
            answer = encode(Ack(v=1, vin="WDB1240221J123456", batches=[batch.batch]))
        elif kind == "garbage":
            answer = b"\xc1 not an ack"
        else:
            answer = encode(Ack(v=1, vin=batch.vin, batches=[batch.batch]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


def test_the_edge_believes_only_a_true_ack_of_what_it_posted(
    unique_vin: str, tmp_path: Path
) -> None:
    """A 200 whose body is a forged ack, another vehicle's ack or garbage marks nothing durable
    and is dead-lettered in the spool; the batch is posted again and durable on a true ack."""
    _Hostile.answers = ["forged", "other_vin", "garbage"]
    _Hostile.posted = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = edge_settings(
        tmp_path, unique_vin, "mqtt://127.0.0.1:1", transport="http",
        api_url=f"http://127.0.0.1:{server.server_address[1]}", api_key="rvl_x",
        ack_timeout_s=0.2,
    )
    try:
        with Spool(settings.spool_path) as spool:
            spool.write([(1_717_243_200_000_000 + i, pack_values({"speed": 1.0}), None)
                         for i in range(10)])
            publisher = HttpPublisher(settings, spool)
            runner = threading.Thread(target=publisher.run)
            runner.start()
            try:
                wait_until(lambda: spool_read(settings.spool_path, SpoolReader.open_batches) == 0
                           and spool_read(settings.spool_path, SpoolReader.sample_count) == 10,
                           what="the batch durable", timeout=30)
            finally:
                publisher.stop()
                runner.join(30)
    finally:
        server.shutdown()
        server.server_close()
    assert _Hostile.posted[:4] == [_Hostile.posted[0]] * 4  # the same batch, until believed
    letters = spool_read(settings.spool_path, SpoolReader.dead_letters)
    assert sorted(letter.reason for letter in letters) == [
        "undecodable", "unknown_batch", "vin_mismatch"
    ]
    assert publisher.stats.acked == 1
