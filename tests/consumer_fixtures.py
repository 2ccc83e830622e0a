"""Helpers for the consumer tests: the consumer as a real subprocess, a publisher, DB queries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from secrets import token_hex
from typing import Any

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from revline import mqtt
from revline.contract import Batch, Sample, ack_topic, decode_ack, encode, telemetry_topic
from tests.services import free_port, parse_mqtt_url

ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    condition: Callable[[], bool], *, what: str, timeout: float = 120.0, every: float = 0.2
) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def make_batches(
    vin: str, samples: int, per_message: int = 500, *, first_batch: int = 0, t0: int | None = None
) -> list[Batch]:
    """Batches of consecutive samples for one vehicle: unique (vin, ts, seq) each."""
    start = int(time.time() * 1e6) - samples * 1000 if t0 is None else t0
    out = []
    for index, first in enumerate(range(0, samples, per_message)):
        out.append(
            Batch(
                v=1,
                vin=vin,
                batch=first_batch + index,
                samples=[
                    Sample(ts=start + seq * 1000, seq=seq, speed=float(seq % 200), rpm=900.0)
                    for seq in range(first, min(first + per_message, samples))
                ],
            )
        )
    return out


class Publisher:
    """A QoS 1 MQTT publisher (clean session) that waits for every PUBACK."""

    def __init__(self, mqtt_url: str) -> None:
        host, port = parse_mqtt_url(mqtt_url)
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-pub-{token_hex(4)}",
            protocol=paho.MQTTv5,
        )
        self.client.max_inflight_messages_set(100)
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        """Publish one message QoS 1; returns its info to wait on."""
        return self.client.publish(topic, payload, qos=1)

    def publish_batches(self, batches: Sequence[Batch], *, wait: bool = True) -> None:
        """Publish each batch to its vehicle's topic; wait for all PUBACKs."""
        infos = [self.publish(telemetry_topic(b.vin), encode(b)) for b in batches]
        if wait:
            for info in infos:
                info.wait_for_publish(60)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def publisher(mqtt_url: str) -> Iterator[Publisher]:
    """A connected publisher, disconnected after use."""
    pub = Publisher(mqtt_url)
    try:
        yield pub
    finally:
        pub.close()


def drop_session(mqtt_url: str, client_id: str, ca_file: str | None = None) -> None:
    """Remove a consumer's persistent session from the broker, so it queues nothing more."""
    with contextlib.suppress(OSError):  # a test may have left the broker down
        mqtt.drop_session(mqtt.parse_mqtt_url(mqtt_url), client_id, ca_file=ca_file)


class ConsumerProcess:
    """``revline consumer`` as a real subprocess, with its log in a file and its metrics port."""

    def __init__(
        self, *, mqtt_url: str, database_url: str, client_id: str, args: Sequence[str] = ()
    ) -> None:
        self.mqtt_url = mqtt_url
        self.database_url = database_url
        self.client_id = client_id
        self.args = list(args)
        self.metrics_port = free_port()
        fd, name = tempfile.mkstemp(prefix="revline-consumer-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        """Start and wait until /healthz says broker and database are both reachable."""
        self.launch()
        wait_until(self.healthy, what=f"consumer healthy\n{self.log_tail()}", timeout=60)
        return self

    def launch(self) -> ConsumerProcess:
        """Start without waiting for anything (for a consumer that cannot become healthy)."""
        command = [
            sys.executable,
            "-m",
            "revline.cli",
            "--log-level",
            "debug",
            "consumer",
            "--mqtt-url",
            self.mqtt_url,
            "--database-url",
            self.database_url,
            "--client-id",
            self.client_id,
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--session-expiry-s",
            "600",
            "--log-every-s",
            "1",
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        return self

    def wait_for_log(self, pattern: str, *, timeout: float = 60.0) -> str:
        """Wait until a log line matches the regular expression ``pattern``; that line."""
        regex = re.compile(pattern)
        found: list[str] = []

        def seen() -> bool:
            assert self.process is not None
            found.extend(line for line in self.log_text().splitlines() if regex.search(line))
            if not found and self.process.poll() is not None:
                raise AssertionError(f"consumer exited with {self.process.returncode}")
            return bool(found)

        what = f"a log line matching {pattern!r}\n{self.log_tail()}"
        wait_until(seen, what=what, timeout=timeout)
        return found[0]

    def healthy(self) -> bool:
        """Whether /healthz answers 200 (fails the test at once if the process died)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"consumer exited with {self.process.returncode}\n{self.log_tail()}"
            )
        return self.http("/healthz")[0] == 200

    def http(self, path: str) -> tuple[int, str]:
        """GET a path of the metrics endpoint: (status, body); (0, "") if it does not answer."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (OSError, urllib.error.URLError):
            return 0, ""

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric from /metrics (0 if not scraped)."""
        status, body = self.http("/metrics")
        if status != 200:
            return 0.0
        match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    def rss_kib(self) -> int:
        """Resident set size from /proc/<pid>/status, KiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        assert match is not None
        return int(match.group(1))

    def kill(self) -> None:
        """SIGKILL: no flush, no ack, no disconnect."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the consumer's log, for failure messages."""
        text = self.log_path.read_text(errors="replace")
        return "--- consumer log ---\n" + "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        """The whole log."""
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Kill if still running and forget the log file."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def consumer_process(
    *,
    mqtt_url: str,
    database_url: str,
    client_id: str,
    args: Sequence[str] = (),
    drop: bool = True,
) -> Iterator[ConsumerProcess]:
    """A consumer subprocess (not yet started); killed after the test and, unless ``drop`` is
    false (it never reached the broker), its broker session dropped."""
    proc = ConsumerProcess(
        mqtt_url=mqtt_url, database_url=database_url, client_id=client_id, args=args
    )
    try:
        yield proc
    finally:
        proc.close()
        if drop:
            # A TLS broker is only reachable with the CA the consumer was given.
            ca_file = args[args.index("--ca-file") + 1] if "--ca-file" in args else None
            drop_session(mqtt_url, client_id, ca_file)


def query(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query in a fresh connection and return its rows."""

    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(database_url, timeout=10)
        try:
            rows: list[asyncpg.Record] = await connection.fetch(sql, *args)
            return rows
        finally:
            await connection.close()

    return asyncio.run(run())


def migrate(database_url: str) -> None:
    """Create the schema in a fresh database."""
    from consumer.migrate import MigrateSettings, migrate_dsn  # noqa: PLC0415

    asyncio.run(migrate_dsn(database_url, MigrateSettings(database_url=database_url)))


def cold_counts(database_url: str, vin: str) -> tuple[int, int]:
    """(rows, distinct identities) of one vehicle in the cold table; (-1, -1) if unreachable."""
    try:
        rows = query(
            database_url,
            "SELECT count(*) AS n, count(DISTINCT (ts, seq)) AS d FROM samples WHERE vin = $1",
            vin,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1, -1
    return int(rows[0]["n"]), int(rows[0]["d"])


class StreamPublisher(threading.Thread):
    """Publishes batches in the background, ``per_tick`` messages every ``tick`` seconds."""

    def __init__(
        self, mqtt_url: str, batches: Sequence[Batch], *, per_tick: int = 10, tick: float = 0.05
    ) -> None:
        super().__init__(name="stream-publisher", daemon=True)
        self.mqtt_url = mqtt_url
        self.batches = list(batches)
        self.per_tick = per_tick
        self.tick = tick
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        """Publish everything, waiting for the PUBACKs at the end."""
        try:
            with publisher(self.mqtt_url) as pub:
                infos = []
                for start in range(0, len(self.batches), self.per_tick):
                    for batch in self.batches[start : start + self.per_tick]:
                        infos.append(pub.publish(telemetry_topic(batch.vin), encode(batch)))
                    self.sent = len(infos)
                    time.sleep(self.tick)
                for info in infos:
                    info.wait_for_publish(120)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by finish()
            self.error = exc

    def finish(self) -> None:
        """Wait until every message is PUBACKed by the broker; re-raise a publishing error."""
        self.join(300)
        assert not self.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error


class AckListener:
    """Collects the batch ids of every ``ack/<vin>`` message received (close it after use)."""

    def __init__(self, mqtt_url: str, vin: str) -> None:
        host, port = parse_mqtt_url(mqtt_url)
        self.ids: list[int] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(ack_topic(vin), qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.ids.extend(decode_ack(bytes(msg.payload)).batches)

    def seen(self) -> list[int]:
        """Batch ids acked so far, in arrival order."""
        with self._lock:
            return list(self.ids)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
