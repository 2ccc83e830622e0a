"""The provisioned Grafana dashboards: every SQL panel runs on the real schema as Grafana's
read-only role and finds the data; every Prometheus panel asks for metrics Revline exports.

No Grafana runs here: the SQL is expanded the way Grafana's PostgreSQL data source does it for
the macros these dashboards use (``$__timeFilter``, ``$vin``; any other macro fails the test), and
how a panel draws its rows is not checked (that needs a real Grafana).
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
import yaml

from revline.audit.accounting import Accounting
from revline.consumer.metrics import Metrics
from revline.consumer.writer import Rejected, Writer
from revline.contract import Batch
from revline.edge.sim import simulate_samples
from revline.storage.maintenance import maintain_dsn
from revline.tools.brokerstats import SYS_METRICS
from revline.tools.init import set_role_passwords
from tests.conftest import random_vin

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "grafana" / "dashboards"
MINE = ("pipeline.json", "fleet.json", "vehicle.json")
"""The dashboards this test runs; other files in grafana/dashboards/ have tests of their own."""
NAMED = "Blue Civic"


def _board(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return board


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _sql_queries(name: str) -> dict[str, str]:
    """``title`` (``title#refId`` for a second query, ``$variable``) -> raw SQL."""
    board = _board(name)
    found: dict[str, str] = {}
    for panel in _panels(board):
        for target in panel["targets"]:
            if "rawSql" in target:
                key = (
                    panel["title"]
                    if target["refId"] == "A"
                    else f"{panel['title']}#{target['refId']}"
                )
                found[key] = target["rawSql"]
    for variable in board["templating"]["list"]:
        found[f"${variable['name']}"] = variable["query"]
    return found


def _expand(sql: str, vin: str) -> str:
    """What Grafana's PostgreSQL data source sends for the last 3 hours and one vehicle."""
    now = datetime.now(tz=UTC)
    start, end = (now - timedelta(hours=3)).isoformat(), (now + timedelta(minutes=1)).isoformat()
    sql = re.sub(r"\$__timeFilter\((\w+(?:\.\w+)?)\)", rf"\1 BETWEEN '{start}' AND '{end}'", sql)
    sql = sql.replace("$vin", vin)
    assert "$" not in sql, f"a macro or variable this test does not expand: {sql}"
    return sql


def _as(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


def test_every_sql_panel_runs_as_grafanas_role_and_finds_the_data(migrated_db: str) -> None:
    """Each SQL panel and variable of the pipeline, fleet and vehicle dashboards returns rows,
    run as revline_grafana on a database holding two cars' drives (one named) and a reject."""
    named, unnamed = random_vin(), random_vin()
    # Recency is what several panels show ("last 5 min", "silent for"): the drive ends now.
    start = int(time.time() * 1e6) - 20 * 60 * 1_000_000
    samples = list(simulate_samples(3, start, 1_200, 1.0))  # 20 minutes at 1 Hz, ending now

    async def run() -> dict[str, list[asyncpg.Record]]:
        async with Writer(migrated_db, derivations=[Accounting()]) as writer:
            for vin in (named, unnamed):
                await writer.write([Batch(v=1, vin=vin, batch=0, samples=samples)])
            await writer.reject(
                [Rejected(datetime.now(tz=UTC), f"telemetry/{named}", "invalid", "t", b"\0")]
            )
        await maintain_dsn(migrated_db)  # refresh the rollups
        owner = await asyncpg.connect(migrated_db)
        try:
            await owner.execute(
                "INSERT INTO vehicles (vin, name, label) VALUES ($1, $2, 'B-RL 123')", named, NAMED
            )
            # What the audit task keeps from status/<vin> and from gaps it follows.
            await owner.execute(
                "INSERT INTO audit_status (vin, online, backlog, payload) "
                "VALUES ($1, true, 42, '')",
                named,
            )
            await owner.execute(
                "INSERT INTO audit_gaps (vin, lo, hi, missing) VALUES ($1, 2000, 2009, 10)", named
            )
        finally:
            await owner.close()
        await set_role_passwords(migrated_db, {"revline_grafana": "dashboard-test"})
        grafana = await asyncpg.connect(_as(migrated_db, "revline_grafana"))
        try:
            return {
                f"{board}: {title}": list(await grafana.fetch(_expand(sql, named)))
                for board in MINE
                for title, sql in _sql_queries(board).items()
            }
        finally:
            await grafana.close()

    results = asyncio.run(run())
    assert len(results) >= 20
    for title, rows in results.items():
        assert rows, f"panel {title!r} found nothing"
    variable = {r["__value"]: r["__text"] for r in results["vehicle.json: $vin"]}
    assert variable[named] == f"{NAMED} · {named}"
    assert variable[unnamed] == f"{unnamed} · {unnamed}"
    fleet_now = {r["vin"]: r["vehicle"] for r in results["fleet.json: Fleet now (hot table)"]}
    assert fleet_now == {named: NAMED, unnamed: unnamed}
    assert results["fleet.json: Vehicles reporting (last 5 min)"][0]["vehicles"] == 2
    assert results["fleet.json: Samples stored (dashboard range)"][0]["samples"] == 2_400
    assert results["fleet.json: Rejected messages (dashboard range)"][0]["rejected"] == 1
    backlog = {
        r["vin"]: r for r in results["pipeline.json: Per vehicle: last seen and upload backlog"]
    }
    # The whole 20-minute drive arrived just now: 19 of its minutes arrived late.
    assert backlog[named]["vehicle"] == NAMED
    assert 1_100 <= backlog[named]["late_samples_15m"] <= 1_200
    assert 1_150 <= backlog[named]["oldest_arriving_s"] <= 1_300
    assert backlog[named]["device_backlog"] == 42
    assert backlog[unnamed]["device_backlog"] is None  # no status received: unknown, not 0
    loss = {
        r["vin"]: r
        for r in results["pipeline.json: Loss accounting: gaps and declared losses per vehicle"]
    }
    assert (loss[named]["samples"], loss[named]["open_gaps"], loss[named]["open_missing"]) == (
        1_200,
        1,
        10,
    )
    assert (loss[unnamed]["open_gaps"], loss[unnamed]["lost_evicted"]) == (0, 0)
    assert results["vehicle.json: Samples stored (dashboard range)"][0]["samples"] == 1_200


def _exported_metric_names() -> set[str]:
    """Every sample name the consumer's registry and ``revline broker-stats`` can expose."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    for metric in SYS_METRICS.values():
        names.update(metric.name + s for s in suffixes[metric.kind])
    names.update(
        {
            "revline_broker_up",
            "revline_broker_stats_age_seconds",
            "revline_broker_stats_ignored_total",
        }
    )
    return names


def test_every_prometheus_panel_asks_for_metrics_revline_exports() -> None:
    """Each metric named in a Prometheus query exists (consumer or broker-stats), with the label
    it is grouped by; Prometheus' own `up` is the only other name."""
    exported = _exported_metric_names()
    labels = {
        "revline_consumer_rejected_total": "reason",
        "revline_consumer_db_error_codes_total": "code",
    }
    asked = 0
    for name in MINE:
        for panel in _panels(_board(name)):
            for target in panel["targets"]:
                if "expr" not in target:
                    continue
                asked += 1
                expr = target["expr"]
                for metric in re.findall(r"\b(revline_[a-z0-9_]+|up)\b", expr):
                    assert metric == "up" or metric in exported, f"{panel['title']}: {metric}"
                for metric, label in labels.items():
                    if metric in expr and " by (" in expr:
                        assert f"by ({label})" in expr, expr
    assert asked >= 10
    assert "revline_consumer_rejected_total" in exported  # the names really are from the registry


def test_dashboards_name_provisioned_data_sources_and_explain_each_panel() -> None:
    """Unique uids, data sources that grafana/provisioning defines, a description on every panel,
    and docs/dashboards.md naming every panel of these dashboards."""
    provisioned = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "revline.yaml").read_text()
    )
    sources = {(d["type"], d["uid"]) for d in provisioned["datasources"]}
    docs = (ROOT / "docs" / "dashboards.md").read_text()
    uids = [json.loads(path.read_text())["uid"] for path in sorted(DASHBOARDS.glob("*.json"))]
    assert len(uids) == len(set(uids))
    for name in MINE:
        board = _board(name)
        assert board["title"] in docs
        for panel in _panels(board):
            used = {(t["datasource"]["type"], t["datasource"]["uid"]) for t in panel["targets"]}
            assert used <= sources, panel["title"]
            assert panel.get("description"), f"{name}: {panel['title']} has no description"
            assert panel["title"] in docs, f"docs/dashboards.md does not explain {panel['title']!r}"
