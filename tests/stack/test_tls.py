"""mqtts:// end to end: edge and consumer verify a TLS broker with a private CA."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.edge.config import EdgeSettings
from revline.edge.spool import SpoolReader
from tests.fixtures.consumer import ConsumerFactory, cold_counts
from tests.fixtures.edge import running_edge, spool_read
from tests.fixtures.services import MosquittoFactory, free_port, wait_until


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki() -> Iterator[Path]:
    """A private CA and a server certificate for localhost, readable by the broker's user."""
    path = Path(tempfile.mkdtemp(prefix="revline-pki-"))
    path.chmod(0o755)  # mosquitto drops root for its own user before reading them
    subj = "/CN=Revline test CA"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subj,
             "-keyout", "ca.key", "-out", "ca.crt", cwd=path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=path)  # fmt: skip
    (path / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
             cwd=path)  # fmt: skip
    for file in path.iterdir():
        file.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_edge_and_consumer_over_tls(
    pki: Path,
    make_mosquitto: MosquittoFactory,
    database_url: str,
    unique_vin: str,
    tmp_path: Path,
    make_consumer: ConsumerFactory,
) -> None:
    """With mqtts:// and the CA file, samples cross a TLS-only broker into the cold table."""
    tls_port = free_port()
    # A second listener, TLS only; the harness probes readiness on the plain default one.
    make_mosquitto(
        extra_config=[
            f"listener {tls_port} 127.0.0.1",
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
        ]
    )
    url = f"mqtts://localhost:{tls_port}"
    ca = str(pki / "ca.crt")
    # The listener really is TLS with our certificate: without the private CA it is refused.
    context = ssl.create_default_context()
    with (
        socket.create_connection(("localhost", tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="localhost").close()
    spool = str(tmp_path / "spool.db")
    settings = EdgeSettings(
        vin=unique_vin,
        mqtt_url=url,
        ca_file=ca,
        spool_path=spool,
        clock="trusted",
        sim_speedup=10.0,
        batch_max_age_s=0.5,
        shutdown_timeout_s=10.0,
    )
    make_consumer(mqtt_url=url, args=["--ca-file", ca])
    with running_edge(settings):
        wait_until(
            lambda: cold_counts(database_url, unique_vin)[0] >= 200, what="200 rows", timeout=60
        )
    total = spool_read(spool, SpoolReader.sample_count)
    wait_until(
        lambda: cold_counts(database_url, unique_vin)[0] >= total,
        what="every sample",
        timeout=60,
    )
    assert cold_counts(database_url, unique_vin) == (total, total)


def test_tls_failures_are_logged_with_their_reason(
    pki: Path, make_mosquitto: MosquittoFactory, make_consumer: ConsumerFactory
) -> None:
    """mqtt:// to a TLS listener, and mqtts:// without the private CA: each logged with why."""
    tls_port = free_port()
    make_mosquitto(
        extra_config=[
            f"listener {tls_port} 127.0.0.1",
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
        ]
    )
    cases = {
        f"mqtt://localhost:{tls_port}": "closed before CONNACK",
        f"mqtts://localhost:{tls_port}": "TLS certificate of localhost:",
    }
    # drop=False: neither gets through to the broker, so there is no session to drop.
    consumers = {
        url: make_consumer(mqtt_url=url, start=False, drop=False).launch() for url in cases
    }
    for url, reason in cases.items():
        line = consumers[url].wait_for_log("cannot connect to broker")
        assert reason in line, line
        assert "Traceback" not in consumers[url].log_text()
