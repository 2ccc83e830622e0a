"""GPS position and time: gpsd (JSON over TCP) or NMEA 0183 from a serial receiver.

Both yield readings with ``lat``, ``lon``, ``alt``, ``heading`` and ``gps_speed`` (km/h), and a
``wall_us`` (UTC µs) taken from the fix time, but only while the fix is valid: a receiver without
a fix reports its own free-running or default clock, which is no better than the Pi's. The
clock model uses ``wall_us`` to correct timestamps taken before NTP (see docs/clock.md).

Parsing is pure (:func:`fix_from_tpv`, :class:`NmeaParser`) and tested on real sentences; the
sources around it only move bytes and reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any, Final, Self

import pynmea2
import stamina

from revline.edge.reading import Reading
from revline.logs import kv

__all__ = ["GpsFix", "GpsdSource", "NmeaParser", "NmeaSource", "fix_from_tpv"]

log = logging.getLogger("revline.edge.gps")

KNOTS_TO_KMH: Final = 1.852
MS_TO_KMH: Final = 3.6


@dataclass(frozen=True, slots=True)
class GpsFix:
    """One position fix; ``wall_us`` only when the receiver's fix (and so its time) is valid."""

    values: dict[str, float]
    wall_us: int | None

    def reading(self, mono_ns: int) -> Reading:
        """The fix as a reading taken at ``mono_ns``."""
        return Reading(mono_ns=mono_ns, values=dict(self.values), wall_us=self.wall_us)


def _us(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def fix_from_tpv(report: dict[str, Any]) -> GpsFix | None:
    """A fix from a gpsd TPV report; None for other classes and for ``mode`` < 2 (no fix)."""
    if report.get("class") != "TPV" or int(report.get("mode", 0)) < 2:
        return None
    lat, lon = report.get("lat"), report.get("lon")
    if not isinstance(lat, int | float) or not isinstance(lon, int | float):
        return None
    values: dict[str, float] = {"lat": float(lat), "lon": float(lon)}
    alt = report.get("altMSL", report.get("alt"))
    if report.get("mode") == 3 and isinstance(alt, int | float):  # 2D fixes have no altitude
        values["alt"] = float(alt)
    track = report.get("track")
    if isinstance(track, int | float):
        values["heading"] = float(track) % 360.0
    speed = report.get("speed")
    if isinstance(speed, int | float) and speed >= 0:
        values["gps_speed"] = float(speed) * MS_TO_KMH
    wall_us = None
    stamp = report.get("time")
    if isinstance(stamp, str):
        try:
            wall_us = _us(datetime.fromisoformat(stamp.replace("Z", "+00:00")))
        except ValueError:
            wall_us = None
    return GpsFix(values, wall_us)


class NmeaParser:
    """Turns NMEA sentences into fixes: one per valid RMC, with the altitude of the last GGA.

    RMC carries position, speed, course, date and time and a validity flag; GGA carries the
    altitude and fix quality. Receivers send GGA and RMC once per second in either order.
    """

    def __init__(self) -> None:
        self._alt: float | None = None

    def feed(self, line: str) -> GpsFix | None:
        """Parse one sentence; a fix when it completes one, else None (bad checksums too)."""
        try:
            msg = pynmea2.parse(line.strip(), check=True)
        except (pynmea2.ParseError, ValueError, AttributeError, TypeError):
            return None
        kind = getattr(msg, "sentence_type", "")
        if kind == "GGA":
            valid = str(getattr(msg, "gps_qual", "") or "0") not in {"0", ""}
            altitude = getattr(msg, "altitude", None)
            self._alt = float(altitude) if valid and altitude not in (None, "") else None
            return None
        if kind != "RMC" or getattr(msg, "status", "V") != "A":
            return None
        try:
            values = {"lat": float(msg.latitude), "lon": float(msg.longitude)}
        except (TypeError, ValueError):
            return None
        if self._alt is not None:
            values["alt"] = self._alt
        if msg.spd_over_grnd not in (None, ""):
            values["gps_speed"] = float(msg.spd_over_grnd) * KNOTS_TO_KMH
        if msg.true_course not in (None, ""):
            values["heading"] = float(msg.true_course) % 360.0
        wall_us = None
        if isinstance(msg.datestamp, date) and msg.timestamp is not None:
            moment = datetime.combine(msg.datestamp, msg.timestamp)
            wall_us = _us(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
        return GpsFix(values, wall_us)


class _Closed:
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class GpsdSource(_Closed):
    """Fixes from gpsd (``?WATCH`` JSON stream over TCP), reconnecting with backoff."""

    name = "gps"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 2947,
                 reconnect_initial_s: float = 1.0, reconnect_max_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.has_fix = False

    async def readings(self) -> AsyncIterator[Reading]:
        """Readings for every TPV report with a fix, forever."""
        while True:
            reader, writer = await self._connect()
            try:
                writer.write(b'?WATCH={"enable":true,"json":true}\n')
                await writer.drain()
                while line := await reader.readline():
                    try:
                        report = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(report, dict) or report.get("class") != "TPV":
                        continue
                    fix = fix_from_tpv(report)
                    self.has_fix = fix is not None
                    if fix is not None:
                        yield fix.reading(time.monotonic_ns())
                log.warning("gpsd closed the connection", extra=kv(host=self.host))
            finally:
                writer.close()
                self.has_fix = False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async for attempt in stamina.retry_context(
            on=OSError, attempts=None, timeout=None,
            wait_initial=self.reconnect_initial_s, wait_max=self.reconnect_max_s,
        ):
            with attempt:
                return await asyncio.open_connection(self.host, self.port)
        raise AssertionError("unreachable: retries are unbounded")


class NmeaSource:
    """Fixes from an NMEA receiver on a serial port (pyserial on one worker thread)."""

    name = "gps"

    def __init__(self, *, device: str, baudrate: int = 9600,
                 reconnect_initial_s: float = 1.0, reconnect_max_s: float = 30.0) -> None:
        self.device = device
        self.baudrate = baudrate
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.has_fix = False
        self._executor: ThreadPoolExecutor | None = None
        self._port: Any = None

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gps-io")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        executor, self._executor = self._executor, None
        port, self._port = self._port, None
        if port is not None:
            port.close()  # unblocks a pending readline in the worker
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise RuntimeError("gps: use 'async with' before reading")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        import serial  # noqa: PLC0415 - pyserial is an edge-only dependency

        # timeout bounds each readline, so closing never waits on a silent receiver for long.
        self._port = serial.Serial(self.device, self.baudrate, timeout=1.0)

    async def readings(self) -> AsyncIterator[Reading]:
        """Readings for every valid RMC sentence, forever."""
        while True:
            async for attempt in stamina.retry_context(
                on=OSError, attempts=None, timeout=None,
                wait_initial=self.reconnect_initial_s, wait_max=self.reconnect_max_s,
            ):
                with attempt:
                    await self._run(self._open)
            parser = NmeaParser()
            try:
                while True:
                    raw: bytes = await self._run(self._port.readline)
                    if not raw:
                        continue
                    fix = parser.feed(raw.decode("ascii", "replace"))
                    if fix is not None:
                        self.has_fix = True
                        yield fix.reading(time.monotonic_ns())
            except OSError as exc:  # serial.SerialException is an OSError
                log.warning("GPS receiver lost", extra=kv(device=self.device, error=str(exc)))
            finally:
                self.has_fix = False
                port, self._port = self._port, None
                if port is not None:
                    await self._run(port.close)
