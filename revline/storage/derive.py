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

__all__ = ["Background", "Derivation", "Span", "spans"]

_VIN: Final = itemgetter(0)
_TS: Final = itemgetter(1)
_SEQ: Final = itemgetter(2)


class Derivation(Protocol):
    """Something kept up to date from every committed write.

    ``rows`` are the write's staging rows (:func:`revline.consumer.writer.records`: the VIN, then
    the sample's fields in contract order, ``ts`` in integer microseconds), duplicates of stored
    samples included (a derivation must be idempotent: a redelivered batch runs it again).
    """

    name: str
    """Short and stable: used in logs and metrics."""

    async def prepare(self, connection: Any) -> None:
        """Once per new database connection, outside any transaction (temp tables, codecs)."""

    async def apply(self, connection: Any, rows: Sequence[tuple[Any, ...]]) -> None:
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


def spans(rows: Sequence[tuple[Any, ...]]) -> list[Span]:
    """One :class:`Span` per vehicle of staging ``rows``, in order of first appearance."""
    acc: dict[str, list[int]] = {}
    # Rows come batch by batch, so a vehicle's rows are mostly together: min and max of each
    # run at C speed (itemgetter, map), no Python step per sample.
    for vin, group in groupby(rows, _VIN):
        run = list(group)
        ts = list(map(_TS, run))
        seq = list(map(_SEQ, run))
        found = [min(ts), max(ts), min(seq), max(seq), len(run)]
        a = acc.get(vin)
        if a is None:
            acc[vin] = found
            continue
        a[0] = min(a[0], found[0])
        a[1] = max(a[1], found[1])
        a[2] = min(a[2], found[2])
        a[3] = max(a[3], found[3])
        a[4] += found[4]
    return [Span(vin, *a) for vin, a in acc.items()]
