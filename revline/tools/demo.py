"""``revline demo``: the whole pipeline on one machine, checked at the end.

It starts a Mosquitto and a PostgreSQL of its own in a temporary directory (or uses the URLs you
give), migrates the database, runs the consumer and a few simulated vehicles (the real edge
service: sampler, SQLite spool, publisher), optionally kills the broker with SIGKILL half-way,
sends one malformed message, and finally compares every vehicle's spool with the cold table:
the exit status is 0 only if no sample was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from revline.consumer.config import ConsumerSettings
from revline.consumer.service import Consumer
from revline.edge.config import EdgeSettings
from revline.edge.service import run_edge
from revline.edge.status import read_status
from revline.insight.query import trips
from revline.insight.store import Insight, setup_connection
from revline.insight.thresholds import THRESHOLDS
from revline.mqtt import MqttClientSettings, make_client, parse_mqtt_url
from revline.mqtt import connect_problem as broker_problem
from revline.settings import flag_values, load
from revline.storage.errors import connect_problem as database_problem
from revline.storage.maintenance import maintain_dsn
from revline.storage.migrate import MigrateSettings, migrate_dsn
from revline.tools.cli import DemoSettings
from revline.tools.localservices import MosquittoService, PostgresService

__all__ = ["DEMO_VINS", "run"]

# VINs of the demo fleet: valid ISO 3779 VINs with correct check digits.
DEMO_VINS = (
    "1HGCM82633A004352",
    "WVWZZZ1JZXW000001",
    "JH4KA7561PC008269",
    "1FTFW1ET5DFC10312",
    "5YJ3E1EA7KF317000",
    "WBA3A5C51CF256651",
    "2T1BURHE0JC074265",
    "3VWFE21C04M000001",
)



def _say(text: str) -> None:
    print(text, flush=True)


@dataclass
class _Stack:
    mqtt_url: str
    database_url: str
    broker: Any  # MosquittoService when the demo started it, else None


@contextlib.contextmanager
def _services(settings: DemoSettings) -> Iterator[_Stack]:
    with contextlib.ExitStack() as stack:
        broker = None
        if settings.mqtt_url:
            mqtt_url = settings.mqtt_url
            _say(f"using the broker {parse_mqtt_url(mqtt_url)}")
        else:
            _say("starting Mosquitto (local binary, temporary directory) ...")
            broker = stack.enter_context(MosquittoService(use_docker=False))
            mqtt_url = broker.url
        if settings.database_url:
            database_url = settings.database_url
            _say("using your PostgreSQL (--database-url, REVLINE_DATABASE_URL or DATABASE_URL)")
        else:
            _say("starting PostgreSQL (initdb + pg_ctl, temporary directory) ...")
            server = stack.enter_context(PostgresService(use_docker=False))
            database_url = server.create_database("revline_demo")
        yield _Stack(mqtt_url=mqtt_url, database_url=database_url, broker=broker)


async def _query(database_url: str, sql: str, *params: object) -> list[Any]:

    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *params))
    finally:
        await conn.close()


def _spool_total(path: Path) -> tuple[int, int]:
    """(samples, samples not yet acked end to end) in one vehicle's spool."""

    status = read_status(path)
    return status.samples, status.samples - status.durable


async def _table(database_url: str, spools: dict[str, Path], started: float) -> None:
    rows = await _query(
        database_url,
        "SELECT s.vin, s.speed, s.rpm, s.coolant, s.fuel, s.lat, s.lon,"
        " (SELECT count(*) FROM samples c WHERE c.vin = s.vin) AS stored"
        " FROM vehicle_state s ORDER BY s.vin",
    )
    by_vin = {r["vin"]: r for r in rows}
    _say(f"--- t={time.monotonic() - started:5.1f}s")
    _say(f"{'vehicle':<18}{'spooled':>9}{'stored':>9}  {'km/h':>6}{'rpm':>7}{'°C':>6}{'fuel%':>7}")
    for vin, path in spools.items():
        spooled, _ = _spool_total(path) if path.exists() else (0, 0)
        r = by_vin.get(vin)
        if r is None:
            _say(f"{vin:<18}{spooled:>9}{0:>9}")
            continue

        def f(value: float | None, width: int) -> str:
            return f"{value:>{width}.0f}" if value is not None else " " * (width - 1) + "-"

        _say(
            f"{vin:<18}{spooled:>9}{r['stored']:>9}  {f(r['speed'], 6)}{f(r['rpm'], 7)}"
            f"{f(r['coolant'], 6)}{f(r['fuel'], 7)}"
        )


async def _send_garbage(mqtt_url: str, vin: str) -> None:

    address = parse_mqtt_url(mqtt_url)
    client = make_client(address, "revline-demo-garbage")
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        info = client.publish(f"telemetry/{vin}", b'{"v":1,"vin":"not a vin"}', qos=1)
        await asyncio.to_thread(info.wait_for_publish, 10)
    finally:
        client.disconnect()
        client.loop_stop()


def _edge_settings(
    args: argparse.Namespace, mqtt_url: str, spools: dict[str, Path]
) -> list[EdgeSettings]:

    return [
        EdgeSettings(
            vin=vin,
            source="sim",
            sim_seed=i,
            sim_hz=10.0,
            sim_speedup=args.speedup,
            spool_path=str(path),
            mqtt_url=mqtt_url,
            clock="trusted",  # the demo machine's clock; a Pi would wait for NTP or GPS
            batch_max_age_s=0.5,
            ack_timeout_s=5.0,  # resend quickly after the broker crash
            shutdown_timeout_s=30.0,
        )
        for i, (vin, path) in enumerate(spools.items())
    ]


async def _chaos(broker: Any) -> None:
    _say("*** chaos: killing the broker with SIGKILL (it loses what it PUBACKed) ***")
    await asyncio.to_thread(broker.kill)
    await asyncio.sleep(3.0)
    await asyncio.to_thread(broker.start)
    _say("*** broker restarted; devices resend what was never acked end to end ***")


async def _demo(args: argparse.Namespace, stack: _Stack, workdir: Path) -> int:

    report = await migrate_dsn(stack.database_url, MigrateSettings(database_url=stack.database_url))
    _say(f"database schema: mode {report.mode}, {len(report.applied)} migrations applied")
    if report.mode == "postgres":
        await maintain_dsn(stack.database_url)  # today's partitions, as `revline migrate` does

    stop_all = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all.set)

    consumer_stop = asyncio.Event()
    consumer = Consumer(
        ConsumerSettings(
            mqtt_url=stack.mqtt_url,
            database_url=stack.database_url,
            client_id="revline-demo-consumer",
            metrics_port=0,
            log_every_s=30.0,
        )
    )
    vins = DEMO_VINS[: args.vehicles]
    spools = {vin: workdir / f"spool-{vin}.db" for vin in vins}
    edge_stop = asyncio.Event()
    edges = _edge_settings(args, stack.mqtt_url, spools)
    _say(
        f"driving {len(vins)} simulated vehicles for {args.seconds:.0f} s at {args.speedup:g}x "
        f"({10 * args.speedup * len(vins):.0f} samples/s); broker {stack.mqtt_url}"
    )
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(consumer.run(consumer_stop), name="consumer")
        edge_tasks = [
            tg.create_task(run_edge(s, stop=edge_stop, handle_signals=False), name=f"edge-{s.vin}")
            for s in edges
        ]
        chaos_at = args.seconds / 3 if args.chaos and stack.broker is not None else None
        garbage_sent = False
        while not stop_all.is_set() and time.monotonic() - started < args.seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_all.wait(), 5.0)
            elapsed = time.monotonic() - started
            if not garbage_sent:
                garbage_sent = True
                await _send_garbage(stack.mqtt_url, vins[0])
                _say("sent one malformed message: it must land in the dead-letter table")
            if chaos_at is not None and elapsed >= chaos_at:
                chaos_at = None
                await _chaos(stack.broker)
            with contextlib.suppress(OSError):
                await _table(stack.database_url, spools, started)
        _say("stopping the cars; each waits until its spool is acked end to end ...")
        edge_stop.set()
        await asyncio.gather(*edge_tasks)
        await _table(stack.database_url, spools, started)
        if args.keep and not stop_all.is_set():
            _say(f"still running. broker {stack.mqtt_url}  database {stack.database_url}")
            _say("try: revline tail --mqtt-url ...; psql ...; Ctrl-C to stop")
            _say(f"HTTP API: revline api --database-url {stack.database_url} (docs/api.md)")
            await stop_all.wait()
        consumer_stop.set()
    return await _verdict(stack.database_url, spools)


async def _verdict(database_url: str, spools: dict[str, Path]) -> int:

    await maintain_dsn(database_url)  # plain PostgreSQL: refresh the rollups now
    ok = True
    _say("\nresult (spool of each car vs the cold table):")
    for vin, path in spools.items():
        spooled, unacked = _spool_total(path)
        (row,) = await _query(
            database_url,
            "SELECT count(*) AS n, count(DISTINCT (ts, seq)) AS d FROM samples WHERE vin = $1",
            vin,
        )
        lost = spooled - row["d"]
        duplicated = row["n"] - row["d"]
        ok = ok and lost == 0 and duplicated == 0 and unacked == 0
        _say(
            f"  {vin}: spooled {spooled}, stored {row['n']}, lost {lost}, duplicated {duplicated},"
            f" not yet acked {unacked}"
        )
    rejected = await _query(database_url, "SELECT reason, detail, topic FROM rejected")
    for r in rejected:
        _say(f"  rejected: {r['topic']} {r['reason']}: {r['detail'][:80]}")
    (rollup,) = await _query(database_url, "SELECT count(*) AS n FROM samples_1m")
    _say(f"  1-minute rollup rows: {rollup['n']}")
    await _trips(database_url, list(spools))
    _say("OK: every sample stored exactly once" if ok else "FAILED: samples lost or duplicated")
    return 0 if ok else 1


async def _trips(database_url: str, vins: list[str]) -> None:
    """Fold what the consumer had not yet (it waits ``settle_s`` after a car's last write), then
    show each car's trips: what `revline trips VIN` prints, in short."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=setup_connection)
    try:
        insight = Insight()
        while await insight.catch_up(pool, settle_s=0):
            pass
        _say("trips (what `revline trips VIN` lists):")
        for vin in vins:
            async with pool.acquire() as connection:
                rows = await trips(connection, vin, datetime.fromtimestamp(0, tz=UTC))
            for r in reversed(rows):
                state = "ended" if r["closed"] else "open"
                _say(
                    f"  {vin}: {r['start_ts']:%H:%M:%S}-{r['end_ts']:%H:%M:%S} UTC "
                    f"{r['duration_s'] / 60:.1f} min, {r['distance_km']:.2f} km "
                    f"({r['distance_source']}), max {r['max_speed'] or 0:.0f} km/h, "
                    f"{r['completeness']:.0%} complete, {state}"
                )
            if not rows:
                _say(f"  {vin}: none (a trip is at least {THRESHOLDS.min_trip_s:.0f} s of samples; "
                     "the cars stamp real time: try --seconds 120 --speedup 1)")
    finally:
        await pool.close()


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 only if every spooled sample is in the cold table exactly once."""
    settings = load(DemoSettings, flags=flag_values(args, DemoSettings))
    # Services we were given are checked first: a closed port or a refused login is one line
    # now, not a minute of retries and then a failed check.
    problem = None
    if settings.mqtt_url:
        broker = MqttClientSettings(mqtt_url=settings.mqtt_url)
        problem = broker_problem(broker, f"revline-demo-probe-{os.getpid()}")
    if problem is None and settings.database_url:
        problem = database_problem(settings.database_url)
    if problem is not None:
        print(f"revline demo: {problem}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="revline-demo-") as tmp, _services(settings) as stack:
        failure: BaseException | None = None
        try:
            return asyncio.run(_demo(args, stack, Path(tmp)))
        except* OSError as group:
            failure = group.exceptions[0]
        print(f"revline demo: {failure}", file=sys.stderr)
        return 1
