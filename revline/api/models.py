"""The API's response bodies (msgspec structs: Litestar encodes them and documents them in the
OpenAPI schema), and how a ``vehicle_state`` row becomes a :class:`VehicleStatus`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import msgspec

from revline.contract import NUMERIC_FIELDS

__all__ = [
    "STATUS_COLUMNS",
    "TRIP_COLUMNS",
    "Position",
    "Reading",
    "Trip",
    "TroubleCode",
    "VehicleList",
    "VehicleStatus",
    "VehicleSummary",
    "status_from_row",
    "trip_from_row",
]


class Reading(msgspec.Struct):
    """The latest value of one measurement and when it was taken."""

    value: float
    ts: datetime


class Position(msgspec.Struct):
    """The latest GPS fix."""

    lat: float
    lon: float
    ts: datetime
    alt: float | None = None
    heading: float | None = None
    speed: float | None = None


class TroubleCode(msgspec.Struct):
    """One trouble code and when it was active."""

    code: str
    """SAE J2012, e.g. ``P0301``."""
    first_seen: datetime
    last_seen: datetime
    cleared: datetime | None = None
    """When a report first came without it; null while active."""
    detected_at: datetime | None = None
    """When the server first stored it."""


class Trip(msgspec.Struct):
    """One trip (insight's ``trips``: see docs/insight.md for how it is cut)."""

    start_ts: datetime
    end_ts: datetime
    duration_s: float
    moving_s: float
    distance_km: float
    distance_source: str
    samples: int
    completeness: float
    closed: bool
    start_lat: float | None = None
    start_lon: float | None = None
    end_lat: float | None = None
    end_lon: float | None = None
    avg_speed: float | None = None
    max_speed: float | None = None
    max_rpm: float | None = None
    max_coolant: float | None = None
    min_battery: float | None = None
    fuel_used_pct: float | None = None
    fuel_used_l: float | None = None
    odometer_start: float | None = None
    odometer_end: float | None = None
    hard_brakes: int = 0
    hard_accels: int = 0


TRIP_COLUMNS: Final = ", ".join(f.name for f in msgspec.structs.fields(Trip))


def trip_from_row(row: Mapping[str, Any]) -> Trip:
    """A :class:`Trip` of a ``trips`` row (:data:`TRIP_COLUMNS`)."""
    return msgspec.convert(dict(row), Trip, from_attributes=False)


class VehicleStatus(msgspec.Struct):
    """A vehicle's live status, from the hot table (``vehicle_state``)."""

    vin: str
    last_seen: datetime
    """Time of its newest sample."""
    seq: int
    """Sequence number of its newest sample."""
    updated_at: datetime
    """When the server last stored a sample of it."""
    position: Position | None
    values: dict[str, Reading]
    """The latest value of each measurement ever received, with its time (units: docs/wire.md)."""
    odometer: Reading | None
    extra: dict[str, float] | None = None
    trouble_codes: list[TroubleCode] = msgspec.field(default_factory=list)
    """Active trouble codes (insight's ``dtc_active``)."""
    last_trip: Trip | None = None
    """The latest trip (insight's ``trips``); ``closed`` is false while it may go on."""


class VehicleSummary(msgspec.Struct):
    """One vehicle of the list."""

    vin: str
    last_seen: datetime
    updated_at: datetime


class VehicleList(msgspec.Struct):
    """A page of vehicles, by VIN; ``next`` is the ``after`` of the next page (null: the end)."""

    items: list[VehicleSummary]
    next: str | None


STATUS_COLUMNS: Final = ", ".join(
    ["vin", "ts", "seq", "updated_at", "extra"]
    + [f"{name}, {name}_ts" for name in NUMERIC_FIELDS]
)


def status_from_row(row: Mapping[str, Any]) -> VehicleStatus:
    """The status of one ``vehicle_state`` row (:data:`STATUS_COLUMNS`)."""
    values = {
        name: Reading(float(row[name]), row[f"{name}_ts"])
        for name in NUMERIC_FIELDS
        if row[name] is not None
    }
    position = None
    lat, lon = values.get("lat"), values.get("lon")
    if lat is not None and lon is not None:
        alt, heading, speed = values.get("alt"), values.get("heading"), values.get("gps_speed")
        position = Position(
            lat=lat.value,
            lon=lon.value,
            ts=max(lat.ts, lon.ts),
            alt=alt.value if alt else None,
            heading=heading.value if heading else None,
            speed=speed.value if speed else None,
        )
    return VehicleStatus(
        vin=row["vin"],
        last_seen=row["ts"],
        seq=row["seq"],
        updated_at=row["updated_at"],
        position=position,
        values=values,
        odometer=values.get("odometer"),
        extra=row["extra"],
    )
