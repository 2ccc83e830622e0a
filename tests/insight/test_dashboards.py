"""The Trips and Vehicle health dashboards: every SQL panel and variable runs on the real schema,
as Grafana's read-only role, and finds the data a drive leaves (trips, track, events, codes,
rollups); every panel has a description and is explained in docs/insight.md.

No Grafana runs here: the SQL is expanded the way Grafana's PostgreSQL data source does for the
macros these dashboards use (``$__timeFilter``, ``$vin``, ``$trip``; any other fails the test).
How a panel draws its rows (the geomap's layer, units) needs a real Grafana.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.insight.store import Insight
from revline.storage.maintenance import maintain_dsn
from revline.tools.init import set_role_passwords
from tests.fixtures.insight import NOW, US, Leg, as_samples, drive, move, ramp, stop

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "grafana" / "dashboards"
BOARDS = ("trips.json", "health.json")


def _queries(name: str) -> dict[str, str]:
    """``title`` or ``$variable`` -> raw SQL of one dashboard."""
    board: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    found = {
        f"{p['title']}#{t['refId']}": t["rawSql"]
        for p in board["panels"]
        for t in p["targets"]
    }
    for variable in board["templating"]["list"]:
        found[f"${variable['name']}"] = variable["query"]
    return found


def _expand(sql: str, values: dict[str, str]) -> str:
    """What Grafana's PostgreSQL data source sends for the last 3 hours and these variables."""
    now = datetime.now(tz=UTC)
    start, end = (now - timedelta(hours=3)).isoformat(), (now + timedelta(minutes=1)).isoformat()
    sql = re.sub(r"\$__timeFilter\((\w+(?:\.\w+)?)\)", rf"\1 BETWEEN '{start}' AND '{end}'", sql)
    for name, value in values.items():
        sql = sql.replace(f"${name}", value)
    assert "$" not in sql, f"a macro or variable this test does not expand: {sql}"
    return sql


def _as(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


def test_every_panel_is_described_and_explained_in_the_docs() -> None:
    """A description on every panel, the provisioned data source, and a row in docs/insight.md."""
    docs = (ROOT / "docs" / "insight.md").read_text()
    for name in BOARDS:
        board = json.loads((DASHBOARDS / name).read_text())
        assert board["title"] in docs
        for panel in board["panels"]:
            assert panel.get("description"), f"{name}: {panel['title']}"
            assert panel["title"] in docs, f"docs/insight.md does not explain {panel['title']!r}"
            assert {t["datasource"]["uid"] for t in panel["targets"]} == {"revline"}


def test_every_panel_of_the_trips_and_health_dashboards_finds_the_data(
    migrated_db: str, unique_vin: str
) -> None:
    """A 5 Hz drive ending now, with a hard brake, a hot engine, a low battery and a trouble
    code: every panel and variable of both dashboards returns rows, read as revline_grafana."""
    # Recency is what the panels show (the dashboard range): the drive ends now.
    legs = [
        move(120, 60), ramp(3, 60, 0), stop(30), move(60, 50),
        Leg("move", 60, 50, coolant=115.0), move(60, 50), Leg("stop", 60, battery=11.0),
        stop(600), move(120, 40), stop(30),
    ]
    points = drive(legs, hz=5, start=0)
    start = time.time_ns() // 1000 - points[-1].ts - 10 * US
    samples = [
        Sample(**{**{f: getattr(s, f) for f in s.__struct_fields__}, "ts": s.ts + start})
        for s in as_samples(points)
    ]
    samples.append(Sample(ts=samples[-1].ts + 1, seq=len(samples) + 1, dtc=["P0420"]))

    async def run() -> dict[str, list[asyncpg.Record]]:
        insight = Insight(NOW)
        async with Writer(migrated_db, derivations=[insight]) as writer:
            for k in range(0, len(samples), 1000):
                chunk = samples[k : k + 1000]
                await writer.write([Batch(v=1, vin=unique_vin, batch=k, samples=chunk)])
            while await insight.catch_up(writer.pool):
                pass
        await maintain_dsn(migrated_db)  # refresh the rollups
        await set_role_passwords(migrated_db, {"revline_grafana": "dashboard-test"})
        connection = await asyncpg.connect(_as(migrated_db, "revline_grafana"))
        try:
            trips = _queries("trips.json")
            trip = await connection.fetch(_expand(trips["$trip"], {"vin": unique_vin}))
            values = {"vin": unique_vin, "trip": trip[0]["__value"]}
            return {
                f"{board}: {title}": list(await connection.fetch(_expand(sql, values)))
                for board in BOARDS
                for title, sql in _queries(board).items()
            }
        finally:
            await connection.close()

    results = asyncio.run(run())
    assert len(results) == 17  # 6 + 2 variables, 8 + 1 variable
    for title, rows in results.items():
        assert rows, f"panel {title!r} found nothing"
    events = results["health.json: Health and driving events#A"]
    # the stop -> 50 km/h step after the brake is a hard acceleration too
    assert {r["kind"] for r in events} == {"hard_brake", "hard_accel", "coolant_hot", "battery_low"}
    assert [r["code"] for r in results["health.json: Active trouble codes#A"]] == ["P0420"]
    assert len(results["trips.json: Trips of $vin (started in the dashboard range)#A"]) == 2
