"""Reading insight back: a vehicle's trips and its state, for the CLI (and anyone else).

Plain asyncpg queries on the tables of sql/008_insight.sql and the hot table; times come back as
``datetime`` (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["VehicleReport", "trips", "vehicle"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

TRIPS_SQL: Final = (
    "SELECT start_ts, end_ts, duration_s, distance_km, distance_source, avg_speed, max_speed, "
    "max_rpm, max_coolant, fuel_used_l, hard_brakes, hard_accels, completeness, closed "
    "FROM trips WHERE vin = $1 AND end_ts >= $2 ORDER BY start_ts DESC LIMIT $3"
)
STATE_SQL: Final = (
    "SELECT v.ts, v.speed, v.rpm, v.coolant, v.battery, v.fuel, v.lat, v.lon, v.odometer, "
    "a.state, a.state_since FROM vehicle_state v LEFT JOIN vehicle_activity a ON a.vin = v.vin "
    "WHERE v.vin = $1"
)
CODES_SQL: Final = "SELECT code, first_seen FROM dtc_active WHERE vin = $1 ORDER BY first_seen"
ODOMETER_SQL: Final = (
    "SELECT ts, odometer_km, source, anomaly FROM odometer_history WHERE vin = $1 "
    "ORDER BY ts DESC LIMIT 1"
)
LAST_ANOMALY_SQL: Final = (
    "SELECT ts, anomaly, anomaly_km FROM odometer_history WHERE vin = $1 AND anomaly IS NOT NULL "
    "ORDER BY ts DESC LIMIT 1"
)


@dataclass(frozen=True)
class VehicleReport:
    """Everything ``revline vehicle`` shows; None/empty where nothing is known."""

    vin: str
    state: Any
    """The hot-table row joined with the trip state (None: the vehicle never reported)."""
    codes: list[Any]
    odometer: Any
    anomaly: Any
    last_trip: Any


async def trips(connection: Any, vin: str, since: datetime, limit: int = 1000) -> list[Any]:
    """Trips of ``vin`` ending at or after ``since``, newest first."""
    rows: list[Any] = await connection.fetch(TRIPS_SQL, vin, since, limit)
    return rows


async def vehicle(connection: Any, vin: str) -> VehicleReport:
    """The latest state, active codes, odometer and last trip of ``vin``."""
    last = await connection.fetch(TRIPS_SQL, vin, _EPOCH, 1)
    return VehicleReport(
        vin=vin,
        state=await connection.fetchrow(STATE_SQL, vin),
        codes=list(await connection.fetch(CODES_SQL, vin)),
        odometer=await connection.fetchrow(ODOMETER_SQL, vin),
        anomaly=await connection.fetchrow(LAST_ANOMALY_SQL, vin),
        last_trip=last[0] if last else None,
    )
