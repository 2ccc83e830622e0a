"""The provisioned alert rules: generated from the thresholds, in Grafana's file format, and each
query fires on crafted data and stays silent on data that should not fire (real schema).

No Grafana runs here. The format checks are those Grafana's file provisioning applies when it
reads a rule file (pkg/services/provisioning/alerting/rules_types.go: names, folder, durations,
states, a condition among the queries); whether Grafana's PostgreSQL data source and threshold
expression then evaluate them as expected needs a real Grafana (docs/insight.md says how).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml

from revline.consumer.writer import Writer
from revline.contract import Batch, Sample
from revline.insight.alerts import DATASOURCE_UID, provisioning, rules
from revline.insight.store import Insight
from revline.insight.thresholds import THRESHOLDS, Thresholds
from revline.tools.init import set_role_passwords
from tests.conftest import random_vin

ROOT = Path(__file__).resolve().parents[2]
RULE_FILE = ROOT / "grafana" / "provisioning" / "alerting" / "revline.yaml"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "revline.yaml"
_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
"""Prometheus durations (prometheus/common model.ParseDuration), what Grafana parses."""


def test_the_rule_file_is_generated_from_the_thresholds_in_force() -> None:
    """The committed rule file is exactly what revline.insight.alerts makes of THRESHOLDS."""
    assert yaml.safe_load(RULE_FILE.read_text()) == provisioning(THRESHOLDS)


def test_the_rules_follow_the_thresholds() -> None:
    """Changing a threshold changes the rule's query and its threshold expression."""
    hotter = {r.uid: r for r in rules(Thresholds(coolant_hot_c=120, silent_minutes=30))}
    assert "coolant > 120 " in hotter["revline-coolant-hot"].sql
    assert hotter["revline-coolant-hot"].threshold == 120
    assert "interval '30 minutes'" in hotter["revline-silent-while-driving"].sql


def test_the_rule_file_has_grafanas_provisioning_format() -> None:
    """apiVersion 1; each group named, in a folder, with a parseable interval; each rule with a
    uid, a title, known states, a duration, and a condition among its queries, the query on the
    provisioned data source in table format, the condition a threshold on it."""
    document = yaml.safe_load(RULE_FILE.read_text())
    assert set(document) == {"apiVersion", "groups"}
    assert document["apiVersion"] == 1
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert DATASOURCE_UID in {d["uid"] for d in datasources}
    uids = set()
    for group in document["groups"]:
        assert set(group) == {"orgId", "name", "folder", "interval", "rules"}
        assert group["name"].strip()
        assert group["folder"].strip()
        assert _DURATION.fullmatch(group["interval"])
        assert group["interval"]
        for rule in group["rules"]:
            assert set(rule) <= {
                "uid", "title", "condition", "data", "dashboardUid", "panelId", "noDataState",
                "execErrState", "for", "keepFiringFor", "annotations", "labels", "isPaused",
            }
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule["uid"]), rule["uid"]
            assert rule["uid"] not in uids
            uids.add(rule["uid"])
            # Grafana expands $VAR in these strings at provisioning time: none may hold a '$'.
            assert rule["title"].strip()
            assert "$" not in rule["title"]
            assert rule["noDataState"] in {"NoData", "Alerting", "OK", "KeepLast"}
            assert rule["execErrState"] in {"Error", "Alerting", "OK", "KeepLast"}
            assert _DURATION.fullmatch(rule["for"])
            assert "${" not in rule["annotations"]["summary"]
            refs = {q["refId"]: q for q in rule["data"]}
            assert rule["condition"] in refs
            for ref, data in refs.items():
                assert data["model"]["refId"] == ref
                assert set(data["relativeTimeRange"]) == {"from", "to"}
            sql, condition = refs["A"], refs[rule["condition"]]
            assert sql["datasourceUid"] == DATASOURCE_UID
            assert sql["model"]["format"] == "table"
            assert sql["model"]["rawQuery"] is True
            assert condition["datasourceUid"] == "__expr__"
            assert condition["model"]["type"] == "threshold"
            assert condition["model"]["expression"] == "A"
            (evaluator,) = [c["evaluator"] for c in condition["model"]["conditions"]]
            assert evaluator["type"] in {"gt", "lt"}
            assert len(evaluator["params"]) == 1


def _sample(ts_us: int, seq: int, **values: Any) -> Sample:
    return Sample(ts=ts_us, seq=seq, **values)


def test_each_rule_query_returns_the_firing_rows_and_nothing_else(migrated_db: str) -> None:
    """On crafted vehicles (recency is what these rules test, so times are relative to now):
    each query, run as Grafana's read-only role, returns exactly the vehicles that should fire,
    with a value its threshold expression passes."""
    now = time.time_ns() // 1000
    minute = 60_000_000
    hot, cool, stale_hot = random_vin(), random_vin(), random_vin()
    low, fine, stale_low = random_vin(), random_vin(), random_vin()
    gone_driving, gone_parked, driving = random_vin(), random_vin(), random_vin()
    coded, old_code = random_vin(), random_vin()
    crafted = {
        hot: [_sample(now - minute, 1, coolant=115.0)],
        cool: [_sample(now - minute, 1, coolant=90.0)],
        stale_hot: [_sample(now - 30 * minute, 1, coolant=118.0),
                    _sample(now - minute, 2, speed=30.0)],
        low: [_sample(now - minute, 1, battery=11.2)],
        fine: [_sample(now - minute, 1, battery=12.6)],
        stale_low: [_sample(now - 30 * minute, 1, battery=10.0),
                    _sample(now - minute, 2, speed=30.0)],
        gone_driving: [_sample(now - 20 * minute, 1, speed=50.0)],
        gone_parked: [_sample(now - 21 * minute, 1, speed=50.0),
                      _sample(now - 20 * minute, 2, speed=0.0)],
        driving: [_sample(now - minute, 1, speed=50.0)],
        coded: [_sample(now - minute, 1, dtc=["P0420"])],
        old_code: [_sample(now - 2 * minute, 1, dtc=["P0171"])],
    }

    async def scenario() -> dict[str, list[tuple[Any, ...]]]:
        async with Writer(migrated_db, derivations=[Insight()]) as writer:
            for vin, samples in crafted.items():
                await writer.write([Batch(v=1, vin=vin, batch=1, samples=samples)])
        owner = await asyncpg.connect(migrated_db)
        try:
            # Stored by the server a day ago: no longer new.
            await owner.execute(
                "UPDATE dtc_events SET detected_at = now() - interval '1 day' WHERE vin = $1",
                old_code,
            )
        finally:
            await owner.close()
        # Grafana evaluates the rules through its data source: as the read-only role.
        await set_role_passwords(migrated_db, {"revline_grafana": "alert-test"})
        parts = urlsplit(migrated_db)
        grafana = urlunsplit(
            parts._replace(netloc=f"revline_grafana@{parts.netloc.rsplit('@', 1)[-1]}")
        )
        connection = await asyncpg.connect(grafana)
        try:
            return {r.uid: [tuple(x) for x in await connection.fetch(r.sql)] for r in rules()}
        finally:
            await connection.close()

    fired = asyncio.run(scenario())
    assert fired["revline-coolant-hot"] == [(hot, 115.0)]
    assert [r[:1] for r in fired["revline-battery-low"]] == [(low,)]
    assert fired["revline-battery-low"][0][1] == pytest.approx(11.2)
    assert fired["revline-new-trouble-code"] == [(coded, "P0420", 1.0)]
    assert [r[0] for r in fired["revline-silent-while-driving"]] == [gone_driving]
    for rule in rules():
        for row in fired[rule.uid]:
            value = row[-1]
            passes = value > rule.threshold if rule.evaluator == "gt" else value < rule.threshold
            assert passes, (rule.uid, row)
