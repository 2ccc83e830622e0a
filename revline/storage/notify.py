"""Live notifications: what each write committed, told to listeners after the commit.

:class:`StateNotify` is a :class:`~revline.storage.derive.Derivation`: inside the write's
transaction it queues one ``NOTIFY revline_state, '<vin> <ts>'`` per vehicle of the write (``ts``:
its newest sample in the write, µs). PostgreSQL delivers a NOTIFY only when its transaction
commits, and never if it rolls back, so a listener (``revline api``'s live streams) never hears of
data that is not committed. The payload is small on purpose: listeners re-read the hot table.
One statement per write, whatever its size.

Trouble codes: a write holding a sample that carries a trouble-code set (``Sample.dtc``: sent
only when the set changed) also queues ``NOTIFY revline_dtc, '<vin> <ts>'`` (``ts``: the oldest
such sample), after insight has re-derived the vehicle's ``dtc_events`` in the same transaction
(it runs before this derivation): listeners read the events that changed since ``ts``.
"""

from __future__ import annotations

from itertools import compress, repeat
from operator import is_not, itemgetter
from typing import TYPE_CHECKING, Any, Final

from revline.contract import Sample

if TYPE_CHECKING:
    from revline.storage.derive import Staged

__all__ = ["DTC_CHANNEL", "STATE_CHANNEL", "StateNotify", "parse_state_payload"]

STATE_CHANNEL: Final = "revline_state"
DTC_CHANNEL: Final = "revline_dtc"
_DTC_OF: Final = itemgetter(1 + Sample.__struct_fields__.index("dtc"))
"""The ``dtc`` of a staging row (the VIN, then the sample's fields)."""
_NOTIFY_SQL: Final = (
    "SELECT pg_notify($3, v || ' ' || t::text) FROM unnest($1::text[], $2::bigint[]) AS u(v, t)"
)


class StateNotify:
    """Tells ``revline_state`` listeners which vehicles a write touched, after it commits."""

    name = "notify"

    async def prepare(self, connection: Any) -> None:
        """Nothing to prepare."""

    async def apply(self, connection: Any, write: Staged) -> None:
        """One NOTIFY per vehicle of the write, queued in its transaction."""
        if write.vehicles:
            await connection.execute(
                _NOTIFY_SQL,
                [vehicle.vin for vehicle in write.vehicles],
                [max(vehicle.ts) for vehicle in write.vehicles],
                STATE_CHANNEL,
            )
        reports: dict[str, int] = {}
        rows = write.rows
        for row in compress(rows, map(is_not, map(_DTC_OF, rows), repeat(None))):
            if row[1] < reports.get(row[0], 2**63):
                reports[row[0]] = row[1]
        if reports:
            await connection.execute(
                _NOTIFY_SQL, list(reports), list(reports.values()), DTC_CHANNEL
            )


def parse_state_payload(payload: str) -> tuple[str, int] | None:
    """``(vin, ts)`` of a ``revline_state`` payload; None for anything else."""
    vin, _, ts = payload.partition(" ")
    if not vin or not ts.isdigit():
        return None
    return vin, int(ts)
