"""The shipped broker's queues are bounded by bytes; what it drops beyond them, the devices resend.

Mosquitto drops QoS 1 messages for a client whose queue is full, silently for the publisher. The
end-to-end ack makes that a delay, not a loss: the edge keeps each batch until the consumer acks
it after its commit, and resends it after its ack timeout.
"""

from __future__ import annotations

import threading
from pathlib import Path

from revline.edge.config import EdgeSettings
from revline.edge.spool import SpoolReader
from tests.fixtures.broker import shipped_broker
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import StoppableSim, running_edge, spool_read, spool_settled
from tests.fixtures.services import wait_until

CAR = "1HGCM82633A004352"
CONSUMER = "revline-consumer-1"
DROPPING = f"Outgoing messages are being dropped for client {CONSUMER}"


def test_a_full_queue_drops_for_the_absent_consumer_and_the_edge_resends_recover_all(
    tmp_path: Path, database_url: str, make_consumer: ConsumerFactory
) -> None:
    """With max_queued_bytes tiny and the consumer away, the broker drops; every sample still
    lands exactly once after the consumer is back."""
    spool = str(tmp_path / "spool.db")
    sampling = threading.Event()
    with shipped_broker(
        vehicles=(CAR,), consumers=(CONSUMER,), replace={"max_queued_bytes": "32768"}
    ) as broker:
        settings = EdgeSettings(
            vin=CAR,
            mqtt_url=broker.url(CAR),
            spool_path=spool,
            clock="trusted",
            batch_max_age_s=0.2,
            ack_timeout_s=1.0,
            shutdown_timeout_s=10.0,
        )
        consumer = make_consumer(
            mqtt_url=broker.url(CONSUMER), client_id=CONSUMER, args=["--group", "revline"]
        )
        assert consumer.terminate() == 0  # away, its session kept: the broker queues for it
        source = StoppableSim(sampling, hz=10.0, speedup=20.0)  # ~40 samples a batch, 5/s
        with running_edge(settings, source=source):
            wait_until(lambda: DROPPING in broker.service.logs(), what="the broker dropping")
            sampling.set()
            consumer.start()
            wait_until(
                lambda: spool_settled(spool, lambda: cold_counts(database_url, CAR)[0]),
                what="every sample stored",
                timeout=60,
            )
        total = spool_read(spool, SpoolReader.sample_count)
        assert cold_counts(database_url, CAR) == (total, total)
        consumer.close()  # before its broker goes
