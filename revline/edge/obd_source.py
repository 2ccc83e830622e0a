"""OBD-II through an ELM327 adapter with python-OBD: serial, Bluetooth RFCOMM, or a BLE bridge pty.

python-OBD does the ELM327 dialogue and the PID decoding; this module decides what to ask and
when (``edge.pids``), keeps the connection alive and turns answers into readings.

- Only PIDs the car reports as supported are queried; the others are logged once per connection.
- PIDs python-OBD does not know (:data:`PROBED_COMMANDS`: the odometer, 01 A6) are defined here;
  python-OBD reads only the support bitmaps up to PID 0x5F, so these are probed once per
  connection instead (one forced query): kept if the car answers, dropped and logged if not.
- python-OBD is blocking, so every call runs on one dedicated worker thread: the event loop never
  blocks, and the serial port is never touched by two threads at once (closing included).
- The adapter or the ignition dropping shows as python-OBD losing its connection status, or as
  answers that stop coming; the source then closes the port and reconnects with jittered
  exponential backoff (stamina), forever, until it is closed.
- DTCs are read at each connection and again whenever the MIL or the DTC count (``STATUS``)
  changes; ``DTC_COUNT`` and ``MIL`` (1.0/0.0) go into the reading's ``extra``; the codes are
  logged and kept in :attr:`ObdSource.dtcs` for ``revline edge status``. The set of stored
  (mode 03) and pending (mode 07, where supported) codes goes into the next reading's ``dtc``
  whenever it differs from the set last sent (always on the first read after a start), so it
  travels in the spooled, acked batches like any value (docs/wire.md, ``dtc``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import obd
import stamina
from obd import OBDStatus

from revline.edge.pids import PidSchedule, convert, split_supported
from revline.edge.reading import Reading
from revline.logs import kv

__all__ = [
    "ODOMETER",
    "PROBED_COMMANDS",
    "AdapterLostError",
    "ObdSource",
    "command",
    "decode_odometer",
    "unknown_pids",
]

log = logging.getLogger("revline.edge.obd")

_T = TypeVar("_T")

STATUS_PID: Final = "STATUS"
DTC_PID: Final = "GET_DTC"
PENDING_DTC_PID: Final = "GET_CURRENT_DTC"


_ODOMETER_PID: Final = 0xA6


def decode_odometer(messages: list[Any]) -> Any:
    """SAE J1979 PID A6, total distance: 4 bytes A..D, 0.1 km per bit, as a pint Quantity (km).

    The command does not let python-OBD pad or trim the answer (``_bytes=0``), so a short answer,
    or one for another PID, decodes to None (a null response) instead of a made-up distance.
    """
    data = bytes(messages[0].data)  # mode, PID, A, B, C, D
    if len(data) < 6 or data[1] != _ODOMETER_PID:
        return None
    return obd.Unit.km * int.from_bytes(data[2:6], "big") / 10


ODOMETER: Final = obd.OBDCommand(
    "ODOMETER", "Total distance traveled", b"01A6", 0, decode_odometer, obd.ECU.ALL, True
)
"""Mode 01 PID A6. Any ECU may answer: on hybrids it is not the engine ECU (the emulated car
answers from 7EA, the hybrid control module), and python-OBD's ``ECU.ENGINE`` would drop it."""

PROBED_COMMANDS: Final[Mapping[str, Any]] = {ODOMETER.name: ODOMETER}
"""Commands python-OBD lacks, by name; their support is probed at each connection."""


class AdapterLostError(Exception):
    """The adapter, the link to it or the car's ECU does not answer (transient: reconnect)."""


def command(name: str) -> Any:
    """The python-OBD command for a configured PID name (see :func:`unknown_pids`)."""
    probed = PROBED_COMMANDS.get(name)
    return probed if probed is not None else obd.commands[name]


def unknown_pids(names: Iterable[str]) -> list[str]:
    """The names neither python-OBD nor :data:`PROBED_COMMANDS` knows, to reject a config."""
    return [
        name for name in names
        if name not in PROBED_COMMANDS and not obd.commands.has_name(name)
    ]


@dataclass
class _Tick:
    values: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    """Consecutive queries without an answer at the end of this tick."""
    lost: bool = False
    dtc: tuple[str, ...] | None = None


class ObdSource:
    """A :class:`edge.reading.Source` reading PIDs from an ELM327 adapter at ``port``.

    ``port`` is a serial device (``/dev/ttyUSB0``, ``/dev/rfcomm0``, a pty) or any pyserial URL
    (``socket://192.168.0.10:35000`` for Wi-Fi adapters); ``"auto"`` lets python-OBD scan.
    """

    def __init__(
        self,
        *,
        port: str,
        baudrate: int | None = None,
        fast_pids: Sequence[str] = ("RPM", "SPEED", "THROTTLE_POS", "ENGINE_LOAD", "MAF"),
        slow_pids: Sequence[str] = ("COOLANT_TEMP", "INTAKE_TEMP", "FUEL_LEVEL",
                                    "CONTROL_MODULE_VOLTAGE", "ODOMETER"),
        extra_pids: Sequence[str] = (),
        fast_hz: float = 5.0,
        slow_every_s: float = 5.0,
        name: str = "obd",
        reconnect_initial_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        max_failed_queries: int = 6,
        obd_fast: bool = False,
    ) -> None:
        unknown = unknown_pids([*fast_pids, *slow_pids, *extra_pids])
        if unknown:
            raise ValueError(f"unknown python-OBD command names: {', '.join(unknown)}")
        self.name = name
        self.port = port
        self.baudrate = baudrate
        self.fast_pids = list(fast_pids)
        # Extra PIDs are read at the slow rate; STATUS rides along to notice new DTCs.
        self.slow_pids = list(dict.fromkeys([*slow_pids, *extra_pids, STATUS_PID]))
        self.fast_hz = fast_hz
        self.slow_every_s = slow_every_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.max_failed_queries = max_failed_queries
        # python-OBD's "fast" mode appends the expected frame count to each request; many
        # cheap clones answer that wrongly, so it is off unless asked for.
        self.obd_fast = obd_fast

        self.connected = False
        self.connections = 0
        """Successful connections so far (1 + reconnects)."""
        self.supported: list[str] = []
        """PIDs being queried on the current connection (configured and supported)."""
        self.dtcs: list[tuple[str, str]] = []
        """Latest diagnostic trouble codes read, as ``(code, description)``."""
        self.mil: bool | None = None
        self.pending_dtcs: list[str] = []
        """Latest pending codes (mode 07) read, where the car supports it."""
        self._sent_dtcs: frozenset[str] | None = None
        """The code set last handed to the sampler (None: none yet since start)."""
        self._executor: ThreadPoolExecutor | None = None
        self._conn: Any = None
        self._status_key: tuple[bool, int] | None = None
        self._forced: set[str] = set()
        self._dtcs_read = False
        """Codes were read on this connection: the set in hand is the car's."""
        """Probed PIDs that answered on this connection: queried with ``force=True``."""

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-io")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if self._conn is not None:
            conn, self._conn = self._conn, None
            future = asyncio.get_running_loop().run_in_executor(executor, conn.close)
            # A query stuck on a silent port can hold the thread for python-OBD's 10 s read
            # timeout; do not hold shutdown hostage to it.
            try:
                await asyncio.wait_for(future, timeout=3.0)
            except TimeoutError:
                log.warning("adapter close timed out", extra=kv(source=self.name))
        executor.shutdown(wait=False, cancel_futures=True)
        self.connected = False

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RuntimeError(f"{self.name}: use 'async with' before reading")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def readings(self) -> AsyncIterator[Reading]:
        """Readings forever: connect, sample, reconnect when the adapter or ignition drops."""
        while True:
            await self._connect()
            try:
                async for reading in self._sample():
                    yield reading
            finally:
                await self._disconnect()

    # --- connection ------------------------------------------------------------------------

    async def _connect(self) -> None:
        why = ""  # the last attempt's failure: the one line per reconnect says it
        async for attempt in stamina.retry_context(
            on=AdapterLostError,
            attempts=None,
            timeout=None,
            wait_initial=self.reconnect_initial_s,
            wait_max=self.reconnect_max_s,
        ):
            with attempt:
                if attempt.num > 1:
                    log.info(
                        "reconnecting", extra=kv(source=self.name, attempt=attempt.num, after=why)
                    )
                try:
                    await self._call(self._open)
                except AdapterLostError as exc:
                    why = str(exc)[:200]
                    raise
        self.connected = True
        self.connections += 1

    def _open(self) -> None:
        port: str | None = None
        if self.port != "auto":
            # Resolved at every attempt: /dev/serial/by-id/... and udev-made links may point
            # elsewhere after a replug, and python-OBD only recognises a pty (no baud probing)
            # by its /dev/pts name.
            port = os.path.realpath(self.port) if self.port.startswith("/") else self.port
        conn = obd.OBD(port, baudrate=self.baudrate, fast=self.obd_fast, timeout=1.0)
        status = conn.status()
        if status != OBDStatus.CAR_CONNECTED:
            conn.close()
            # "OBD Connected" = the adapter answers but the car does not: ignition off.
            raise AdapterLostError(f"{self.port}: {status}")
        supported = {cmd.name for cmd in conn.supported_commands}
        wanted = [*self.fast_pids, *self.slow_pids]
        # Support for these cannot be read from the bitmaps python-OBD asks for: ask the PID.
        forced = {
            name for name in dict.fromkeys(wanted)
            if name in PROBED_COMMANDS and name not in supported
            and not conn.query(PROBED_COMMANDS[name], force=True).is_null()
        }
        kept, dropped = split_supported(wanted, supported | forced)
        self.supported = kept
        self._forced = forced
        log.info(
            "car connected",
            extra=kv(source=self.name, port=self.port, protocol=conn.protocol_name(),
                     pids=",".join(kept), unsupported=",".join(dropped) or "-"),
        )
        self._conn = conn
        self._status_key = None
        self._dtcs_read = False
        if DTC_PID in supported:
            self._read_dtcs(conn)

    async def _disconnect(self) -> None:
        self.connected = False
        conn, self._conn = self._conn, None
        if conn is not None and self._executor is not None:
            await self._call(conn.close)

    # --- sampling --------------------------------------------------------------------------

    async def _sample(self) -> AsyncIterator[Reading]:
        supported = set(self.supported)
        schedule = PidSchedule(
            fast=[p for p in self.fast_pids if p in supported],
            slow=[p for p in self.slow_pids if p in supported],
            fast_hz=self.fast_hz,
            slow_every_s=self.slow_every_s,
        )
        interval_ns = round(schedule.interval_s * 1e9)
        next_ns = time.monotonic_ns()
        failed = 0
        while True:
            start_ns = time.monotonic_ns()
            names = schedule.tick(start_ns / 1e9)
            tick = await self._call(self._query, names, failed)
            end_ns = time.monotonic_ns()
            failed = tick.failed
            if tick.lost or failed >= self.max_failed_queries:
                log.warning(
                    "adapter lost",
                    extra=kv(source=self.name, failed_queries=failed, port_lost=tick.lost),
                )
                return
            if tick.values or tick.extra or tick.dtc is not None:
                yield Reading(mono_ns=(start_ns + end_ns) // 2, values=tick.values,
                              extra=tick.extra, dtc=tick.dtc)
            # Absolute deadlines keep the rate; a slow adapter just skips ahead, never bursts.
            next_ns = max(next_ns + interval_ns, time.monotonic_ns())
            await asyncio.sleep((next_ns - time.monotonic_ns()) / 1e9)

    def _query(self, names: list[str], failed: int) -> _Tick:
        conn = self._conn
        tick = _Tick(failed=failed)
        for pid in names:
            response = conn.query(command(pid), force=pid in self._forced)
            if conn.status() == OBDStatus.NOT_CONNECTED:
                tick.lost = True
                return tick
            if response.is_null():
                tick.failed += 1
                continue
            tick.failed = 0
            if pid == STATUS_PID:
                self._on_status(conn, response.value, tick)
                continue
            converted = convert(pid, response.value)
            if converted is not None:
                key, number, is_extra = converted
                (tick.extra if is_extra else tick.values)[key] = number
        if self._dtcs_read:
            codes = frozenset([*(code for code, _ in self.dtcs), *self.pending_dtcs])
            if codes != self._sent_dtcs:
                tick.dtc = tuple(sorted(codes))
                self._sent_dtcs = codes
        return tick

    def _on_status(self, conn: Any, status: Any, tick: _Tick) -> None:
        key = (bool(status.MIL), int(status.DTC_count))
        tick.extra["MIL"] = 1.0 if key[0] else 0.0
        tick.extra["DTC_COUNT"] = float(key[1])
        if self._status_key is not None and key != self._status_key:
            log.info("DTC status changed", extra=kv(source=self.name, mil=key[0], count=key[1]))
            if conn.supports(obd.commands[DTC_PID]):
                self._read_dtcs(conn)
        self._status_key = key
        self.mil = key[0]

    def _read_dtcs(self, conn: Any) -> None:
        response = conn.query(obd.commands[DTC_PID])
        if response.is_null():
            return
        self.dtcs = [(str(code), str(text)) for code, text in response.value]
        pending = obd.commands[PENDING_DTC_PID]
        if conn.supports(pending):
            answer = conn.query(pending)
            if not answer.is_null():
                self.pending_dtcs = [str(code) for code, _ in answer.value]
        self._dtcs_read = True
        log.info(
            "DTCs read",
            extra=kv(source=self.name, count=len(self.dtcs),
                     codes=",".join(code for code, _ in self.dtcs) or "-"),
        )
