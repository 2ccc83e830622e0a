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
    "Position",
    "Reading",
    "VehicleList",
    "VehicleStatus",
    "VehicleSummary",
    "status_from_row",
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
