"""`revline tail`: what a person sees for batches, acks and garbage, and what `jq` reads."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from revline.contract import Ack, Batch, Sample, encode, encode_json
from revline.tools.tail import format_json, format_message
from tests.fixtures.services import MosquittoFactory, free_port, parse_mqtt_url, wait_until

ROOT = Path(__file__).resolve().parents[2]
VIN = "1HGCM82633A004352"
# Invalid UTF-8, a NUL, an escape sequence, a line separator: nothing to print raw.
GARBAGE = b"{oops\xff\xfe\x00\x1b[31m\xe2\x80\xa8"


def _batch() -> Batch:
    return Batch(
        v=1,
        vin=VIN,
        batch=7,
        samples=[
            Sample(ts=1_764_115_200_000_000, seq=1, rpm=850.0),
            Sample(ts=1_764_115_200_100_000, seq=2, speed=0.0),
        ],
    )


def test_tail_summarises_a_batch_and_lists_samples_on_request() -> None:
    """A batch line names id, count, seq range and time range; --samples adds one line each."""
    line = format_message(f"telemetry/{VIN}", encode(_batch()))
    assert line.startswith(f"telemetry/{VIN}  batch=7 samples=2 ")
    assert "seq=1..2" in line
    assert "2025-11-26T00:00:00.000+00:00..2025-11-26T00:00:00.100+00:00" in line
    detailed = format_message(f"telemetry/{VIN}", encode_json(_batch()), samples=True).splitlines()
    assert len(detailed) == 3
    assert "seq=1 rpm=850.0" in detailed[1]
    assert "seq=2 speed=0.0" in detailed[2]


def test_tail_shows_acks_and_says_why_garbage_is_rejected_without_a_python_repr() -> None:
    """Acks list their batch ids; a malformed payload shows the reason and its first bytes in
    hex, never raw control characters or b'...'."""
    ack = format_message(f"ack/{VIN}", encode(Ack(v=1, vin=VIN, batches=[3, 4])))
    assert ack == f"ack/{VIN}  ack batches=[3, 4]"
    bad = format_message(f"telemetry/{VIN}", GARBAGE)
    assert "REJECTED undecodable" in bad
    assert "7b 6f 6f 70 73 ff fe 00 1b 5b 33 31 6d" in bad
    assert "b'" not in bad
    assert bad.isprintable()


def test_tail_json_is_one_object_per_message_with_the_raw_bytes_of_garbage() -> None:
    """--json: a batch, an ack and garbage are each one JSON line; garbage keeps every byte."""
    batch = json.loads(format_json(f"telemetry/{VIN}", encode(_batch()), samples=True))
    assert batch["type"] == "batch"
    assert (batch["vin"], batch["batch"], batch["count"]) == (VIN, 7, 2)
    assert (batch["first_seq"], batch["last_seq"]) == (1, 2)
    assert batch["samples"][0] == {
        "ts": 1_764_115_200_000_000,
        "time": "2025-11-26T00:00:00.000+00:00",
        "seq": 1,
        "rpm": 850.0,
        "flags": 0,
    }
    ack = json.loads(format_json(f"ack/{VIN}", encode(Ack(v=1, vin=VIN, batches=[3, 4]))))
    assert ack == {"topic": f"ack/{VIN}", "bytes": ack["bytes"], "type": "ack", "vin": VIN,
                   "batches": [3, 4]}  # fmt: skip
    line = format_json(f"telemetry/{VIN}", GARBAGE)
    assert "\n" not in line
    assert line.isprintable()
    bad = json.loads(line)
    assert (bad["type"], bad["reason"]) == ("rejected", "undecodable")
    assert base64.b64decode(bad["base64"]) == GARBAGE


def _publish(url: str, messages: list[tuple[str, bytes]], *, ca_file: str | None = None) -> None:
    """Publish QoS 1 messages and wait until the broker has them."""
    address = parse_mqtt_url(url)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    if ca_file:
        client.tls_set(ca_certs=ca_file)
    client.connect(address[0], address[1])
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def _tail(*argv: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MQTT_URL", "DATABASE_URL"}}
    return subprocess.Popen(
        [sys.executable, "-m", "revline.cli", "tail", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def _publish_when_subscribed(
    process: subprocess.Popen[str], url: str, messages: list[tuple[str, bytes]], **kw: str
) -> tuple[str, str]:
    """Wait for tail's "connected" line, publish, and collect what it printed until it exits."""
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("# connected"), first + process.stderr.read()
    # The subscription is sent right after the CONNACK; a retained-free broker only delivers
    # what is published after it is in place, so publish until tail has seen them all.
    done = threading.Event()

    def publisher() -> None:
        while not done.wait(0.5):
            _publish(url, messages, **kw)

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    try:
        out, err = process.communicate(timeout=60)
    finally:
        done.set()
        thread.join()
    return out, first + err


def test_tail_json_lines_from_the_broker_are_read_by_jq(
    mqtt_url: str, unique_vin: str
) -> None:
    """`revline tail --json --samples` against a real broker: each line parses, with jq too."""
    batch = _batch()
    batch.vin = unique_vin
    messages = [(f"telemetry/{unique_vin}", encode(batch)), (f"telemetry/{unique_vin}", GARBAGE)]
    process = _tail("--mqtt-url", mqtt_url, "--vin", unique_vin, "--json", "--samples",
                    "--count", "2")  # fmt: skip
    out, err = _publish_when_subscribed(process, mqtt_url, messages)
    assert process.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    # Published in rounds of [batch, garbage] until tail has two: one of each, in some order.
    assert sorted(json.loads(line)["type"] for line in lines) == ["batch", "rejected"]
    if shutil.which("jq"):
        parsed = subprocess.run(
            ["jq", "-c", ".type"], input=out, capture_output=True, text=True, check=True
        )
        assert len(parsed.stdout.splitlines()) == 2


@pytest.fixture
def pki() -> Iterator[Path]:
    """A private CA and a server certificate for localhost (openssl), readable by the broker."""
    path = Path(tempfile.mkdtemp(prefix="revline-tail-pki-"))
    path.chmod(0o755)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=Revline tail CA", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (path / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
            "-out", "server.crt")  # fmt: skip
    for file in path.iterdir():
        file.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_tail_reads_a_tls_broker_with_the_ca_file_and_says_why_not_without(
    pki: Path, make_mosquitto: MosquittoFactory, unique_vin: str
) -> None:
    """mqtts:// with --ca-file: tail prints what crosses the broker; without it, one line
    saying the certificate is not trusted, exit 1."""
    port = free_port()
    make_mosquitto(
        extra_config=[
            f"listener {port} 127.0.0.1",
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
        ]
    )
    url = f"mqtts://localhost:{port}"
    ca = str(pki / "ca.crt")
    wait_until(lambda: _tls_answers(port), what="the TLS listener", timeout=30)
    refused = _tail("--mqtt-url", url)
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == 1
    assert len(err.splitlines()) == 1, err
    assert "not trusted" in err
    ack = encode(Ack(v=1, vin=unique_vin, batches=[1]))
    process = _tail("--mqtt-url", url, "--ca-file", ca, "--vin", unique_vin, "--json",
                    "--count", "1")  # fmt: skip
    out, err = _publish_when_subscribed(
        process, url, [(f"ack/{unique_vin}", ack)], ca_file=ca
    )
    assert process.returncode == 0, err
    assert json.loads(out)["batches"] == [1]


def _tls_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
