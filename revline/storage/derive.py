"""Work derived from what a write commits: the seam between storage and the product.

Trips, sequence accounting, trouble codes and live notifications are all derived from the samples a
write commits, per committed write and never per sample in SQL. Each is a :class:`Derivation` that
the consumer's writer (``revline.consumer.writer.Writer``) runs inside the write's own transaction,
after the cold insert and the hot upsert: what it records commits (or rolls back) with the samples,
so nothing derived is ever ahead of or behind the data it comes from. Heavy work (recomputing a
trip over a span) belongs after the commit: a derivation records what must be done (a dirty span)
in the transaction, and a background task does it.

:func:`spans` is the pure per-vehicle summary of a write that most derivations need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import Any, Final, Protocol, runtime_checkable

__all__ = ["Background", "Derivation", "Span", "Staged", "Vehicle", "spans"]

_VIN: Final = itemgetter(0)
_TS: Final = itemgetter(1)
_SEQ: Final = itemgetter(2)


class Derivation(Protocol):
    """Something kept up to date from every committed write.

    ``write`` holds the write's staging rows (:func:`revline.consumer.writer.records`), also
    grouped by vehicle (:class:`Staged`), duplicates of stored samples included (a derivation
    must be idempotent: a redelivered batch runs it again).
    """

    name: str
    """Short and stable: used in logs and metrics."""

    async def prepare(self, connection: Any) -> None:
        """Once per new database connection, outside any transaction (temp tables, codecs)."""

    async def apply(self, connection: Any, write: Staged) -> None:
        """Inside the write's transaction, after the samples are stored. An exception rolls the
        whole write back and is handled like the write's own (outage or data error)."""


@runtime_checkable
class Background(Protocol):
    """A derivation with work to do after commits (recomputing what dirty spans name)."""

    name: str

    async def run(self, pool: Any) -> None:
        """Loop until cancelled, using connections of the writer's asyncpg ``pool``; a failure
        is logged and retried, never raised (it is an outage)."""


@dataclass(frozen=True, slots=True)
class Span:
    """What one write holds of one vehicle: its time and sequence extent and sample count."""

    vin: str
    ts_min: int
    ts_max: int
    """Microseconds since the epoch, as in the contract."""
    seq_min: int
    seq_max: int
    samples: int


@dataclass(frozen=True, slots=True)
class Vehicle:
    """One vehicle's rows of a write, in arrival order, and their ``ts`` and ``seq`` columns."""

    vin: str
    rows: list[tuple[Any, ...]]
    ts: list[int]
    seq: list[int]

    @property
    def span(self) -> Span:
        """Its time and sequence extent and count."""
        ts, seq = self.ts, self.seq
        return Span(self.vin, min(ts), max(ts), min(seq), max(seq), len(ts))


class Staged:
    """The staging rows of one write (``rows``: the VIN, then the sample's fields in contract
    order, ``ts`` in integer microseconds) and the same rows by vehicle (``vehicles``, in order
    of first appearance).

    Grouped once per write, here, for the hot state and every derivation: each of them used to
    group the rows again, and at many cars sending small messages that grouping cost more than
    what they did with the groups.
    """

    __slots__ = ("rows", "vehicles")

    def __init__(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self.rows = rows
        grouped: dict[str, list[tuple[Any, ...]]] = {}
        # Rows come batch by batch, so a vehicle's rows are mostly together: one list extend
        # per group, the columns picked by C-level itemgetters, no Python step per sample.
        for vin, group in groupby(rows, _VIN):
            found = grouped.get(vin)
            if found is None:
                grouped[vin] = list(group)
            else:
                found.extend(group)
        self.vehicles = [
            Vehicle(vin, found, list(map(_TS, found)), list(map(_SEQ, found)))
            for vin, found in grouped.items()
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def spans(self) -> list[Span]:
        """One :class:`Span` per vehicle, in order of first appearance."""
        return [vehicle.span for vehicle in self.vehicles]


def spans(rows: Sequence[tuple[Any, ...]]) -> list[Span]:
    """One :class:`Span` per vehicle of staging ``rows``, in order of first appearance."""
    return Staged(rows).spans()
