"""The publisher's send window: what to send next, when to resend, which acks to believe.

Pure, like :class:`revline.consumer.batcher.Batcher` and :class:`revline.edge.clock.ClockModel`:
no I/O, no clock reads (``now`` is passed in, monotonic seconds). The publisher feeds it what paho
reports (sends, PUBACKs, refusals, acks, lost connections) and does what it decides with the
spool and paho.

The rules (``docs/edge.md``):

* At most ``inflight_max`` messages wait for a PUBACK and at most ``unacked_max`` batches for the
  end-to-end ack; everything else stays in the spool.
* Each fill sends the live tail first (:meth:`SendWindow.may_send_live`), then, by
  :meth:`SendWindow.next_send`, resends that are due and backlog batches, oldest first by their
  first sequence number. A resend is due once the batch waited :func:`resend_timeout` for its
  ack (doubling per attempt, x8 at most), or at once after its connection was lost.
* An ack is believed only for a batch of ours that the broker has PUBACKed
  (:meth:`SendWindow.ack`): a forged ack, or one that overtakes the PUBACK, marks nothing durable.
* The spool is written before the window forgets: :meth:`SendWindow.unrecorded_pubacks` and
  :meth:`SendWindow.unrecorded_acks` say what to record, ``*_recorded`` confirms it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = ["BACKLOG", "AckVerdict", "SendWindow", "resend_timeout"]

BACKLOG: Final = "backlog"
"""What :meth:`SendWindow.next_send` returns when the next send is a new batch of the backlog."""

_MAX_BACKOFF_FACTOR: Final = 8.0


def resend_timeout(ack_timeout_s: float, attempts: int) -> float:
    """How long to wait for the end-to-end ack after the ``attempts``-th send (doubling, x8 max)."""
    return ack_timeout_s * min(2.0 ** max(attempts - 1, 0), _MAX_BACKOFF_FACTOR)


@dataclass(slots=True)
class _Batch:
    lo: int
    samples: int
    sent_at: float | None = None  # monotonic; None: due now
    attempts: int = 0
    mid: int | None = None  # set while waiting for the PUBACK
    pubacked: bool = False  # the broker took one of its sends: an ack for it can be believed


@dataclass(frozen=True, slots=True)
class AckVerdict:
    """What an ack's batch ids turned out to be (ids of batches already durable are left out:
    a repeated ack after a resend is harmless)."""

    believed: list[int] = field(default_factory=list)
    """Our batches, PUBACKed by the broker: durable once recorded."""
    not_pubacked: list[int] = field(default_factory=list)
    """Our batches, but the broker has not taken them yet: not believed (forged, or early)."""
    unknown: list[int] = field(default_factory=list)
    """Ids never created: whoever sent the ack is not the consumer."""


class SendWindow:
    """Batches sent and not yet acked end to end, and the decisions about them."""

    def __init__(self, *, inflight_max: int, unacked_max: int, ack_timeout_s: float) -> None:
        if inflight_max < 1 or unacked_max < 1 or ack_timeout_s <= 0:
            raise ValueError("inflight_max and unacked_max must be >= 1 and ack_timeout_s > 0")
        self.inflight_max = inflight_max
        self.unacked_max = unacked_max
        self.ack_timeout_s = ack_timeout_s
        self._batches: dict[int, _Batch] = {}  # batch id -> state, every batch not yet durable
        self._inflight: dict[int, int] = {}  # MQTT message id -> batch id, waiting for a PUBACK
        self._pubacks: list[int] = []  # message ids PUBACKed, not yet recorded in the spool
        self._acks: list[int] = []  # batch ids believed acked, not yet recorded in the spool

    # --- state ---

    @property
    def inflight(self) -> int:
        """Messages waiting for their PUBACK."""
        return len(self._inflight)

    @property
    def unacked(self) -> int:
        """Batches waiting for their end-to-end ack."""
        return len(self._batches)

    @property
    def empty(self) -> bool:
        """Nothing waits for a PUBACK or an ack."""
        return not self._inflight and not self._batches

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._batches

    # --- decisions ---

    def may_send_live(self, *, final: bool = False) -> bool:
        """Whether a fill may start with a new batch of the live tail (``final``: shutting down,
        the unacked limit no longer holds it back)."""
        if len(self._inflight) >= self.inflight_max:
            return False
        return len(self._batches) < self.unacked_max or final

    def _is_due(self, batch: _Batch, now: float) -> bool:
        if batch.mid is not None:
            return False
        if batch.sent_at is None:
            return True
        return now - batch.sent_at >= resend_timeout(self.ack_timeout_s, batch.attempts)

    def next_send(self, now: float, backlog_start: int | None) -> int | Literal["backlog"] | None:
        """After the live tail: the id of the oldest due resend, :data:`BACKLOG` when the oldest
        unbatched sample (``backlog_start``) is older than any due resend, or None when the
        window is full or nothing is to be sent."""
        if len(self._inflight) >= self.inflight_max:
            return None
        oldest = min(
            ((b.lo, batch_id) for batch_id, b in self._batches.items() if self._is_due(b, now)),
            default=None,
        )
        if oldest is not None and (backlog_start is None or oldest[0] < backlog_start):
            return oldest[1]
        if backlog_start is not None and len(self._batches) < self.unacked_max:
            return BACKLOG
        return None

    # --- what happened ---

    def resume(self, batch_id: int, lo: int, samples: int, *, pubacked: bool) -> None:
        """A batch left unacked by an earlier run: due at once (``pubacked``: the broker took it
        then, so an ack for it can be believed before it is sent again)."""
        self._batches[batch_id] = _Batch(lo=lo, samples=samples, pubacked=pubacked)

    def sent(self, batch_id: int, lo: int, samples: int, mid: int, now: float) -> bool:
        """A batch was handed to paho as message ``mid``; returns True for a resend."""
        batch = self._batches.setdefault(batch_id, _Batch(lo=lo, samples=samples))
        resend = batch.attempts > 0
        batch.attempts += 1
        batch.sent_at = now
        batch.mid = mid
        self._inflight[mid] = batch_id
        return resend

    def puback(self, mid: int) -> None:
        """The broker took message ``mid``."""
        batch_id = self._inflight.get(mid)
        batch = None if batch_id is None else self._batches.get(batch_id)
        if batch is not None:
            batch.pubacked = True  # at once: an ack later in this same network pass may name it
        self._pubacks.append(mid)

    def refused(self, mid: int) -> None:
        """The broker refused message ``mid`` (ACL, quota): sent again after the ack timeout."""
        batch_id = self._inflight.pop(mid, None)
        batch = None if batch_id is None else self._batches.get(batch_id)
        if batch is not None:
            batch.mid = None

    def ack(self, batch_ids: Iterable[int], next_batch: int) -> AckVerdict:
        """Sort the batch ids of an ack (``next_batch``: the first id not yet created); the
        believed ones are kept until :meth:`acks_recorded`."""
        believed: list[int] = []
        not_pubacked: list[int] = []
        unknown: list[int] = []
        for batch_id in batch_ids:
            batch = self._batches.get(batch_id)
            if batch is not None and batch.pubacked:
                believed.append(batch_id)
            elif batch is not None:
                not_pubacked.append(batch_id)
            elif batch_id >= next_batch:
                unknown.append(batch_id)
            # Otherwise already durable (or evicted): a repeated ack after a resend, harmless.
        self._acks += believed
        return AckVerdict(believed=believed, not_pubacked=not_pubacked, unknown=unknown)

    def lost(self) -> None:
        """The connection is gone: whatever waited for a PUBACK is due again, after live data."""
        for batch_id in self._inflight.values():
            batch = self._batches.get(batch_id)
            if batch is not None:
                batch.mid, batch.sent_at = None, None
        self._inflight.clear()
        self._pubacks.clear()

    def forget(self, batch_ids: Iterable[int]) -> None:
        """Batches that no longer exist (evicted from the spool before they were durable)."""
        for batch_id in batch_ids:
            self._batches.pop(batch_id, None)

    # --- what the spool must record first ---

    def unrecorded_pubacks(self) -> list[int]:
        """Batch ids PUBACKed since the last :meth:`pubacks_recorded`."""
        return [self._inflight[mid] for mid in self._pubacks if mid in self._inflight]

    def pubacks_recorded(self) -> None:
        """The spool has them: stop waiting for those PUBACKs."""
        for mid in self._pubacks:
            batch_id = self._inflight.pop(mid, None)
            batch = None if batch_id is None else self._batches.get(batch_id)
            if batch is not None:
                batch.mid = None
        self._pubacks.clear()

    def unrecorded_acks(self) -> list[int]:
        """Batch ids believed acked end to end since the last :meth:`acks_recorded`, once each."""
        return [i for i in dict.fromkeys(self._acks) if i in self._batches]

    def acks_recorded(self) -> int:
        """The spool has them as durable: forget those batches; returns how many."""
        done = self.unrecorded_acks()
        for batch_id in done:
            del self._batches[batch_id]
        self._acks.clear()
        return len(done)
