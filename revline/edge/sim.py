"""A driving simulator for demos, tests and load: deterministic by seed, physically plausible.

A trip cycles idle -> city (stop and go, 0-50 km/h) -> highway (100-130 km/h) -> city -> stop,
now and then parked with the engine off. Speed follows a target with bounded acceleration, the
gearbox picks a gear, rpm follows speed and gear, the road-load power sets throttle, load and
mass air flow, fuel burns from the air flow (so the level only falls), coolant warms from ambient
to ~90 °C over minutes and cools when parked, the battery reads ~14.2 V running and ~12.4 V off,
and the position integrates speed and heading from a start point.

:class:`DriveSimulator` is pure (``step(dt)``, no clock, no I/O). :func:`simulate_samples`
generates contract samples without sleeping (benchmarks, the fleet simulator);
:class:`SimSource` paces readings in real time, ``speedup`` times faster.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self

from revline.contract import Sample
from revline.edge.reading import Reading

__all__ = ["DriveSimulator", "SimSource", "simulate_readings", "simulate_samples"]

Phase = Literal["parked", "idle", "city", "highway"]

_KMH_PER_KRPM: Final = (7.5, 13.0, 20.0, 27.0, 34.0, 41.0)
"""Road speed per 1000 rpm in each gear of a typical 6-speed petrol car."""
_MASS_KG: Final = 1400.0
_CDA_M2: Final = 0.65
_CRR: Final = 0.012
_MAX_POWER_W: Final = 100_000.0
_DISPLACEMENT_L: Final = 2.0
_AIR_G_PER_L: Final = 1.2
_STOICH: Final = 14.7
_TANK_G: Final = 50 * 745.0  # 50 L of petrol at 0.745 kg/L
_M_PER_DEG_LAT: Final = 111_320.0


@dataclass(frozen=True, slots=True)
class _Leg:
    phase: Phase
    duration_s: float
    target_kmh: float


class DriveSimulator:
    """One simulated car. ``step(dt_s)`` advances it and returns its readings by contract field."""

    def __init__(self, seed: int = 0, *, start_lat: float | None = None,
                 start_lon: float | None = None) -> None:
        self._rng = random.Random(seed)
        rng = self._rng
        self.ambient_c = round(rng.uniform(5.0, 25.0), 1)
        self.lat = start_lat if start_lat is not None else 48.137 + rng.uniform(-1.0, 1.0)
        self.lon = start_lon if start_lon is not None else 11.575 + rng.uniform(-1.0, 1.0)
        self.alt = rng.uniform(100.0, 600.0)
        self.heading = rng.uniform(0.0, 360.0)
        self.fuel_pct = rng.uniform(45.0, 95.0)
        self.coolant_c = self.ambient_c
        self.speed_ms = 0.0
        self.engine_on = True
        self.elapsed_s = 0.0
        self._legs = self._plan()
        self._leg = next(self._legs)
        self._leg_left_s = self._leg.duration_s
        self._gear = 0

    def _plan(self) -> Iterator[_Leg]:
        rng = self._rng
        while True:
            yield _Leg("idle", rng.uniform(15, 45), 0.0)
            for _ in range(rng.randint(3, 7)):
                yield _Leg("city", rng.uniform(15, 45), rng.uniform(20, 50))
                yield _Leg("city", rng.uniform(5, 25), 0.0)  # traffic light, stop sign
            for _ in range(rng.randint(3, 8)):
                yield _Leg("highway", rng.uniform(30, 120), rng.uniform(100, 130))
            for _ in range(rng.randint(2, 4)):
                yield _Leg("city", rng.uniform(15, 40), rng.uniform(20, 50))
                yield _Leg("city", rng.uniform(5, 20), 0.0)
            yield _Leg("idle", rng.uniform(10, 30), 0.0)
            if rng.random() < 0.5:
                yield _Leg("parked", rng.uniform(60, 600), 0.0)

    @property
    def phase(self) -> Phase:
        """What the car is doing now."""
        return self._leg.phase

    def _advance_leg(self, dt_s: float) -> None:
        self._leg_left_s -= dt_s
        # A stop leg only ends once the car has actually stopped, so stops are real stops.
        while self._leg_left_s <= 0 and not (self._leg.target_kmh == 0 and self.speed_ms > 0.3):
            previous = self._leg
            self._leg = next(self._legs)
            self._leg_left_s += self._leg.duration_s
            if self._leg.phase == "city" and previous.target_kmh == 0:
                self.heading = (self.heading + self._rng.choice((-90.0, 90.0, 0.0))) % 360.0

    def step(self, dt_s: float) -> dict[str, float]:
        """Advance ``dt_s`` simulated seconds; the readings at the end of the step."""
        rng = self._rng
        self.elapsed_s += dt_s
        self._advance_leg(dt_s)
        self.engine_on = self._leg.phase != "parked"

        # Speed towards the leg's target with bounded acceleration and braking.
        target = self._leg.target_kmh / 3.6
        accel = max(-3.0, min(2.0, 0.4 * (target - self.speed_ms)))
        if self._leg.target_kmh == 0 and self.speed_ms < 1.0:
            accel = -self.speed_ms / dt_s if dt_s > 0 else 0.0
        self.speed_ms = max(0.0, self.speed_ms + accel * dt_s)
        kmh = self.speed_ms * 3.6

        # Power at the wheels: inertia + aero drag + rolling resistance.
        power_w = (
            _MASS_KG * accel * self.speed_ms
            + 0.5 * 1.2 * _CDA_M2 * self.speed_ms**3
            + _CRR * _MASS_KG * 9.81 * self.speed_ms
        )
        demand = max(0.0, min(1.0, power_w / _MAX_POWER_W))

        rpm = 0.0
        throttle = 0.0
        load = 0.0
        maf = 0.0
        if self.engine_on:
            warm = min(1.0, max(0.0, (self.coolant_c - self.ambient_c) / (85.0 - self.ambient_c)))
            idle_rpm = 1150.0 - 370.0 * warm  # cold engines idle high
            shift_rpm = 2300.0 + 2500.0 * demand
            gear = 0
            while gear < len(_KMH_PER_KRPM) - 1 and kmh / _KMH_PER_KRPM[gear] * 1000 > shift_rpm:
                gear += 1
            self._gear = gear
            rpm = max(idle_rpm, kmh / _KMH_PER_KRPM[gear] * 1000) + rng.gauss(0, 12)
            throttle = 1.5 + 95.0 * demand**0.8 + abs(rng.gauss(0, 0.4))
            load = 16.0 + 84.0 * demand**0.7 if accel > -0.5 else 8.0  # fuel cut on overrun
            # Mass air flow = displacement x intake strokes/s x air density x volumetric fill.
            maf = _DISPLACEMENT_L * (rpm / 120.0) * _AIR_G_PER_L * (load / 100.0)
            self.fuel_pct = max(0.0, self.fuel_pct - maf / _STOICH * dt_s / _TANK_G * 100.0)
            # Coolant warms faster under load; the thermostat holds it near 90 °C.
            tau = 260.0 / (0.6 + load / 100.0)
            self.coolant_c += (90.0 - self.coolant_c) * min(1.0, dt_s / tau)
        else:
            self._gear = 0
            self.coolant_c += (self.ambient_c - self.coolant_c) * min(1.0, dt_s / 1800.0)

        # Position: integrate along the heading; highways curve gently, cities wander a bit.
        wander = 0.02 if self._leg.phase == "highway" else 0.2
        if self.speed_ms > 0.5:
            self.heading = (self.heading + rng.gauss(0, wander) * dt_s * 10) % 360.0
        dist = self.speed_ms * dt_s
        rad = math.radians(self.heading)
        self.lat += dist * math.cos(rad) / _M_PER_DEG_LAT
        self.lon += dist * math.sin(rad) / (_M_PER_DEG_LAT * math.cos(math.radians(self.lat)))
        self.alt = min(2500.0, max(0.0, self.alt + dist * rng.gauss(0, 0.01)))

        # Under-bonnet heat soaks the intake air when the car moves slowly.
        soak = 8.0 * (1.0 - min(1.0, kmh / 60.0)) if self.engine_on else 0.0
        intake = self.ambient_c + 3.0 + soak
        battery = (14.2 if self.engine_on else 12.4) + rng.gauss(0, 0.03)
        return {
            "speed": float(round(kmh)),  # OBD speed is whole km/h
            "rpm": round(max(0.0, rpm) * 4) / 4,  # OBD rpm resolution is 1/4
            "coolant": float(round(self.coolant_c)),
            "intake": float(round(intake)),
            "throttle": round(min(100.0, throttle), 1),
            "load": round(min(100.0, load), 1),
            "maf": round(maf, 2),
            "fuel": round(self.fuel_pct, 2),
            "battery": round(min(16.0, max(10.0, battery)), 2),
            "lat": round(self.lat, 7),
            "lon": round(self.lon, 7),
            "alt": round(self.alt, 1),
            "heading": round(self.heading, 1) % 360.0,
            "gps_speed": round(max(0.0, kmh + rng.gauss(0, 0.3)), 1),
        }


def simulate_readings(
    seed: int, n: int, hz: float, *, start_mono_ns: int = 0
) -> Iterator[Reading]:
    """``n`` readings ``1/hz`` simulated seconds apart, at once (no sleeping)."""
    sim = DriveSimulator(seed)
    dt = 1.0 / hz
    step_ns = round(1e9 / hz)
    for i in range(n):
        yield Reading(mono_ns=start_mono_ns + i * step_ns, values=sim.step(dt))


def simulate_samples(
    seed: int, start_us: int, n: int, hz: float, *, first_seq: int = 0
) -> Iterator[Sample]:
    """``n`` contract samples from ``start_us``, ``1/hz`` apart, seq counting from ``first_seq``."""
    sim = DriveSimulator(seed)
    dt = 1.0 / hz
    step_us = round(1e6 / hz)
    for i in range(n):
        v = sim.step(dt)
        yield Sample(
            ts=start_us + i * step_us, seq=first_seq + i,
            speed=v["speed"], rpm=v["rpm"], coolant=v["coolant"], intake=v["intake"],
            throttle=v["throttle"], load=v["load"], maf=v["maf"], fuel=v["fuel"],
            battery=v["battery"], lat=v["lat"], lon=v["lon"], alt=v["alt"],
            heading=v["heading"], gps_speed=v["gps_speed"],
        )


class SimSource:
    """The simulator as a :class:`edge.reading.Source`, paced at ``hz`` x ``speedup`` per second.

    Each reading advances the car by ``1/hz`` simulated seconds. When the loop falls behind
    (a slow machine, a huge speedup) it catches up in bursts instead of drifting.
    """

    name = "sim"

    def __init__(self, *, hz: float = 10.0, seed: int = 0, speedup: float = 1.0) -> None:
        if hz <= 0 or speedup <= 0:
            raise ValueError("hz and speedup must be > 0")
        self.hz = hz
        self.speedup = speedup
        self.sim = DriveSimulator(seed)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def readings(self) -> AsyncIterator[Reading]:
        """Readings forever, paced in real time."""
        dt = 1.0 / self.hz
        period_ns = 1e9 * dt / self.speedup
        start = time.monotonic_ns()
        emitted = 0
        while True:
            now = time.monotonic_ns()
            due = int((now - start) / period_ns) + 1
            for _ in range(due - emitted):
                yield Reading(mono_ns=time.monotonic_ns(), values=self.sim.step(dt))
            emitted = max(emitted, due)
            wait_ns = start + emitted * period_ns - time.monotonic_ns()
            # Sleep at least 1 ms so a huge speedup yields in bursts rather than spinning.
            await asyncio.sleep(max(0.001, wait_ns / 1e9))
