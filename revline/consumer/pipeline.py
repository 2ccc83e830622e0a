"""The consumer's policy, apart from its I/O: what each received message becomes, what a closed
batch stores and dead-letters, what a database error means, when each message is PUBACKed and
which end-to-end acks go out. Pure: no broker, no database, no clock of its own (the time is
passed in). :mod:`revline.consumer.service` is the asyncio shell that drives it with its own
MQTT client (:mod:`revline.consumer.subscriber`) and asyncpg.

A message's way through: :func:`classify` (on arrival) -> :class:`~revline.consumer.batcher.
Batcher` -> :func:`plan` (the batch closed) -> the writes, judged by :func:`fault` and, when the
database refuses a batch's values, :class:`Split` -> :class:`InOrder` (committed) -> PUBACK in
arrival order and :func:`acks`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Generic, TypeVar

from revline.consumer.budget import footprint
from revline.consumer.validate import Invalid, check
from revline.consumer.writer import Rejected, WriteResult
from revline.contract import SCHEMA_VERSION, Ack
from revline.storage.errors import describe, is_data_error
from revline.wire_v2 import AnyBatch, RowBatch

if TYPE_CHECKING:
    from revline.consumer.subscriber import Inbound

__all__ = [
    "Fault",
    "InOrder",
    "Item",
    "Plan",
    "Split",
    "acks",
    "classify",
    "dead_letter",
    "fault",
    "newest_sample",
    "plan",
    "sample_count",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Item:
    """One received message and what became of it: a batch to store, or a dead letter.

    ``batch`` is set whenever the payload decoded, even if it was then refused (future
    timestamps), so that the device still gets its end-to-end ack for it.
    """

    inbound: Inbound
    batch: AnyBatch | None = None
    """A v1 Batch of samples, or a v2 RowBatch decoded straight to staging rows."""
    rejected: Rejected | None = None
    size: int = 0
    """Bytes it holds until acked (raw payload and decoded batch): its charge to the budget."""

    @property
    def samples(self) -> int:
        """Samples it holds (decoded), for the batcher's bound."""
        return sample_count(self.batch) if self.batch is not None else 0


def sample_count(batch: AnyBatch) -> int:
    """Samples in a decoded batch, v1 or v2."""
    return len(batch) if isinstance(batch, RowBatch) else len(batch.samples)


def dead_letter(inbound: Inbound, reason: str, detail: str) -> Rejected:
    """The ``rejected`` row for a message: its raw bytes, with a stable reason and a detail."""
    return Rejected(
        received_at=datetime.fromtimestamp(inbound.received_at, tz=UTC),
        topic=inbound.topic,
        reason=reason,
        detail=detail,
        payload=inbound.payload,
    )


def classify(
    inbound: Inbound, *, now_us: int, max_future_us: int, max_age_us: int | None
) -> Item:
    """Decode and check one message (:func:`~revline.consumer.validate.check`) against the
    consumer clock ``now_us``: a batch to store, or a dead letter (which keeps the decoded batch,
    if any, for the end-to-end ack); and the bytes it will hold until acked."""
    verdict = check(
        inbound.payload,
        inbound.topic,
        now_us=now_us,
        max_future_us=max_future_us,
        max_age_us=max_age_us,
    )
    if isinstance(verdict, Invalid):
        batch, rejected = verdict.batch, dead_letter(inbound, verdict.reason, verdict.detail)
    else:
        batch, rejected = verdict, None
    size = footprint(len(inbound.payload), batch)
    return Item(inbound, batch=batch, rejected=rejected, size=size)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with a closed batch's messages, each in exactly one list, in arrival order."""

    store: list[Item]
    """Decoded and accepted: their samples are written together in one transaction."""
    refused: list[Rejected]
    """Refused before the database (undecodable, future timestamps...): dead-lettered."""


def plan(items: Iterable[Item]) -> Plan:
    """Split a closed batch into what to store and what to dead-let at once."""
    store: list[Item] = []
    refused: list[Rejected] = []
    for item in items:
        if item.rejected is not None:
            refused.append(item.rejected)
        elif item.batch is not None:
            store.append(item)
    return Plan(store, refused)


def newest_sample(batches: Iterable[AnyBatch]) -> int | None:
    """The newest sample time (µs) among the last samples of ``batches``, for ``lag_s``."""
    return max((last for b in batches if (last := _last_ts(b)) is not None), default=None)


def _last_ts(batch: AnyBatch) -> int | None:
    if isinstance(batch, RowBatch):
        return batch.ts[-1] if batch.ts else None
    return batch.samples[-1].ts if batch.samples else None


class Fault(enum.Enum):
    """What a failed database call means for the messages in it."""

    VALUES = "values"
    """The database refused the values written (:func:`~revline.storage.errors.is_data_error`):
    write the messages one by one (:class:`Split`) to find the one at fault."""
    OUTAGE = "outage"
    """Anything else (privileges, disk, connection, timeout, an unknown error): retry the same
    batch, however long it takes, and ack nothing meanwhile."""


def fault(exc: BaseException) -> Fault:
    """Judge a database error: bad values, or an outage. An outage is never bad data."""
    return Fault.VALUES if is_data_error(exc) else Fault.OUTAGE


@dataclass(slots=True)
class Split:
    """The books of writing a refused batch's messages one at a time, and the probe rule.

    A message is dead-lettered only when its own write raised a data error (:func:`fault` says
    :attr:`Fault.VALUES`) *and* a probe write of a plain sample has worked since the split
    began: that proves the deployment can write, so the fault is in that message's values. One
    probe per split is enough; any other error, or a failing probe, is an outage (the caller
    lets it propagate, and the whole batch is retried).
    """

    result: WriteResult = field(default_factory=lambda: WriteResult(0, 0, 0))
    """What the writes that worked committed, summed."""
    refused: list[Rejected] = field(default_factory=list)
    """Dead letters, ``db_error``: messages whose own values the database refused."""
    stored: list[AnyBatch] = field(default_factory=list)
    """Batches written, in order."""
    probed: bool = False
    """Whether a probe write has worked since the split began (:meth:`probe_worked`)."""

    @staticmethod
    def todo(items: Iterable[Item]) -> list[tuple[Item, AnyBatch]]:
        """The messages to write one by one, with their batches: those that decoded."""
        return [(item, item.batch) for item in items if item.batch is not None]

    def wrote(self, batch: AnyBatch, result: WriteResult) -> None:
        """``batch`` was written alone: count it."""
        self.stored.append(batch)
        self.result = WriteResult(
            batches=self.result.batches + result.batches,
            samples=self.result.samples + result.samples,
            inserted=self.result.inserted + result.inserted,
        )

    def needs_probe(self, exc: BaseException) -> bool:
        """Whether a message's write that raised ``exc`` needs a probe before it may be
        dead-lettered (a data error, no probe yet); an outage needs none, it propagates."""
        return fault(exc) is Fault.VALUES and not self.probed

    def probe_worked(self) -> None:
        """A probe write of a plain sample worked: the deployment can write."""
        self.probed = True

    def refuse(self, item: Item, exc: BaseException) -> None:
        """Dead-letter ``item``, whose own write raised the data error ``exc``.

        Raises ``ValueError`` (a bug in the caller) for an error that is an outage, or before a
        probe has worked: either would dead-letter good data.
        """
        if fault(exc) is not Fault.VALUES or not self.probed:
            raise ValueError("only a data error, after a probe that worked, dead-letters")
        detail = describe(exc)
        detail = f"SQLSTATE {detail}" if getattr(exc, "sqlstate", None) else detail
        self.refused.append(dead_letter(item.inbound, "db_error", detail))


class InOrder(Generic[T]):
    """Releases work in the order it was started, each piece once it and all before it are done.

    MQTT wants PUBACKs in the order the PUBLISHes came, and a later batch must not be acked while
    an earlier one may still fail: batches are written concurrently, but a committed batch waits
    here for its predecessors.
    """

    def __init__(self) -> None:
        self._started = 0
        self._released = 0
        self._done: dict[int, T] = {}

    def __len__(self) -> int:
        """Started and not yet released."""
        return self._started - self._released

    def start(self) -> int:
        """A ticket for the next piece of work, in start order."""
        self._started += 1
        return self._started - 1

    def done(self, ticket: int, value: T) -> list[T]:
        """Work ``ticket`` is done with ``value``: what may be released now, in start order
        (nothing if an earlier piece is still running)."""
        if not self._released <= ticket < self._started or ticket in self._done:
            raise ValueError(f"ticket {ticket} is not running")
        self._done[ticket] = value
        released: list[T] = []
        while self._released in self._done:
            released.append(self._done.pop(self._released))
            self._released += 1
        return released


def acks(items: Iterable[Item]) -> list[Ack]:
    """The end-to-end acks for committed ``items``: one per vehicle, in order of first
    appearance, naming each of its batches once (a redelivered duplicate too).

    A decoded batch that was dead-lettered (future timestamps, refused by the database) is acked
    as well: its bytes are in ``rejected`` for an operator to replay, and a device resending it
    forever would help nobody. A message that did not decode names no vehicle and gets none.
    """
    per_vin: dict[str, dict[int, None]] = {}
    for item in items:
        if item.batch is not None:
            per_vin.setdefault(item.batch.vin, {})[item.batch.batch] = None
    return [Ack(v=SCHEMA_VERSION, vin=vin, batches=list(ids)) for vin, ids in per_vin.items()]

