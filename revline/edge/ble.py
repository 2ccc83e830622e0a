"""BLE ELM327 adapters (bleak), bridged to a pseudo-terminal so python-OBD drives them unchanged.

A BLE "OBD" dongle is an ELM327 behind a UART-style GATT service: bytes written to one
characteristic go to the ELM, its answers come back as notifications. Rather than a second copy
of the ELM dialogue and PID logic, :class:`PtyBridge` opens a pty pair, pumps bytes between the
pty and a :class:`Transport`, and :class:`BridgedObdSource` points the ordinary
:class:`edge.obd_source.ObdSource` at the pty's slave side. Everything above the transport is
the same code as for a USB or RFCOMM adapter.

Transports: :class:`BleTransport` (bleak; scanning and GATT cannot run without a BLE radio, so it
is kept thin, and the service choice, :func:`pick_uart`, is pure and tested) and
:class:`TcpTransport` (Wi-Fi ELM327 adapters on ``host:35000``, and the tests: the emulator's TCP
mode stands in for the radio, so the bridge is tested end to end with real ELM327 traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self

import stamina

from revline.edge.obd_source import ObdSource
from revline.edge.reading import Reading
from revline.logs import kv

__all__ = [
    "KNOWN_UARTS",
    "BleTransport",
    "BridgedObdSource",
    "PtyBridge",
    "TcpTransport",
    "Transport",
    "TransportClosedError",
    "UartChoice",
    "pick_uart",
]

log = logging.getLogger("revline.edge.ble")


class TransportClosedError(Exception):
    """The link to the adapter is gone (transient: the bridge reconnects it)."""


class Transport(Protocol):
    """Bytes to and from an ELM327, over whatever link. An async context manager."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(self, data: bytes) -> None:
        """Write bytes to the adapter; TransportClosedError when the link is gone."""
        ...

    async def receive(self) -> bytes:
        """The next bytes from the adapter; TransportClosedError when the link is gone."""
        ...


# --- the pty bridge ----------------------------------------------------------------------------


class PtyBridge:
    """A pty pair; :meth:`run` pumps bytes between its master side and a transport.

    The bridge keeps its own handle on the slave side, so python-OBD may close and reopen
    ``slave_path`` (a reconnect) without the master seeing an end of file. A command python-OBD
    writes while no transport is up is sent once the next link is up: python-OBD is waiting for
    its answer, and it flushes its input before every command, so a late answer cannot be taken
    for the next one. (Dropping it instead stalled python-OBD for minutes under load.)
    """

    def __init__(self) -> None:
        self.slave_path = ""
        self._master = -1
        self._slave = -1
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self.bytes_up = 0
        self.bytes_down = 0

    async def __aenter__(self) -> Self:
        self._master, self._slave = os.openpty()
        try:
            tty.setraw(self._slave)  # no echo, no line editing: a byte-clean serial line
            os.set_blocking(self._master, False)
            self.slave_path = os.ttyname(self._slave)
            asyncio.get_running_loop().add_reader(self._master, self._on_readable)
        except BaseException:
            os.close(self._master)
            os.close(self._slave)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._master < 0:
            return
        asyncio.get_running_loop().remove_reader(self._master)
        os.close(self._master)
        os.close(self._slave)
        self._master = self._slave = -1

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while nobody holds the slave; we do, so only in odd races
        if data:
            self._outgoing.put_nowait(data)

    async def run(self, transport: Transport) -> None:
        """Pump both ways until the transport closes (returns) or the caller cancels."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._up(transport), name="bridge-up")
                group.create_task(self._down(transport), name="bridge-down")
        except* TransportClosedError:
            log.warning("adapter link closed")

    async def _up(self, transport: Transport) -> None:
        while True:
            data = await self._outgoing.get()
            await transport.send(data)
            self.bytes_up += len(data)

    async def _down(self, transport: Transport) -> None:
        while True:
            data = await transport.receive()
            self.bytes_down += len(data)
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self._master, view)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    continue
                view = view[written:]


class BridgedObdSource:
    """The OBD source over a transport: (re)connects the transport, bridges it to a pty, and
    runs :class:`ObdSource` on that pty. ``obd_options`` are ObdSource's keyword arguments."""

    def __init__(
        self,
        transport_factory: Callable[[], Transport],
        *,
        name: str = "obd",
        reconnect_initial_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        **obd_options: Any,
    ) -> None:
        self.name = name
        self._factory = transport_factory
        self._reconnect = (reconnect_initial_s, reconnect_max_s)
        self._obd_options = obd_options
        self._stack = contextlib.AsyncExitStack()
        self.bridge = PtyBridge()
        self.obd: ObdSource | None = None
        self.link_up = False

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.bridge)
            pump = asyncio.create_task(self._keep_linked(), name=f"{self.name}-link")
            stack.callback(pump.cancel)
            self.obd = ObdSource(
                port=self.bridge.slave_path, name=self.name,
                reconnect_initial_s=self._reconnect[0], reconnect_max_s=self._reconnect[1],
                **self._obd_options,
            )
            await stack.enter_async_context(self.obd)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _keep_linked(self) -> None:
        while True:
            async for attempt in stamina.retry_context(
                on=(OSError, TransportClosedError, TimeoutError), attempts=None, timeout=None,
                wait_initial=self._reconnect[0], wait_max=self._reconnect[1],
            ):
                with attempt:
                    transport = await self._factory().__aenter__()
            try:
                self.link_up = True
                log.info("adapter link up", extra=kv(source=self.name))
                await self.bridge.run(transport)
            finally:
                self.link_up = False
                await transport.__aexit__(None, None, None)

    async def readings(self) -> AsyncIterator[Reading]:
        """The OBD source's readings (it reconnects its ELM session on its own)."""
        if self.obd is None:
            raise RuntimeError(f"{self.name}: use 'async with' before reading")
        async for reading in self.obd.readings():
            yield reading


# --- transports --------------------------------------------------------------------------------


class TcpTransport:
    """An ELM327 on TCP: Wi-Fi adapters (usually 192.168.0.10:35000), the emulator's ``-n``."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Self:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.connect_timeout_s
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def send(self, data: bytes) -> None:
        """Write to the socket."""
        if self._writer is None or self._writer.is_closing():
            raise TransportClosedError(f"{self.host}:{self.port} closed")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise TransportClosedError(str(exc)) from exc

    async def receive(self) -> bytes:
        """Read what the socket has."""
        if self._reader is None:
            raise TransportClosedError(f"{self.host}:{self.port} not connected")
        try:
            data = await self._reader.read(4096)
        except OSError as exc:
            raise TransportClosedError(str(exc)) from exc
        if not data:
            raise TransportClosedError(f"{self.host}:{self.port} closed by the adapter")
        return data


def _uuid16(short: str) -> str:
    return f"0000{short}-0000-1000-8000-00805f9b34fb"


@dataclass(frozen=True, slots=True)
class UartChoice:
    """The characteristics to use: notifications come from ``notify``, commands go to ``write``."""

    service: str
    notify: str
    write: str
    with_response: bool


KNOWN_UARTS: Final[tuple[tuple[str, str, str], ...]] = (
    # (service, notify characteristic, write characteristic), most common first.
    (_uuid16("fff0"), _uuid16("fff1"), _uuid16("fff2")),  # Vgate iCar, many "V-Link" clones
    (_uuid16("ffe0"), _uuid16("ffe1"), _uuid16("ffe1")),  # HM-10 style: one char for both
    ("6e400001-b5a3-f393-e0a9-e50e24dcca9e", "6e400003-b5a3-f393-e0a9-e50e24dcca9e",
     "6e400002-b5a3-f393-e0a9-e50e24dcca9e"),  # Nordic UART Service
    ("49535343-fe7d-4ae5-8fa9-9fafd205e455", "49535343-1e4d-4bd9-ba61-23c647249616",
     "49535343-8841-43f4-a8d4-ecbe34729bb3"),  # Microchip/ISSC transparent UART (OBDLink CX)
)

Characteristics = Sequence[tuple[str, Sequence[str]]]
"""(characteristic uuid, properties such as "notify", "write", "write-without-response")."""


def pick_uart(services: Iterable[tuple[str, Characteristics]]) -> UartChoice | None:
    """The UART-style service to talk through: a known one, else any service with a notify
    characteristic and a writable one. Pure, so it is tested without a radio."""
    table = {svc.lower(): {c.lower(): set(p) for c, p in chars} for svc, chars in services}
    for service, notify, write in KNOWN_UARTS:
        chars = table.get(service)
        if chars and notify in chars and write in chars:
            return UartChoice(service, notify, write, _wants_response(chars[write]))
    for service, chars in table.items():
        notifiers = [c for c, p in chars.items() if p & {"notify", "indicate"}]
        writers = [c for c, p in chars.items() if p & {"write", "write-without-response"}]
        if notifiers and writers:
            return UartChoice(service, notifiers[0], writers[0], _wants_response(chars[writers[0]]))
    return None


def _wants_response(properties: set[str]) -> bool:
    # Write-without-response is faster and what the dongles expect when they offer it.
    return "write-without-response" not in properties


class BleTransport:
    """A BLE ELM327 through bleak: found by address or name, talked to over its UART service.

    Not exercised in CI (no radio here); the parts with logic (:func:`pick_uart`, chunking) are.
    """

    def __init__(self, *, address: str = "", name: str = "", scan_timeout_s: float = 15.0) -> None:
        if not (address or name):
            raise ValueError("BleTransport needs an address or a name")
        self.address = address
        self.name = name
        self.scan_timeout_s = scan_timeout_s
        self._client: Any = None
        self._uart: UartChoice | None = None
        self._incoming: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        from bleak import BleakClient, BleakScanner  # noqa: PLC0415 - edge-only, heavy

        if self.address:
            device = await BleakScanner.find_device_by_address(
                self.address, timeout=self.scan_timeout_s
            )
        else:
            device = await BleakScanner.find_device_by_name(self.name, timeout=self.scan_timeout_s)
        if device is None:
            raise TransportClosedError(f"BLE adapter {self.address or self.name!r} not found")
        client = BleakClient(
            device, disconnected_callback=lambda _: self._incoming.put_nowait(None)
        )
        await client.connect()
        services = [
            (svc.uuid, [(ch.uuid, list(ch.properties)) for ch in svc.characteristics])
            for svc in client.services
        ]
        uart = pick_uart(services)
        if uart is None:
            await client.disconnect()
            raise TransportClosedError(f"{device.address}: no UART-style GATT service")
        try:
            await client.start_notify(
                uart.notify, lambda _, data: self._incoming.put_nowait(bytes(data))
            )
        except BaseException:
            await client.disconnect()
            raise
        self._client, self._uart = client, uart
        log.info("BLE adapter connected", extra=kv(address=device.address, service=uart.service))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # the link may already be gone; nothing to do
                await client.disconnect()

    async def send(self, data: bytes) -> None:
        """Write in chunks that fit the negotiated MTU (20 bytes on the oldest dongles)."""
        client, uart = self._client, self._uart
        if client is None or uart is None or not client.is_connected:
            raise TransportClosedError("BLE adapter disconnected")
        size = max(20, int(getattr(client, "mtu_size", 23)) - 3)
        for start in range(0, len(data), size):
            try:
                await client.write_gatt_char(
                    uart.write, data[start : start + size], response=uart.with_response
                )
            except Exception as exc:  # bleak raises BleakError and OS-specific errors
                raise TransportClosedError(f"BLE write failed: {exc}") from exc

    async def receive(self) -> bytes:
        """The next notification's bytes."""
        data = await self._incoming.get()
        if data is None:
            raise TransportClosedError("BLE adapter disconnected")
        return data
