"""The edge service with the real consumer and PostgreSQL: every spooled sample lands once."""

from __future__ import annotations

from pathlib import Path

from revline.edge.config import EdgeSettings
from revline.edge.spool import DURABLE, SpoolReader
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import running_edge, spool_read
from tests.fixtures.services import wait_until


def test_simulated_drive_reaches_the_cold_table_exactly_once(
    tmp_path: Path,
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
) -> None:
    """Samples go sim -> spool -> broker -> consumer -> cold table, acked back into the spool."""
    path = str(tmp_path / "spool.db")
    settings = EdgeSettings(
        vin=unique_vin,
        mqtt_url=mqtt_url,
        spool_path=path,
        clock="trusted",
        sim_hz=10.0,
        sim_speedup=20.0,  # 200 samples/s
        batch_max_age_s=0.5,
        shutdown_timeout_s=10.0,
    )
    make_consumer()
    with running_edge(settings):
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= 1000,
            what="1000 rows",
            timeout=90,
        )
    total = spool_read(path, SpoolReader.sample_count)
    wait_until(
        lambda: cold_counts(database_url, unique_vin)[0] >= total,
        what="every sample",
        timeout=60,
    )
    assert cold_counts(database_url, unique_vin) == (total, total)
    open_ = spool_read(path, SpoolReader.open_batches)
    durable = spool_read(path, SpoolReader.samples_by_state).get(DURABLE, 0)
    # Stopping waits for the end-to-end acks, so the spool knows all of it is in the database.
    assert open_ == 0
    assert durable == total


def test_an_edge_told_to_speak_v1_lands_every_sample_once(
    tmp_path: Path,
    mqtt_url: str,
    database_url: str,
    unique_vin: str,
    make_consumer: ConsumerFactory,
) -> None:
    """With wire_version = 1 (a consumer older than v2) the same path holds: spool -> v1
    MessagePack samples -> consumer -> acked; the test above runs the default, v2."""
    path = str(tmp_path / "spool.db")
    settings = EdgeSettings(
        vin=unique_vin,
        mqtt_url=mqtt_url,
        spool_path=path,
        clock="trusted",
        sim_hz=10.0,
        sim_speedup=20.0,
        batch_max_age_s=0.5,
        shutdown_timeout_s=10.0,
        wire_version=1,
    )
    make_consumer()
    with running_edge(settings):
        wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= 300, what="300 rows")
    total = spool_read(path, SpoolReader.sample_count)
    wait_until(lambda: cold_counts(database_url, unique_vin)[0] >= total, what="every sample")
    assert cold_counts(database_url, unique_vin) == (total, total)
    assert spool_read(path, SpoolReader.samples_by_state).get(DURABLE, 0) == total
