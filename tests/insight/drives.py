"""Simulated drives with known stops, for the insight tests (pure: no wall clock, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from revline.contract import Sample
from revline.insight.segment import Point

T0: Final = 1_717_243_200_000_000
"""2024-06-01T12:00:00Z in µs: test data never comes from the wall clock."""
US: Final = 1_000_000


@dataclass(frozen=True)
class Leg:
    """``move`` at ``kmh`` for ``seconds`` (from ``kmh_from`` if set: a ramp), ``stop`` (speed 0,
    engine on), or ``off`` (no data); with the coolant and battery readings of the leg."""

    kind: str
    seconds: float
    kmh: float = 0.0
    kmh_from: float | None = None
    coolant: float = 90.0
    battery: float = 14.1


def move(seconds: float, kmh: float = 50.0) -> Leg:
    """Driving at a steady speed."""
    return Leg("move", seconds, kmh)


def stop(seconds: float) -> Leg:
    """Standing with the engine on: samples at speed 0."""
    return Leg("stop", seconds)


def off(seconds: float) -> Leg:
    """Ignition off: no samples."""
    return Leg("off", seconds)


def ramp(seconds: float, kmh_from: float, kmh: float) -> Leg:
    """Speeding up or braking evenly from ``kmh_from`` to ``kmh``."""
    return Leg("move", seconds, kmh, kmh_from)


def drive(legs: Sequence[Leg], *, hz: float = 1.0, start: int = T0) -> list[Point]:
    """Samples of the legs at ``hz``, heading east from (48.0, 11.0), positions from the speed."""
    step = int(US / hz)
    points: list[Point] = []
    t = start
    lon = 11.0
    km_per_degree = math.pi * 6371.0088 / 180 * math.cos(math.radians(48.0))  # haversine's sphere
    for leg in legs:
        end = t + int(leg.seconds * US)
        if leg.kind == "off":
            t = end
            continue
        begin = t
        while t < end:
            kmh = leg.kmh
            if leg.kmh_from is not None:
                share = (t - begin) / (end - begin)
                kmh = round(leg.kmh_from + (leg.kmh - leg.kmh_from) * share, 1)
            points.append(
                Point(ts=t, speed=kmh, rpm=800 + 40 * kmh, coolant=leg.coolant,
                      battery=leg.battery, fuel=60.0, maf=3 + kmh / 5, lat=48.0, lon=round(lon, 7))
            )
            lon += kmh / 3600 / hz / km_per_degree
            t += step
    return points


def as_samples(points: Sequence[Point], *, first_seq: int = 1) -> list[Sample]:
    """The contract samples of ``points`` (what an edge would send), seq in time order."""
    return [
        Sample(ts=p.ts, seq=first_seq + i, speed=p.speed, rpm=p.rpm, coolant=p.coolant,
               battery=p.battery, fuel=p.fuel, maf=p.maf, lat=p.lat, lon=p.lon,
               odometer=p.odometer)
        for i, p in enumerate(points)
    ]
