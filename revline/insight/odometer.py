"""The odometer history: one point per trip end that never goes backwards, anomalies flagged.

At each trip end the car's OBD odometer (PID 01A6), where it has one, is compared with what is
expected: the last value plus the distance driven. A reading behind the last value by more than
``odometer_rollback_km`` is a **rollback**: flagged, and the history goes on from the expected
value (it never goes backwards). A reading ahead of the expected value by more than
``odometer_jump_km`` is a **jump**: flagged and taken (the car may have driven without the device).
Without a reading the history accumulates the trips' distances. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from revline.insight.thresholds import Thresholds

__all__ = ["OdometerPoint", "TripEnd", "history"]


@dataclass(frozen=True, slots=True)
class TripEnd:
    """What the history needs of a trip: its end, distance, and the OBD reading at its end."""

    ts: int
    distance_km: float
    reading_km: float | None


@dataclass(frozen=True, slots=True)
class OdometerPoint:
    """One row of ``odometer_history`` (ts in µs)."""

    ts: int
    odometer_km: float
    reading_km: float | None
    source: str
    anomaly: str | None = None
    anomaly_km: float | None = None


def history(
    previous: float | None, trips: Iterable[TripEnd], t: Thresholds
) -> list[OdometerPoint]:
    """The history after ``previous`` (the last value before these trips, None if none) over
    ``trips`` in time order."""
    out: list[OdometerPoint] = []
    last = previous
    for trip in trips:
        expected = trip.distance_km if last is None else last + trip.distance_km
        reading = trip.reading_km
        if reading is None:
            point = OdometerPoint(trip.ts, expected, None, "distance")
        elif last is None:
            point = OdometerPoint(trip.ts, reading, reading, "obd")
        elif reading < last - t.odometer_rollback_km:
            point = OdometerPoint(
                trip.ts, expected, reading, "distance", "rollback", round(reading - expected, 3)
            )
        elif reading > expected + t.odometer_jump_km:
            point = OdometerPoint(
                trip.ts, reading, reading, "obd", "jump", round(reading - expected, 3)
            )
        else:
            point = OdometerPoint(trip.ts, max(reading, last), reading, "obd")
        out.append(point)
        last = point.odometer_km
    return out
