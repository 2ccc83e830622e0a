"""Pure source logic: PID scheduling and conversion, and the driving simulator."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter

import obd
import pytest

from revline.contract import Batch, Sample, decode_batch, encode
from revline.edge.ble import BridgedObdSource
from revline.edge.config import EdgeSettings
from revline.edge.gps import GpsdSource, NmeaSource
from revline.edge.obd_source import ObdSource
from revline.edge.pids import FIELD_BY_PID, PidSchedule, convert, split_supported
from revline.edge.reading import Reading
from revline.edge.sim import DriveSimulator, SimSource, simulate_readings, simulate_samples
from revline.edge.sources import open_sources
from revline.settings import ConfigError

VIN = "1HGCM82633A004352"


def test_schedule_queries_fast_pids_every_tick_and_each_slow_pid_once_per_period() -> None:
    """Fast PIDs are read on every tick; each slow PID once per slow period, spread over ticks."""
    schedule = PidSchedule(
        fast=["RPM", "SPEED"], slow=["COOLANT_TEMP", "FUEL_LEVEL", "INTAKE_TEMP"],
        fast_hz=5.0, slow_every_s=2.0,
    )
    counts: Counter[str] = Counter()
    ticks = 50  # 10 s at 5 Hz
    per_tick = []
    for i in range(ticks):
        names = schedule.tick(i * schedule.interval_s)
        assert names[:2] == ["RPM", "SPEED"]
        counts.update(names)
        per_tick.append(len(names) - 2)
    assert counts["RPM"] == counts["SPEED"] == ticks
    for pid in ("COOLANT_TEMP", "FUEL_LEVEL", "INTAKE_TEMP"):
        assert 5 <= counts[pid] <= 6  # once at start, then every 2 s over 10 s
    assert per_tick[0] == 3  # a fresh connection reads the full state at once
    assert max(per_tick[1:]) == 1  # after that the slow ones never stall a tick


def test_schedule_keeps_up_when_slow_pids_outnumber_ticks_per_period() -> None:
    """With more slow PIDs than ticks per period, several are read per tick so none starves."""
    slow = [f"PID{i}" for i in range(10)]
    schedule = PidSchedule(fast=[], slow=slow, fast_hz=2.0, slow_every_s=1.0)
    counts: Counter[str] = Counter()
    for i in range(20):  # 10 s
        counts.update(schedule.tick(i * 0.5))
    assert all(counts[pid] >= 9 for pid in slow)


def test_schedule_rejects_non_positive_rates() -> None:
    """A zero rate is a configuration bug caught at construction."""
    with pytest.raises(ValueError, match="must be > 0"):
        PidSchedule(fast=["RPM"], slow=[], fast_hz=0.0, slow_every_s=1.0)


def test_convert_maps_python_obd_quantities_to_contract_fields_and_units() -> None:
    """pint quantities from python-OBD land in the contract field, in the contract unit."""
    ureg = obd.Unit
    speed = convert("SPEED", ureg.Quantity(60, ureg.mph))
    assert speed is not None
    assert (speed[0], round(speed[1], 2), speed[2]) == ("speed", 96.56, False)
    assert convert("COOLANT_TEMP", ureg.Quantity(90, ureg.degC)) == ("coolant", 90.0, False)
    assert convert("CONTROL_MODULE_VOLTAGE", 14.2 * ureg.volt) == ("battery", 14.2, False)
    assert convert("MAF", 12.5 * ureg.gps) == ("maf", 12.5, False)
    assert convert("TIMING_ADVANCE", 12.5 * ureg.degree) == ("TIMING_ADVANCE", 12.5, True)
    assert convert("RPM", None) is None
    assert convert("GET_DTC", [("P0104", "MAF circuit")]) is None
    assert set(FIELD_BY_PID.values()) <= set(Sample.__struct_fields__)


def test_split_supported_keeps_order_and_drops_duplicates() -> None:
    """Only PIDs the car reports are kept; the others are named for the log."""
    kept, dropped = split_supported(["RPM", "SPEED", "RPM", "MAF"], {"RPM", "MAF"})
    assert kept == ["RPM", "MAF"]
    assert dropped == ["SPEED"]


def test_simulator_is_deterministic_by_seed() -> None:
    """The same seed gives the same drive; another seed gives another."""
    a = list(itertools.islice(simulate_readings(7, 500, 10.0), 500))
    b = list(simulate_readings(7, 500, 10.0))
    c = list(simulate_readings(8, 500, 10.0))
    assert a == b
    assert a != c


def test_simulated_samples_satisfy_the_contract() -> None:
    """An hour of simulated samples encodes and decodes as contract batches, values unchanged."""
    samples = list(simulate_samples(3, 1_700_000_000_000_000, 36_000, 10.0, first_seq=1))
    for start in range(0, len(samples), 5000):
        chunk = samples[start : start + 5000]
        batch = Batch(v=1, vin=VIN, batch=start, samples=chunk)
        assert decode_batch(encode(batch)) == batch
    assert [s.seq for s in samples[:3]] == [1, 2, 3]
    assert samples[1].ts - samples[0].ts == 100_000


def test_simulator_drives_idle_city_highway_with_plausible_engine_values() -> None:
    """A drive has idle, stop-and-go city and highway; rpm, load and maf follow the speed."""
    sim = DriveSimulator(11)
    phases: set[str] = set()
    stops = 0
    moving = False
    highway_maf: list[float] = []
    idle_maf: list[float] = []
    for _ in range(30 * 60 * 10):  # 30 min at 10 Hz
        v = sim.step(0.1)
        phases.add(sim.phase)
        if v["speed"] == 0 and moving:
            stops += 1
            moving = False
        moving = moving or v["speed"] > 5
        if sim.engine_on:
            assert 700 <= v["rpm"] <= 6500
            assert 13.5 <= v["battery"] <= 15.0
            assert v["maf"] > 0
        else:
            assert v["rpm"] == 0
            assert v["battery"] < 13.0
        if sim.phase == "highway" and v["speed"] >= 100:
            assert v["rpm"] > 2000
            highway_maf.append(v["maf"])
        if sim.phase == "idle" and sim.engine_on:
            idle_maf.append(v["maf"])
    assert {"idle", "city", "highway"} <= phases
    assert stops >= 3
    assert sum(highway_maf) / len(highway_maf) > 3 * sum(idle_maf) / len(idle_maf)


def test_simulator_warms_coolant_burns_fuel_and_moves() -> None:
    """Coolant rises from ambient to ~90 °C, fuel never rises, and the GPS position moves."""
    readings = list(simulate_readings(5, 15 * 60 * 10, 10.0))
    first, last = readings[0].values, readings[-1].values
    assert first["coolant"] < 30
    assert 85 <= max(r.values["coolant"] for r in readings) <= 95
    fuels = [r.values["fuel"] for r in readings]
    assert all(b <= a for a, b in itertools.pairwise(fuels))
    assert fuels[-1] < fuels[0]
    assert (first["lat"], first["lon"]) != (last["lat"], last["lon"])
    # The GPS track is as long as the distance the speedometer integrates.
    odometer_km = sum(r.values["speed"] for r in readings) / 3600 * 0.1
    track_km = sum(
        _km(a.values, b.values) for a, b in itertools.pairwise(readings)
    )
    assert odometer_km > 5
    assert track_km == pytest.approx(odometer_km, rel=0.05)


def _km(a: dict[str, float], b: dict[str, float]) -> float:
    dlat = math.radians(b["lat"] - a["lat"])
    dlon = math.radians(b["lon"] - a["lon"]) * math.cos(math.radians(a["lat"]))
    return 6371.0 * math.hypot(dlat, dlon)


def test_sim_source_paces_readings_and_runs_faster_with_speedup() -> None:
    """The source yields the seeded drive in order, with non-decreasing monotonic stamps."""

    async def take(n: int) -> list[Reading]:
        out: list[Reading] = []
        async with SimSource(hz=10.0, seed=1, speedup=50.0) as source:
            async for reading in source.readings():
                out.append(reading)
                if len(out) == n:
                    break
        return out

    readings = asyncio.run(take(100))
    assert len(readings) == 100
    assert all(b.mono_ns >= a.mono_ns for a, b in itertools.pairwise(readings))
    assert all(r.wall_us is None for r in readings)
    expected = DriveSimulator(1)
    assert [r.values for r in readings] == [expected.step(0.1) for _ in range(100)]


def test_open_sources_builds_the_configured_engine_and_gps_sources() -> None:
    """Settings choose the engine source and the GPS source; 'none' adds no GPS."""
    sim = open_sources(EdgeSettings(vin=VIN))
    assert [type(s) for s in sim] == [SimSource]
    obd_gpsd = open_sources(EdgeSettings(vin=VIN, source="obd", gps="gpsd", gpsd_port=2948))
    assert [type(s) for s in obd_gpsd] == [ObdSource, GpsdSource]
    ble_nmea = open_sources(EdgeSettings(vin=VIN, source="ble", ble_name="OBDII", gps="nmea"))
    assert [type(s) for s in ble_nmea] == [BridgedObdSource, NmeaSource]


def test_open_sources_names_the_key_of_an_unknown_pid() -> None:
    """A misspelt PID stops the program at start with the config key in the message."""
    settings = EdgeSettings(vin=VIN, source="obd", obd_slow_pids=["COOLANT_TEMP", "COLANT"])
    with pytest.raises(ConfigError, match=r"obd_slow_pids.*COLANT"):
        open_sources(settings)
