"""GPS: NMEA sentences from a receiver on a pty, and gpsd's JSON protocol from a TCP peer."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tty
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from revline.edge.gps import GpsdSource, NmeaParser, NmeaSource, fix_from_tpv
from revline.edge.reading import Reading

# The textbook pair of sentences (NMEA 0183, checksums as sent by receivers).
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"


def _nmea(body: str) -> str:
    checksum = functools.reduce(lambda a, c: a ^ ord(c), body, 0)
    return f"${body}*{checksum:02X}"


# What a u-blox receiver sends before it has a fix: status V, empty fields.
RMC_VOID = _nmea("GPRMC,000012.00,V,,,,,,,060180,,,N")
GGA_NOFIX = _nmea("GPGGA,000012.00,,,,,0,00,99.99,,,,,,")


def test_nmea_rmc_and_gga_give_position_speed_heading_altitude_and_time() -> None:
    """A valid RMC after a GGA yields lat/lon/alt/heading/speed and the fix's UTC time."""
    parser = NmeaParser()
    assert parser.feed(GGA) is None
    fix = parser.feed(RMC)
    assert fix is not None
    assert fix.values["lat"] == pytest.approx(48.1173)
    assert fix.values["lon"] == pytest.approx(11.516667, abs=1e-6)
    assert fix.values["alt"] == 545.4
    assert fix.values["heading"] == 84.4
    assert fix.values["gps_speed"] == pytest.approx(22.4 * 1.852)
    assert fix.wall_us == int(datetime(1994, 3, 23, 12, 35, 19, tzinfo=UTC).timestamp() * 1e6)


def test_nmea_without_a_fix_or_with_a_bad_checksum_gives_nothing() -> None:
    """Void RMCs, no-fix GGAs and corrupted sentences never produce a position or a time."""
    parser = NmeaParser()
    assert parser.feed(GGA_NOFIX) is None
    assert parser.feed(RMC_VOID) is None
    assert parser.feed(RMC.replace("4807", "4808")) is None  # checksum no longer matches
    assert parser.feed("garbage\r\n") is None
    fix = parser.feed(RMC)
    assert fix is not None
    assert "alt" not in fix.values  # the last GGA had no fix, so no altitude


def test_nmea_source_reads_a_receiver_on_a_serial_port() -> None:
    """Sentences written to a pty come out as readings; only the valid fix carries wall time."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)

    async def run() -> list[Reading]:
        async with NmeaSource(device=path, baudrate=9600) as source:
            readings = source.readings()
            # Like a receiver, repeat the epoch (pyserial flushes input when it opens the port).
            lines = [GGA_NOFIX, RMC_VOID, GGA, RMC]
            epoch = "".join(f"{line}\r\n" for line in lines).encode()
            loop = asyncio.get_running_loop()
            timer = loop.call_soon(lambda: None)

            def send() -> None:
                nonlocal timer
                os.write(master, epoch)
                timer = loop.call_later(0.2, send)

            send()
            try:
                out: list[Reading] = []
                async with asyncio.timeout(20):
                    async for reading in readings:
                        out.append(reading)
                        if len(out) == 2:
                            return out
                return out
            finally:
                timer.cancel()
                await readings.aclose()  # type: ignore[attr-defined]

    try:
        readings = asyncio.run(run())
    finally:
        os.close(master)
        os.close(slave)
    assert len(readings) == 2
    assert readings[0].values["alt"] == 545.4
    assert all(r.wall_us is not None for r in readings)


def test_gpsd_tpv_reports_map_to_fields_and_time_only_with_a_fix() -> None:
    """TPV mode 3 gives position, altitude, track, speed and time; mode 1 gives nothing."""
    assert fix_from_tpv({"class": "TPV", "mode": 1, "time": "2024-05-01T10:00:00.000Z"}) is None
    assert fix_from_tpv({"class": "SKY", "mode": 3}) is None
    fix = fix_from_tpv({
        "class": "TPV", "mode": 3, "time": "2024-05-01T10:00:01.500Z", "lat": 52.52,
        "lon": 13.405, "altMSL": 34.2, "track": 361.5, "speed": 10.0,
    })
    assert fix is not None
    assert fix.values == {
        "lat": 52.52, "lon": 13.405, "alt": 34.2, "heading": pytest.approx(1.5),
        "gps_speed": 36.0,
    }
    assert fix.wall_us == 1_714_557_601_500_000
    two_d = fix_from_tpv({"class": "TPV", "mode": 2, "lat": 1.0, "lon": 2.0, "alt": 99.0})
    assert two_d is not None
    assert "alt" not in two_d.values


async def _gpsd_peer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reports: list[dict[str, object]]
) -> None:
    # gpsd greets with VERSION, then streams reports once a client sends ?WATCH.
    writer.write(b'{"class":"VERSION","release":"3.22","proto_major":3,"proto_minor":14}\n')
    line = await reader.readline()
    if not line.startswith(b"?WATCH=") or not json.loads(line[7:]).get("enable"):
        writer.close()
        return
    writer.write(b'{"class":"DEVICES","devices":[{"path":"/dev/ttyACM0"}]}\n')
    writer.write(b'{"class":"WATCH","enable":true,"json":true}\n')
    for report in reports:
        writer.write(json.dumps(report).encode() + b"\n")
    await writer.drain()
    writer.close()


def test_gpsd_source_speaks_the_watch_protocol_and_reconnects() -> None:
    """The source sends ?WATCH, yields fixes only, and reconnects when gpsd drops it."""
    reports: list[dict[str, object]] = [
        {"class": "TPV", "mode": 1},
        {"class": "SKY", "satellites": []},
        {"class": "TPV", "mode": 3, "time": "2024-05-01T10:00:01Z", "lat": 52.5, "lon": 13.4,
         "alt": 30.0, "track": 90.0, "speed": 5.0},
    ]
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _gpsd_peer(reader, writer, reports)

    async def run() -> list[Reading]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out: list[Reading] = []
        async with server, GpsdSource(host="127.0.0.1", port=port,
                                      reconnect_initial_s=0.05) as source:
            readings: AsyncIterator[Reading] = source.readings()
            try:
                async with asyncio.timeout(20):
                    async for reading in readings:
                        out.append(reading)
                        if len(out) == 2:
                            break
            finally:
                await readings.aclose()  # type: ignore[attr-defined]
        return out

    readings = asyncio.run(run())
    assert connections == 2
    assert [r.values["gps_speed"] for r in readings] == [18.0, 18.0]
    assert all(r.wall_us == 1_714_557_601_000_000 for r in readings)
