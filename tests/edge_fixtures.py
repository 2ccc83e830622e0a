"""Helpers for the edge tests: a tiny real MQTT acker standing in for the consumer.

The acker subscribes to ``telemetry/<vin>``, decodes every batch with the contract and answers
with an :class:`revline.contract.Ack` on ``ack/<vin>``, like the consumer does after its commit.
It records what arrived, in order, so tests can check identities, duplicates and ordering.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from revline.contract import Ack, Batch, ack_topic, decode_batch, encode, telemetry_topic
from revline.edge.config import EdgeSettings
from revline.edge.reading import Reading
from revline.edge.service import run_edge
from revline.edge.sim import SimSource
from revline.mqtt import make_client, parse_mqtt_url


@dataclass
class Acker:
    """What a running acker has seen; ``acking`` can be switched off to play a dead consumer."""

    vin: str
    batches: list[Batch] = field(default_factory=list)
    acking: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seqs(self) -> list[int]:
        """Every sample sequence number received, in arrival order, duplicates included."""
        with self.lock:
            return [s.seq for b in self.batches for s in b.samples]

    def identities(self) -> set[tuple[int, int]]:
        """Distinct ``(ts, seq)`` identities received."""
        with self.lock:
            return {(s.ts, s.seq) for b in self.batches for s in b.samples}

    def snapshot(self) -> list[Batch]:
        """The batches received so far."""
        with self.lock:
            return list(self.batches)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    """Poll until ``predicate()`` holds; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@contextmanager
def running_acker(mqtt_url: str, vin: str, *, persistent: bool = False) -> Iterator[Acker]:
    """Run an acker in a background thread (paho loop_start), reconnecting on its own.

    ``persistent``: a fixed client id and a session kept by the broker, so that messages
    published while the acker reconnects are queued for it, in order.
    """
    acker = Acker(vin=vin)
    client_id = f"acker-{vin}" if persistent else f"acker-{uuid.uuid4().hex[:8]}"
    client = make_client(parse_mqtt_url(mqtt_url), client_id)
    topic = telemetry_topic(vin)
    subscribed = threading.Event()

    def on_connect(c: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(*_args: Any) -> None:
        subscribed.set()

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        batch = decode_batch(bytes(msg.payload), msg.topic)
        with acker.lock:
            acker.batches.append(batch)
        if acker.acking:
            c.publish(ack_topic(vin), encode(Ack(v=1, vin=vin, batches=[batch.batch])), qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    address = parse_mqtt_url(mqtt_url)
    client.reconnect_delay_set(1, 2)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600 if persistent else 0
    client.connect(address.host, address.port, clean_start=not persistent, properties=props)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise AssertionError("acker could not subscribe")
        yield acker
    finally:
        client.disconnect()
        client.loop_stop()


@contextmanager
def running_edge(
    settings: EdgeSettings, *, source: SimSource | None = None
) -> Iterator[threading.Thread]:
    """Run the real edge service with the simulator source in a thread; stop it on exit.

    The simulator runs at ``settings.sim_hz`` x ``settings.sim_speedup`` samples per second;
    ``source`` replaces it (e.g. one that stops sampling while the edge keeps publishing).
    """
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_box: list[asyncio.Event] = []
    errors: list[BaseException] = []
    started = threading.Event()

    async def main() -> None:
        stop_box.append(asyncio.Event())
        loop_box.append(asyncio.get_running_loop())
        started.set()
        sim = source or SimSource(
            hz=settings.sim_hz, seed=settings.sim_seed, speedup=settings.sim_speedup
        )
        await run_edge(settings, sources=[sim], stop=stop_box[0])

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=target, name="edge", daemon=True)
    thread.start()
    started.wait(10)

    def spool_ready() -> bool:
        if errors:
            raise errors[0]
        try:
            spool_query(settings.spool_path, "SELECT count(*) FROM batches")
        except sqlite3.Error:
            return False
        return True

    try:
        wait_for(spool_ready, 30, "the edge service to open its spool")
        yield thread
    finally:
        if loop_box:
            loop_box[0].call_soon_threadsafe(stop_box[0].set)
        thread.join(60)
        if errors:
            raise errors[0]
        assert not thread.is_alive(), "edge service did not stop"


class HoldingProxy:
    """A TCP proxy in front of the broker that can hold what the client sends, not what it gets.

    While held, the client's packets (PUBLISH, PINGREQ) wait in the proxy, so the broker has not
    seen them and sends no PUBACK, while messages from the broker still reach the client: the
    window in which an ack can arrive for a batch the broker has not taken yet.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._server.settimeout(0.2)
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="proxy", daemon=True)]
        self._threads[0].start()

    def url(self) -> str:
        """``mqtt://`` URL of the proxy."""
        return f"mqtt://127.0.0.1:{self.port}"

    def hold(self) -> None:
        """Stop forwarding client -> broker (data waits, nothing is lost)."""
        self._flowing.clear()

    def release(self) -> None:
        """Forward client -> broker again, held data first."""
        self._flowing.set()

    def close(self) -> None:
        """Close every connection and the listener."""
        self._closed.set()
        self._flowing.set()
        for sock in [self._server, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            for src, dst, gated in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pump, args=(src, dst, gated), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if gated:
                    self._flowing.wait()
                dst.sendall(data)
        for sock in (src, dst):  # one side closed: close the pair, as a real link would
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def holding_proxy(mqtt_url: str) -> Iterator[HoldingProxy]:
    """A :class:`HoldingProxy` in front of ``mqtt_url``'s broker, closed on exit."""
    address = parse_mqtt_url(mqtt_url)
    proxy = HoldingProxy((address.host, address.port))
    try:
        yield proxy
    finally:
        proxy.close()


def spool_query(path: str, sql: str, *args: object) -> list[Any]:
    """Rows of a read-only query on a spool, safe while the service writes it."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class StoppableSim(SimSource):
    """The simulator until ``stop`` is set; then the edge goes on publishing what it spooled."""

    def __init__(self, stop: threading.Event, *, hz: float, speedup: float) -> None:
        super().__init__(hz=hz, speedup=speedup)
        self.stop = stop

    async def readings(self) -> AsyncIterator[Reading]:
        """The simulator's readings until ``stop`` is set."""
        async for reading in super().readings():
            if self.stop.is_set():
                return
            yield reading


def spool_settled(path: str, stored: Callable[[], int]) -> bool:
    """Every spooled sample is in a batch, every batch acked end to end, and ``stored()`` (the
    database's count for the vehicle) has them all."""
    (open_,) = spool_query(path, "SELECT count(*) FROM batches WHERE state < 2")[0]
    (sampled,) = spool_query(path, "SELECT count(*) FROM samples")[0]
    (batched,) = spool_query(path, "SELECT coalesce(sum(n), 0) FROM batches")[0]
    return bool(open_ == 0 and sampled == batched <= stored())


def _serve(spool_path: str, vin: str, mqtt_url: str, rate: float, flush: float) -> None:
    """The edge service as its own process, for tests that kill it with SIGKILL."""
    settings = EdgeSettings(
        vin=vin,
        spool_path=spool_path,
        mqtt_url=mqtt_url,
        clock="trusted",
        sim_hz=10.0,
        sim_speedup=rate / 10.0,
        flush_interval_s=flush,
    )
    asyncio.run(run_edge(settings, sources=[SimSource(hz=10.0, speedup=rate / 10.0)]))


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
