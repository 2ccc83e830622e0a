"""The Grafana alert rules, generated from :data:`revline.insight.thresholds.THRESHOLDS`.

``grafana/provisioning/alerting/revline.yaml`` is this module's output (a test checks that the
file agrees with the thresholds in force); after changing a threshold, regenerate it with::

    python -m revline.insight.alerts grafana/provisioning/alerting/revline.yaml

Each rule asks the Revline PostgreSQL data source (uid ``revline``) a table query that returns
one row per firing vehicle (string columns become the alert's labels, the one numeric column its
value: Grafana's rules for tabular data), and a threshold expression on that value that says the
same as the query's WHERE, so the query alone names what fires. Queries read the hot table
(``vehicle_state``) and ``dtc_events``, never a scan of the samples.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from revline.insight.thresholds import THRESHOLDS, Thresholds

__all__ = ["DATASOURCE_UID", "FOLDER", "AlertRule", "provisioning", "rules"]

DATASOURCE_UID: Final = "revline"
"""The PostgreSQL data source of grafana/provisioning/datasources/revline.yaml."""
FOLDER: Final = "Revline"
GROUP: Final = "revline-vehicles"


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One alert rule: its query and the threshold Grafana applies to the query's value."""

    uid: str
    title: str
    sql: str
    evaluator: str
    """Grafana threshold evaluator: ``gt`` or ``lt``."""
    threshold: float
    for_: str
    summary: str
    severity: str


def _num(value: float) -> str:
    return f"{value:g}"


def rules(t: Thresholds = THRESHOLDS) -> list[AlertRule]:
    """The alert rules under thresholds ``t``."""
    fresh = f"now() - interval '{_num(t.alert_fresh_minutes)} minutes'"
    return [
        AlertRule(
            uid="revline-coolant-hot",
            title="Coolant over temperature",
            sql=(
                "SELECT vin, coolant::float8 AS coolant FROM vehicle_state "
                f"WHERE coolant > {_num(t.coolant_hot_c)} AND coolant_ts > {fresh}"
            ),
            evaluator="gt",
            threshold=t.coolant_hot_c,
            for_="1m",
            summary=f"Coolant of {{{{ $labels.vin }}}} above {_num(t.coolant_hot_c)} °C",
            severity="critical",
        ),
        AlertRule(
            uid="revline-battery-low",
            title="Battery low",
            sql=(
                "SELECT vin, battery::float8 AS battery FROM vehicle_state "
                f"WHERE battery < {_num(t.battery_low_v)} AND battery_ts > {fresh}"
            ),
            evaluator="lt",
            threshold=t.battery_low_v,
            for_=f"{int(t.battery_min_s)}s",
            summary=f"Battery of {{{{ $labels.vin }}}} below {_num(t.battery_low_v)} V",
            severity="warning",
        ),
        AlertRule(
            uid="revline-new-trouble-code",
            title="New trouble code",
            sql=(
                "SELECT vin, code, count(*)::float8 AS new_codes FROM dtc_events "
                f"WHERE detected_at > now() - interval '{_num(t.new_code_minutes)} minutes' "
                "GROUP BY vin, code"
            ),
            evaluator="gt",
            threshold=0,
            for_="0s",
            summary="Trouble code {{ $labels.code }} on {{ $labels.vin }}",
            severity="warning",
        ),
        AlertRule(
            uid="revline-silent-while-driving",
            title="Vehicle silent while driving",
            sql=(
                "SELECT vin, (extract(epoch FROM now() - ts) / 60)::float8 AS silent_minutes "
                "FROM vehicle_state "
                f"WHERE coalesce(speed, gps_speed) >= {_num(t.moving_kmh)} "
                f"AND ts < now() - interval '{_num(t.silent_minutes)} minutes'"
            ),
            evaluator="gt",
            threshold=t.silent_minutes,
            for_="0s",
            summary=(
                "{{ $labels.vin }} was driving and has sent nothing for "
                f"more than {_num(t.silent_minutes)} minutes"
            ),
            severity="critical",
        ),
    ]


def _rule(rule: AlertRule) -> dict[str, Any]:
    return {
        "uid": rule.uid,
        "title": rule.title,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": 600, "to": 0},
                "datasourceUid": DATASOURCE_UID,
                "model": {
                    "refId": "A",
                    "datasource": {"type": "grafana-postgresql-datasource", "uid": DATASOURCE_UID},
                    "editorMode": "code",
                    "format": "table",
                    "rawQuery": True,
                    "rawSql": rule.sql,
                },
            },
            {
                "refId": "C",
                "relativeTimeRange": {"from": 0, "to": 0},
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "datasource": {"type": "__expr__", "uid": "__expr__"},
                    "type": "threshold",
                    "expression": "A",
                    "conditions": [
                        {"evaluator": {"type": rule.evaluator, "params": [rule.threshold]}}
                    ],
                },
            },
        ],
        "noDataState": "OK",
        "execErrState": "Error",
        "for": rule.for_,
        "annotations": {"summary": rule.summary},
        "labels": {"severity": rule.severity, "source": "revline"},
        "isPaused": False,
    }


def provisioning(t: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """The alerting provisioning file (Grafana's ``apiVersion: 1`` format) as a dict."""
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": GROUP,
                "folder": FOLDER,
                "interval": "1m",
                "rules": [_rule(rule) for rule in rules(t)],
            }
        ],
    }


_HEADER: Final = (
    "# Generated by `python -m revline.insight.alerts` from revline/insight/thresholds.py:\n"
    "# edit the thresholds there and regenerate; tests/insight/test_alerts.py checks they agree.\n"
)


def render(t: Thresholds = THRESHOLDS) -> str:
    """The provisioning file's text (needs PyYAML, a development dependency)."""
    import yaml  # noqa: PLC0415 - only to regenerate the file

    return _HEADER + yaml.safe_dump(provisioning(t), sort_keys=False, allow_unicode=True)


def main(argv: list[str]) -> int:
    """Write the rule file to the path given."""
    if len(argv) != 1:
        print("usage: python -m revline.insight.alerts PATH", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
