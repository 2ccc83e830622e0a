"""Trouble codes end to end: ELM327 emulator -> `revline edge` -> Mosquitto -> consumer ->
dtc_events, and the new-code alert's query fires on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from revline.edge.config import ENV_PREFIX
from revline.insight.alerts import rules
from tests.fixtures.consumer import ROOT, ConsumerFactory, query
from tests.fixtures.edge_sources import emulator_in
from tests.fixtures.services import wait_until


def _events(database_url: str, vin: str) -> list[tuple[object, ...]]:
    return [
        tuple(r)
        for r in query(
            database_url,
            "SELECT code, first_seen IS NOT NULL, cleared IS NOT NULL, cleared > first_seen "
            "FROM dtc_events WHERE vin = $1 ORDER BY first_seen",
            vin,
        )
    ]


def test_a_code_set_and_cleared_while_the_edge_runs_is_one_event_and_fires_the_alert(
    tmp_path: Path,
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
) -> None:
    """P0300 stored on the emulated car, then cleared, ends as one dtc_events row with both
    times; the active set is empty again, and the new-code alert query returns the code."""
    config = tmp_path / "edge.toml"
    log_path = tmp_path / "edge.log"
    with emulator_in(tmp_path) as emulator:
        emulator.start()
        values: dict[str, object] = {
            "vin": unique_vin,
            "source": "obd",
            "obd_port": str(emulator.link),
            "fast_hz": 5.0,
            "slow_every_s": 0.5,
            "mqtt_url": mqtt_url,
            "spool_path": str(tmp_path / "spool.db"),
            "clock": "trusted",
            "batch_max_age_s": 0.5,
        }
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        make_consumer()
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        with log_path.open("ab") as log:
            edge = subprocess.Popen(
                [sys.executable, "-m", "revline.cli", "edge", "--config", str(config)],
                cwd=ROOT, env=env, stdout=log, stderr=log,
            )
        try:

            def reported(expected: list[tuple[object, ...]]) -> bool:
                if edge.poll() is not None:
                    raise AssertionError(f"edge exited\n{log_path.read_text()}")
                return _events(database_url, unique_vin) == expected

            def first_report() -> bool:
                rows = query(
                    database_url, "SELECT codes FROM dtc_reports WHERE vin = $1", unique_vin
                )
                return [list(r[0]) for r in rows] == [[]]

            # The edge says the (empty) set once after it starts: the server knows it is clean.
            wait_until(first_report, what="the first (empty) code set", timeout=60)
            emulator.set_dtcs("0300")
            wait_until(
                lambda: reported([("P0300", True, False, None)]),
                what="P0300 active in dtc_events",
                timeout=60,
            )
            emulator.set_dtcs()
            wait_until(
                lambda: reported([("P0300", True, True, True)]),
                what="P0300 cleared in dtc_events",
                timeout=60,
            )
            edge.send_signal(signal.SIGTERM)
            assert edge.wait(60) == 0, log_path.read_text()
        finally:
            if edge.poll() is None:
                edge.kill()
                edge.wait(10)

    active = query(database_url, "SELECT code FROM dtc_active WHERE vin = $1", unique_vin)
    assert active == []
    (new_code,) = [rule for rule in rules() if rule.uid == "revline-new-trouble-code"]
    fired = [tuple(r) for r in query(database_url, new_code.sql)]
    assert fired == [(unique_vin, "P0300", 1.0)]
