"""The OBD source with python-OBD against a real ELM327 emulator on a pseudo-tty."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import obd
import pytest

from revline.edge.obd_source import ODOMETER, ObdSource, unknown_pids
from revline.edge.pids import convert
from revline.edge.reading import Reading
from revline.edge.sampler import clean_values
from revline.fields import FIELDS
from tests.fixtures.edge_sources import Elm327Emulator, emulator_in


@pytest.fixture
def elm_emulator(tmp_path: Path) -> Iterator[Elm327Emulator]:
    """ELM327 emulators for this test, killed at the end."""
    with emulator_in(tmp_path) as emulator:
        yield emulator


def _source(emulator: Elm327Emulator, **kwargs: object) -> ObdSource:
    options: dict[str, object] = {
        "port": str(emulator.link), "fast_hz": 20.0, "slow_every_s": 0.5,
        "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0,
    }
    options.update(kwargs)
    return ObdSource(**options)  # type: ignore[arg-type]


async def _take(it: AsyncIterator[Reading], n: int) -> list[Reading]:
    out: list[Reading] = []
    async for reading in it:
        out.append(reading)
        if len(out) >= n:
            break
    return out


def test_obd_source_reads_real_decoded_values_of_supported_pids(
    elm_emulator: Elm327Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Decoded rpm, speed, coolant... arrive as contract fields; unsupported PIDs are skipped."""
    elm_emulator.start()
    caplog.set_level(logging.INFO, logger="revline.edge.obd")
    # FUEL_RATE (01 5E) is not in the emulated car: it must be dropped, never queried.
    source = _source(elm_emulator, extra_pids=["TIMING_ADVANCE", "FUEL_RATE"])

    async def run() -> list[Reading]:
        async with source:
            readings = source.readings()
            try:
                return await asyncio.wait_for(_take(readings, 15), timeout=60)
            finally:
                await readings.aclose()  # type: ignore[attr-defined]

    readings = asyncio.run(run())
    merged: dict[str, float] = {}
    extra: dict[str, float] = {}
    for reading in readings:
        merged.update(reading.values)
        extra.update(reading.extra)
    assert max(r.values["rpm"] for r in readings) > 0
    assert 0 <= merged["speed"] < 300
    assert -40 <= merged["coolant"] <= 150
    assert 0 <= merged["fuel"] <= 100
    assert 9 <= merged["battery"] <= 16
    assert {"throttle", "load", "maf", "intake"} <= merged.keys()
    assert "TIMING_ADVANCE" in extra
    assert "FUEL_RATE" not in extra
    assert "FUEL_RATE" not in source.supported
    assert all("rpm" in r.values for r in readings)  # fast PIDs on every tick
    assert sum("coolant" in r.values for r in readings) < len(readings)  # slow ones spread
    assert extra["MIL"] == 0.0
    assert extra["DTC_COUNT"] == 0.0
    assert any("FUEL_RATE" in getattr(r, "fields", {}).get("unsupported", "")
               for r in caplog.records)


def test_obd_source_reads_dtcs_at_start_and_when_they_change(
    elm_emulator: Elm327Emulator,
) -> None:
    """Stored DTCs are read on connect, and read again when the MIL/DTC count changes."""
    elm_emulator.start(dtcs=("0143", "0196"))
    source = _source(elm_emulator)

    async def run() -> tuple[list[str], list[str], list[Reading]]:
        async with source:
            readings = source.readings()
            try:
                first = await asyncio.wait_for(_take(readings, 3), timeout=60)
                at_start = [code for code, _ in source.dtcs]
                elm_emulator.set_dtcs("0143", "0196", "0300")
                later: list[Reading] = []
                async with asyncio.timeout(30):
                    async for reading in readings:
                        later.append(reading)
                        if reading.extra.get("DTC_COUNT") == 3.0:
                            break
                return at_start, [code for code, _ in source.dtcs], first + later
            finally:
                await readings.aclose()  # type: ignore[attr-defined]

    at_start, after, readings = asyncio.run(run())
    assert at_start == ["P0143", "P0196"]
    assert after == ["P0143", "P0196", "P0300"]
    assert source.mil is True
    assert readings[0].extra["MIL"] == 1.0


def test_obd_source_reconnects_when_the_adapter_or_ignition_drops(
    elm_emulator: Elm327Emulator,
) -> None:
    """Killing the adapter or switching the engine off stops readings; they resume after."""
    elm_emulator.start()
    source = _source(elm_emulator)

    async def run() -> list[tuple[int, Reading]]:
        seen: list[tuple[int, Reading]] = []
        async with source:
            readings = source.readings()
            try:
                async with asyncio.timeout(120):
                    async for reading in readings:
                        seen.append((source.connections, reading))
                        count = len(seen)
                        if count == 5:
                            # Adapter unplugged; a new one appears at the same path later.
                            elm_emulator.kill()
                            elm_emulator.start()
                        if source.connections == 2 and count > 5 and _n(seen, 2) == 5:
                            elm_emulator.command("engineoff")
                            asyncio.get_running_loop().call_later(
                                2.0, elm_emulator.command, "scenario car"
                            )
                        if source.connections == 3 and _n(seen, 3) == 5:
                            break
            finally:
                await readings.aclose()  # type: ignore[attr-defined]
        return seen

    seen = asyncio.run(run())
    assert source.connections == 3
    for connection in (1, 2, 3):
        assert all("rpm" in r.values for c, r in seen if c == connection)
        assert _n(seen, connection) >= 5


def _n(seen: list[tuple[int, Reading]], connection: int) -> int:
    return sum(1 for c, _ in seen if c == connection)


def test_the_odometer_command_decodes_raw_answers_of_pid_a6() -> None:
    """Raw CAN lines through python-OBD's own parser and our decoder: 4 bytes, 0.1 km per bit;
    a short answer, another PID's or a refusal is null; a value past the contract is dropped."""
    can = obd.protocols.ISO_15765_4_11bit_500k(["7E8 06 41 00 BE 3F A8 13"])

    def km(line: str) -> object:
        return ODOMETER(can([line])).value

    assert km("7E8 06 41 A6 00 00 EA 5C") == 5999.6 * obd.Unit.km
    assert km("7EA 06 41 A6 00 0F 42 3F") == 99999.9 * obd.Unit.km  # a hybrid's HV ECU answers
    assert convert("ODOMETER", km("7E8 06 41 A6 00 00 00 07")) == ("odometer", 0.7, False)
    assert km("7E8 04 41 A6 00 0F") is None  # python-OBD would pad it to 0x000F0000
    assert km("7E8 06 41 A5 00 00 EA 5C") is None
    assert km("7E8 03 7F 01 12") is None
    top = convert("ODOMETER", km("7E8 06 41 A6 FF FF FF FF"))
    assert top == ("odometer", 429496729.5, False)
    assert clean_values({"odometer": top[1]}, {})[2] == ["odometer"]


def test_every_obd_field_is_a_command_the_edge_knows() -> None:
    """A field's PID in revline/fields.py is never refused at start as an unknown name."""
    assert unknown_pids(f.obd for f in FIELDS if f.obd is not None) == []
    assert unknown_pids(["ODOMETR"]) == ["ODOMETR"]


def test_obd_source_probes_and_reads_the_odometer_python_obd_cannot_discover(
    elm_emulator: Elm327Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """01A6 is above the bitmaps python-OBD reads: probed at connect, then read as a slow PID."""
    elm_emulator.start()
    caplog.set_level(logging.INFO, logger="revline.edge.obd")
    source = _source(elm_emulator, fast_pids=["RPM"], slow_pids=["ODOMETER"])

    async def run() -> list[Reading]:
        async with source:
            readings = source.readings()
            try:
                return await asyncio.wait_for(_take(readings, 12), timeout=60)
            finally:
                await readings.aclose()  # type: ignore[attr-defined]

    readings = asyncio.run(run())
    odometer = [r.values["odometer"] for r in readings if "odometer" in r.values]
    # The emulated car answers 00 00 EA 5C, and now and then EA 5D.
    assert odometer
    assert all(value in (5999.6, 5999.7) for value in odometer)
    assert 5999.6 in odometer
    assert len(odometer) < len(readings)  # slow: not on every tick
    assert "ODOMETER" in source.supported
    assert not any("ODOMETER" in getattr(r, "fields", {}).get("unsupported", "")
                   for r in caplog.records)


def test_obd_source_drops_the_odometer_when_the_probe_gets_no_answer(
    elm_emulator: Elm327Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A car without 01A6 answers the probe with nothing: dropped, logged once, never queried."""
    elm_emulator.start()
    elm_emulator.command("import elm.obd_message as m; m.ObdMessage['car'].pop('ODOMETER')")
    elm_emulator.command("scenario car")
    caplog.set_level(logging.INFO, logger="revline.edge.obd")
    source = _source(elm_emulator, fast_pids=["RPM"], slow_pids=["ODOMETER", "COOLANT_TEMP"])

    async def run() -> list[Reading]:
        async with source:
            readings = source.readings()
            try:
                return await asyncio.wait_for(_take(readings, 12), timeout=60)
            finally:
                await readings.aclose()  # type: ignore[attr-defined]

    readings = asyncio.run(run())
    assert not any("odometer" in r.values for r in readings)
    assert any("coolant" in r.values for r in readings)
    assert "ODOMETER" not in source.supported
    connected = [r for r in caplog.records if r.getMessage() == "car connected"]
    assert [getattr(r, "fields", {}).get("unsupported") for r in connected] == ["ODOMETER"]
