"""The BLE path without a radio: the pty bridge carries real ELM327 traffic, GATT choice is pure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.edge.ble import KNOWN_UARTS, BridgedObdSource, TcpTransport, UartChoice, pick_uart
from revline.edge.reading import Reading
from tests.fixtures.edge_sources import Elm327Emulator, emulator_in
from tests.fixtures.services import free_port


@pytest.fixture
def elm_emulator(tmp_path: Path) -> Iterator[Elm327Emulator]:
    """ELM327 emulators for this test, killed at the end."""
    with emulator_in(tmp_path) as emulator:
        yield emulator


def test_bridge_carries_elm327_traffic_between_python_obd_and_the_adapter(
    elm_emulator: Elm327Emulator,
) -> None:
    """python-OBD on the pty talks through the transport to an ELM327; the link is re-made."""
    port = free_port()
    elm_emulator.start(net_port=port)
    source = BridgedObdSource(
        lambda: TcpTransport("127.0.0.1", port),
        fast_hz=20.0, slow_every_s=0.5, reconnect_initial_s=0.2, reconnect_max_s=1.0,
    )

    async def run() -> list[tuple[int, Reading]]:
        seen: list[tuple[int, Reading]] = []
        async with source:
            assert source.obd is not None
            readings = source.readings()
            try:
                async with asyncio.timeout(90):
                    async for reading in readings:
                        seen.append((source.obd.connections, reading))
                        if len(seen) == 5:
                            elm_emulator.kill()  # the radio link drops
                            elm_emulator.start(net_port=port)
                        if source.obd.connections == 2 and len(seen) >= 10:
                            break
            finally:
                await readings.aclose()  # type: ignore[attr-defined]
        return seen

    seen = asyncio.run(run())
    assert source.bridge.slave_path.startswith("/dev/pts/")
    assert source.bridge.bytes_up > 0
    assert source.bridge.bytes_down > 0
    assert {c for c, _ in seen} == {1, 2}
    assert max(r.values["rpm"] for _, r in seen) > 0
    assert all("speed" in r.values for _, r in seen)


def _svc(uuid: str, *chars: tuple[str, list[str]]) -> tuple[str, list[tuple[str, list[str]]]]:
    return uuid, list(chars)


def test_pick_uart_prefers_known_adapter_services() -> None:
    """FFF0, FFE0, Nordic UART and Microchip UART are recognised with the right characteristics."""
    for service, notify, write in KNOWN_UARTS:
        services = [
            _svc("00001800-0000-1000-8000-00805f9b34fb",
                 ("00002a00-0000-1000-8000-00805f9b34fb", ["read"])),
            _svc(service.upper(), (notify.upper(), ["notify"]),
                 (write.upper(), ["write", "write-without-response", "notify"])),
        ]
        assert pick_uart(services) == UartChoice(service, notify, write, with_response=False)


def test_pick_uart_falls_back_to_any_notify_plus_write_service() -> None:
    """An unknown vendor UART still works; a device without one is refused."""
    vendor = "e7810a71-73ae-499d-8c15-faa9aef0c3f2"
    chosen = pick_uart([_svc(vendor, ("bef8d6c9-9c21-4c9e-b632-bd58c1009f9f",
                                      ["read", "write", "notify"]))])
    assert chosen == UartChoice(vendor, "bef8d6c9-9c21-4c9e-b632-bd58c1009f9f",
                                "bef8d6c9-9c21-4c9e-b632-bd58c1009f9f", with_response=True)
    assert pick_uart([_svc(vendor, ("bef8d6c9-9c21-4c9e-b632-bd58c1009f9f", ["read"]))]) is None
