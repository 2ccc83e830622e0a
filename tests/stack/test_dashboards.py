"""The provisioned Grafana dashboard: every query runs on the real schema and finds the data."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from revline.consumer.writer import Rejected, Writer
from revline.contract import Batch
from revline.edge.sim import simulate_samples
from revline.storage.maintenance import maintain_dsn

DASHBOARD = (
    Path(__file__).resolve().parents[2]
    / "grafana"
    / "provisioning"
    / "dashboards"
    / "revline-fleet.json"
)


def _queries() -> dict[str, str]:
    """Panel title (or variable name) -> raw SQL, as Grafana stores them."""
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    found = {p["title"]: t["rawSql"] for p in board["panels"] for t in p["targets"]}
    for variable in board["templating"]["list"]:
        found[f"${variable['name']}"] = variable["query"]
    return found


def _expand(sql: str, vin: str) -> str:
    """What Grafana's PostgreSQL data source sends for a 3-hour range and one vehicle."""
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        r"\1 BETWEEN now() - interval '3 hours' AND now() + interval '1 minute'",
        sql,
    )
    return sql.replace("$vin", vin)


def test_every_dashboard_query_runs_and_finds_the_vehicle(
    migrated_db: str, unique_vin: str
) -> None:
    """Each panel's SQL executes on a migrated database holding one car's drive and a reject."""
    start = int(time.time() * 1e6) - 20 * 60 * 1_000_000
    samples = list(simulate_samples(3, start, 1_200, 1.0))  # 20 minutes at 1 Hz, ending now

    async def run() -> dict[str, list[asyncpg.Record]]:
        async with Writer(migrated_db) as writer:
            await writer.write([Batch(v=1, vin=unique_vin, batch=0, samples=samples)])
            await writer.reject(
                [Rejected(datetime.now(tz=UTC), f"telemetry/{unique_vin}", "invalid", "t", b"\0")]
            )
        await maintain_dsn(migrated_db)  # refresh the rollups
        connection = await asyncpg.connect(migrated_db)
        try:
            return {
                title: list(await connection.fetch(_expand(sql, unique_vin)))
                for title, sql in _queries().items()
            }
        finally:
            await connection.close()

    results = asyncio.run(run())
    assert len(results) >= 10
    for title, rows in results.items():
        assert rows, f"panel {title!r} found nothing"
    assert results["$vin"][0]["vin"] == unique_vin
    assert results["Vehicles reporting (last 5 min)"][0]["vehicles"] == 1
    assert results["Samples stored (dashboard range)"][0]["samples"] == 1_200
    assert results["Rejected messages (dashboard range)"][0]["rejected"] == 1

