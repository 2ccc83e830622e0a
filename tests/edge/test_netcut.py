"""The link between car and broker cut silently (a network namespace whose veth goes down).

Stopping the broker closes the TCP connection at once; a lost Wi-Fi does not: packets just stop,
and each side only notices through keepalive. The edge runs in its own network namespace, the
broker listens on the host end of a veth pair, and the test takes the link down and up again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.edge.spool import SpoolReader
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import spool_read
from tests.fixtures.services import MosquittoFactory, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
HOST_IP = "10.231.7.1"  # a /30 that exists only on this veth pair, inside this test
EDGE_IP = "10.231.7.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Link:
    """A network namespace for the car, joined to the host by a veth pair that can be cut."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.namespace = f"rl-car-{tag}"
        self.host_end = f"rlh{tag}"
        car_end = f"rle{tag}"
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.host_end, "type", "veth", "peer", "name", car_end)
        _ip("link", "set", car_end, "netns", self.namespace)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", self.host_end)
        _ip("link", "set", self.host_end, "up")
        inside = ("netns", "exec", self.namespace, "ip")
        _ip(*inside, "addr", "add", f"{EDGE_IP}/30", "dev", car_end)
        _ip(*inside, "link", "set", car_end, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def cut(self) -> None:
        """Drop every packet silently, as a lost radio link does."""
        _ip("link", "set", self.host_end, "down")

    def restore(self) -> None:
        """Bring the link back."""
        _ip("link", "set", self.host_end, "up")

    def close(self) -> None:
        """Remove the veth pair and the namespace."""
        subprocess.run(["ip", "link", "del", self.host_end], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], check=False, capture_output=True)


@pytest.fixture
def link() -> Iterator[Link]:
    """A cuttable link; needs root and iproute2 (CI runs as root)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    made = Link()
    yield made
    made.close()


def test_silent_link_loss_loses_nothing_and_resumes(
    link: Link,
    make_mosquitto: MosquittoFactory,
    database_url: str,
    unique_vin: str,
    tmp_path: Path,
    make_consumer: ConsumerFactory,
) -> None:
    """Car cut off for 20 s without a TCP reset: it keeps spooling, then every sample lands once."""
    port = free_port()
    broker = make_mosquitto(extra_config=[f"listener {port} {HOST_IP}"])
    spool = str(tmp_path / "spool.db")
    config = tmp_path / "edge.toml"
    config.write_text(
        f'vin = "{unique_vin}"\nsource = "sim"\nsim_speedup = 10.0\n'
        f'mqtt_url = "mqtt://{HOST_IP}:{port}"\nspool_path = "{spool}"\nclock = "trusted"\n'
        # Short keepalive and backoff so that the test notices the loss in seconds, not minutes.
        "keepalive_s = 5\nreconnect_min_s = 0.5\nreconnect_max_s = 3.0\nack_timeout_s = 10.0\n"
        "batch_max_age_s = 0.5\nshutdown_timeout_s = 15.0\n"
    )
    log = (tmp_path / "edge.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVLINE_EDGE_")}
    command = [sys.executable, "-m", "revline.cli", "edge", "--config", str(config)]
    edge = subprocess.Popen(
        ["ip", "netns", "exec", link.namespace, *command], cwd=ROOT, stdout=log, stderr=log, env=env
    )
    try:
        make_consumer(mqtt_url=broker.url)
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= 300,
            what="first rows",
            timeout=60,
        )
        link.cut()
        cut_at = time.monotonic()
        time.sleep(3)
        stored_during_cut = cold_counts(database_url, unique_vin)[0]
        time.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))
        # Nothing crossed, but the car kept sampling into its spool.
        assert cold_counts(database_url, unique_vin)[0] == stored_during_cut
        spooled = spool_read(spool, SpoolReader.sample_count)
        assert spooled >= stored_during_cut + 1_000
        link.restore()
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= spooled,
            what="the backlog",
            timeout=90,
        )
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(timeout=60) == 0
        total = spool_read(spool, SpoolReader.sample_count)
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= total,
            what="the rest",
            timeout=30,
        )
        assert cold_counts(database_url, unique_vin) == (total, total)
        open_ = spool_read(spool, SpoolReader.open_batches)
        assert open_ == 0
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait()
        log.close()
    assert "disconnected" in (tmp_path / "edge.log").read_text()
