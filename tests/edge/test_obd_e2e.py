"""OBD end to end: ELM327 emulator -> `revline edge` -> Mosquitto -> consumer -> cold table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from revline.contract import Sample
from revline.edge.config import ENV_PREFIX, EdgeSettings, load_edge_settings
from revline.edge.spool import DURABLE, SpoolReader
from tests.fixtures.consumer import ROOT, ConsumerFactory, cold_counts, query
from tests.fixtures.edge import running_acker, spool_read
from tests.fixtures.edge_sources import emulator_in
from tests.fixtures.services import wait_until

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _write_config(path: Path, values: dict[str, object]) -> None:
    """The TOML file an operator would write (JSON strings and numbers are valid TOML)."""
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))


def _spooled(spool: str) -> dict[int, Sample]:
    """Every sample the edge committed to its spool, by seq, as the contract sample."""
    return spool_read(spool, SpoolReader.samples)


def test_obd_samples_from_an_emulated_car_reach_the_broker_and_the_cold_table(
    tmp_path: Path,
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
) -> None:
    """Real decoded OBD values land once per (vin, ts, seq), and the spool sees them all durable."""
    spool = str(tmp_path / "spool.db")
    log_path = tmp_path / "edge.log"
    config = tmp_path / "edge.toml"
    with emulator_in(tmp_path) as emulator:
        emulator.start()
        _write_config(
            config,
            {
                "vin": unique_vin,
                "source": "obd",
                "obd_port": str(emulator.link),
                "fast_hz": 10.0,
                "slow_every_s": 0.5,
                "mqtt_url": mqtt_url,
                "spool_path": spool,
                "clock": "trusted",
                "batch_max_age_s": 0.5,
                "shutdown_timeout_s": 20.0,
            },
        )
        settings = load_edge_settings(config, environ={})
        assert isinstance(settings, EdgeSettings)
        assert settings.source == "obd"

        with running_acker(mqtt_url, unique_vin) as watcher:
            watcher.acking = False  # only watches the broker: acks are the real consumer's job
            make_consumer()
            env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
            with log_path.open("ab") as log:
                edge = subprocess.Popen(
                    [sys.executable, "-m", "revline.cli", "edge", "--config", str(config)],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            try:

                def progressed() -> bool:
                    if edge.poll() is not None:
                        raise AssertionError(
                            f"edge exited with {edge.returncode}\n{log_path.read_text()}"
                        )
                    rows = query(
                        database_url,
                        "SELECT count(*) AS n, count(coolant_e1) AS c, count(odometer_e1) AS o "
                        "FROM samples WHERE vin = $1",
                        unique_vin,
                    )[0]
                    return bool(
                        rows["n"] >= 30 and rows["c"] >= 1 and rows["o"] >= 1
                        and watcher.snapshot()
                    )

                wait_until(
                    progressed,
                    what="30 OBD samples with a coolant and an odometer reading in the database",
                    timeout=45,
                )
                edge.send_signal(signal.SIGTERM)
                assert edge.wait(60) == 0, log_path.read_text()
            finally:
                if edge.poll() is None:
                    edge.kill()
                    edge.wait(10)

            spooled = _spooled(spool)
            # Stopping waits for the end-to-end acks: the spool knows every sample is committed.
            wait_until(
                lambda: cold_counts(database_url, unique_vin)[0] >= len(spooled),
                what="all rows",
                timeout=30,
            )
            rows = query(
                database_url,
                "SELECT ts, seq, rpm, speed, coolant, throttle, odometer FROM samples_decoded "
                "WHERE vin = $1 ORDER BY seq",
                unique_vin,
            )
            odometer_e1 = query(
                database_url,
                "SELECT DISTINCT odometer_e1 FROM samples WHERE vin = $1 AND odometer_e1 "
                "IS NOT NULL",
                unique_vin,
            )
            state = query(
                database_url, "SELECT odometer FROM vehicle_state WHERE vin = $1", unique_vin
            )

    open_ = spool_read(spool, SpoolReader.open_batches)
    durable = spool_read(spool, SpoolReader.samples_by_state).get(DURABLE, 0)
    assert open_ == 0
    assert durable == len(spooled)

    seqs = [row["seq"] for row in rows]
    assert len(seqs) == len(set(seqs)), "a sample landed twice"
    assert set(seqs) == set(spooled)
    assert set(seqs) == set(range(min(seqs), max(seqs) + 1)), "a gap in seq"
    assert cold_counts(database_url, unique_vin) == (len(rows), len(rows))

    for row in rows:
        sample = spooled[row["seq"]]
        assert round((row["ts"] - _EPOCH).total_seconds() * 1e6) == sample.ts
        assert row["rpm"] is not None
        assert abs(row["rpm"] - sample.rpm) < 0.01  # what python-OBD decoded, unchanged
        assert 0 <= row["speed"] < 300
    assert max(row["rpm"] for row in rows) > 0
    assert all(0 <= row["rpm"] < 10_000 for row in rows)
    coolants = [row["coolant"] for row in rows if row["coolant"] is not None]
    assert coolants
    assert all(-40 <= c <= 215 for c in coolants)
    # The odometer (01A6, which python-OBD cannot discover) is in the default slow PIDs: the
    # emulated car answers 00 00 EA 5C (now and then EA 5D), 0.1 km per bit, kept exactly.
    assert {row["odometer_e1"] for row in odometer_e1} <= {59996, 59997}
    assert any(row["odometer"] == 5999.6 for row in rows)
    assert state[0]["odometer"] in (5999.6, 5999.7)

    # What crossed the broker decodes with the contract and is what the spool holds.
    seen = [s for batch in watcher.snapshot() for s in batch.samples]
    assert seen
    assert all(batch.vin == unique_vin for batch in watcher.snapshot())
    assert all(spooled[s.seq] == s for s in seen)
