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

from collections.abc import Sequence
from itertools import compress, groupby, repeat
from operator import is_not, itemgetter
from typing import Any, Final

from revline.contract import Sample

__all__ = ["DTC_CHANNEL", "STATE_CHANNEL", "StateNotify", "parse_state_payload"]

STATE_CHANNEL: Final = "revline_state"
DTC_CHANNEL: Final = "revline_dtc"
_DTC_OF: Final = itemgetter(1 + Sample.__struct_fields__.index("dtc"))
"""The ``dtc`` of a staging row (the VIN, then the sample's fields)."""
_VIN: Final = itemgetter(0)
_TS: Final = itemgetter(1)

_NOTIFY_SQL: Final = (
    "SELECT pg_notify($3, v || ' ' || t::text) FROM unnest($1::text[], $2::bigint[]) AS u(v, t)"
)


class StateNotify:
    """Tells ``revline_state`` listeners which vehicles a write touched, after it commits."""

    name = "notify"

    async def prepare(self, connection: Any) -> None:
        """Nothing to prepare."""

    async def apply(self, connection: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """One NOTIFY per vehicle of the write, queued in its transaction."""
        # At C speed (map, max, compress): this runs in every write of the consumer.
        newest: dict[str, int] = {}
        for vin, group in groupby(rows, _VIN):
            ts = max(map(_TS, group))
            if ts > newest.get(vin, -1):
                newest[vin] = ts
        if newest:
            await connection.execute(
                _NOTIFY_SQL, list(newest), list(newest.values()), STATE_CHANNEL
            )
        reports: dict[str, int] = {}
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
