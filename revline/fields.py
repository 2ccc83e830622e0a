"""The measurements: one table that every other statement about them is derived from.

Each :class:`Field` says what one measurement is (name, unit, meaning), which values are physically
possible (the contract's bounds), how finely the device's spool keeps it, how the cold table
stores it, and which python-OBD command reads it. The contract's ``Sample``, the spool's packing,
the writer's SQL, the sampler's bounds and the PID map are all computed from :data:`FIELDS`; the
SQL migrations are checked against it by tests/core/test_fields.py on a real database.

Adding a measurement is one entry at the END of :data:`FIELDS` plus one SQL migration (the cold
column ``<name>_e<digits>``, the hot columns ``<name>``/``<name>_ts``, the ``samples_decoded``
view and the rollups' ``<name>_avg/_min/_max``: docs/storage.md, "Adding a measurement"). Rules
the tests hold:

- **Append only.** A spool row stores the present fields by their position in this table, and
  the cold table has a column per field: never reorder, rename or remove an entry, and never
  change the ``device_scale`` of one (rows already in spools were written with it).
- ``10 ** db_digits`` is a multiple of ``device_scale``: every value the device keeps is exact in
  the database.

Pure and standard library only: the core imports nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["FIELDS", "FIELD_BY_NAME", "Field"]

_FLOAT32_EXACT: Final = 2**24
"""Integers up to this are exact in a ``real`` (float32, 24-bit significand)."""
_INT_TYPES: Final = (("smallint", 2**15 - 1), ("integer", 2**31 - 1), ("bigint", 2**63 - 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    """One measurement of a :class:`revline.contract.Sample`."""

    name: str
    """Contract field, hot column and rollup prefix: lower case, digits and ``_``."""
    unit: str
    """The unit every layer uses, for people: ``km/h``, ``°C``..."""
    description: str
    """What it is, one phrase."""
    lo: float
    """Smallest value the contract accepts."""
    hi: float
    """Largest value the contract accepts (bounds are physical limits with headroom)."""
    device_scale: int
    """The spool keeps ``round(value * device_scale)``: steps per unit of the sensor."""
    db_digits: int
    """The cold column ``<name>_e<db_digits>`` holds ``round(value * 10 ** db_digits)``."""
    obd: str | None = None
    """The python-OBD command that reads it; None for GPS fields."""
    obd_unit: str | None = None
    """The pint unit (python-OBD's registry) its answer is converted to, ``unit`` by name."""

    @property
    def cold_column(self) -> str:
        """The cold-table column, e.g. ``speed_e1``."""
        return f"{self.name}_e{self.db_digits}"

    @property
    def cold_type(self) -> str:
        """The narrowest integer SQL type holding every value within the bounds, scaled."""
        largest = max(abs(self.lo), abs(self.hi)) * 10**self.db_digits
        return next(kind for kind, top in _INT_TYPES if largest <= top)

    @property
    def value_type(self) -> str:
        """The SQL type of the value in real units (hot table, rollups, decoded view):
        ``real`` when float32 tells every database step apart, else ``double precision``."""
        steps = max(abs(self.lo), abs(self.hi)) * 10**self.db_digits
        return "real" if steps < _FLOAT32_EXACT else "double precision"


FIELDS: Final[tuple[Field, ...]] = (
    Field(
        name="speed", unit="km/h", description="Vehicle speed (OBD)",
        lo=0, hi=500, device_scale=10, db_digits=1, obd="SPEED", obd_unit="kph",
    ),
    Field(
        name="rpm", unit="1/min", description="Engine speed",
        lo=0, hi=20_000, device_scale=4, db_digits=2, obd="RPM", obd_unit="rpm",
    ),  # OBD resolution: 1/4 rpm
    Field(
        name="coolant", unit="°C", description="Engine coolant temperature",
        lo=-60, hi=300, device_scale=10, db_digits=1, obd="COOLANT_TEMP", obd_unit="degC",
    ),
    Field(
        name="intake", unit="°C", description="Intake air temperature",
        lo=-60, hi=300, device_scale=10, db_digits=1, obd="INTAKE_TEMP", obd_unit="degC",
    ),
    Field(
        name="throttle", unit="%", description="Throttle position",
        lo=0, hi=100, device_scale=100, db_digits=2, obd="THROTTLE_POS", obd_unit="percent",
    ),  # OBD steps are 100/255 %; 0.01 % keeps them apart
    Field(
        name="load", unit="%", description="Calculated engine load",
        lo=0, hi=100, device_scale=100, db_digits=2, obd="ENGINE_LOAD", obd_unit="percent",
    ),
    Field(
        name="maf", unit="g/s", description="Mass air flow",
        lo=0, hi=2_000, device_scale=100, db_digits=2, obd="MAF", obd_unit="gps",
    ),
    Field(
        name="fuel", unit="%", description="Fuel tank level",
        lo=0, hi=100, device_scale=100, db_digits=2, obd="FUEL_LEVEL", obd_unit="percent",
    ),
    Field(
        name="battery", unit="V", description="Control module (battery) voltage",
        lo=0, hi=60, device_scale=1000, db_digits=3,
        obd="CONTROL_MODULE_VOLTAGE", obd_unit="volt",
    ),  # OBD resolution: 1 mV
    Field(
        name="lat", unit="°", description="GPS latitude (WGS84)",
        lo=-90, hi=90, device_scale=10_000_000, db_digits=7,
    ),  # 1e-7 degree, about 1 cm
    Field(
        name="lon", unit="°", description="GPS longitude (WGS84)",
        lo=-180, hi=180, device_scale=10_000_000, db_digits=7,
    ),
    Field(
        name="alt", unit="m", description="GPS altitude above mean sea level",
        lo=-1_000, hi=20_000, device_scale=10, db_digits=1,
    ),
    Field(
        name="heading", unit="°", description="GPS course over ground, from true north",
        lo=0, hi=360, device_scale=10, db_digits=1,
    ),
    Field(
        name="gps_speed", unit="km/h", description="GPS speed over ground",
        lo=0, hi=500, device_scale=10, db_digits=1,
    ),
    Field(
        name="odometer", unit="km", description="Odometer, total distance travelled",
        lo=0, hi=2_000_000, device_scale=10, db_digits=1, obd="ODOMETER", obd_unit="km",
    ),  # PID 01A6, 0.1 km; python-OBD 0.7.3 has no command for it yet: read by a custom one
)
"""Every typed measurement, in contract order. Append only (see the module docstring)."""

FIELD_BY_NAME: Final = {field.name: field for field in FIELDS}
""":data:`FIELDS` by name."""
