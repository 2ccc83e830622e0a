"""The spool's index: which samples are in no batch yet, which of them may be batched now.

Pure, like :class:`revline.edge.clock.ClockModel`: no SQL, no clock reads (``now`` is passed in,
monotonic seconds). :class:`revline.edge.spool.Spool` keeps one in memory, rebuilds it from the
tables at start (:meth:`SpoolIndex.rebuild`) and tells it every change it commits.

* Unbatched samples are sorted, disjoint ``seq`` ranges. The last one is the *live tail* when it
  ends at the newest sample (it grows with every write and is batched newest first, once it holds
  a full batch or has waited ``max_age_s``); the others are the *backlog*, batched oldest first.
  A range may span rows that are gone (a durable batch evicted from its middle): the spool finds
  no rows there and says so with :meth:`SpoolIndex.gone`.
* The clock hold: samples of this boot taken before the wall clock was trusted wait with their
  monotonic time (``revline.edge.clock``). From the first of them (:attr:`SpoolIndex.hold_from`)
  on, nothing is batched until the spool has rewritten their timestamps
  (:meth:`SpoolIndex.clock_fixed`): a batch's rows never change once it exists, so that a resend
  rebuilds the same bytes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["SpoolIndex"]

Span = tuple[int, int]
"""An inclusive ``seq`` range ``(lo, hi)``."""


class SpoolIndex:
    """Unbatched ``seq`` ranges, the clock hold, and the age of the live tail."""

    def __init__(
        self,
        *,
        next_seq: int = 0,
        gaps: Sequence[Span] = (),
        hold_from: int | None = None,
        now: float = 0.0,
    ) -> None:
        self.next_seq = next_seq
        """The seq the next written sample gets."""
        self.hold_from = hold_from
        """The first sample of this boot waiting for a trusted clock; None when none waits."""
        self._gaps: list[Span] = [(lo, hi) for lo, hi in gaps if lo <= hi]
        self._tail_since: float | None = now if self._gaps else None

    @classmethod
    def rebuild(
        cls,
        *,
        first_seq: int | None,
        next_seq: int,
        batches: Sequence[Span],
        hold_from: int | None,
        now: float,
    ) -> SpoolIndex:
        """The index of a spool whose oldest row is ``first_seq`` (None: no rows) and whose
        batches cover ``batches`` (sorted by ``lo``); the live tail's age starts at ``now``."""
        gaps = [] if first_seq is None else _uncovered(first_seq, next_seq - 1, batches)
        return cls(next_seq=next_seq, gaps=gaps, hold_from=hold_from, now=now)

    # --- what the index says ---

    @property
    def gaps(self) -> list[Span]:
        """The unbatched ranges, oldest first."""
        return list(self._gaps)

    @property
    def unbatched(self) -> int:
        """Samples in no batch yet (an upper bound: rows gone from a range still count)."""
        return sum(hi - lo + 1 for lo, hi in self._gaps)

    def _tail(self) -> Span | None:
        if self._gaps and self._gaps[-1][1] == self.next_seq - 1:
            return self._gaps[-1]
        return None

    def _batchable(self, lo: int, hi: int) -> Span | None:
        if self.hold_from is not None:
            hi = min(hi, self.hold_from - 1)
        return (lo, hi) if lo <= hi else None

    def live(self, max_samples: int, max_age_s: float, now: float) -> Span | None:
        """The batchable part of the live tail, once it holds ``max_samples`` samples or has
        waited ``max_age_s``; its newest ``max_samples`` rows make the next live batch."""
        tail = self._tail()
        span = None if tail is None else self._batchable(*tail)
        if span is None:
            return None
        waited = now - (self._tail_since or 0.0)
        if span[1] - span[0] + 1 < max_samples and waited < max_age_s:
            return None
        return span

    def backlog(self) -> Span | None:
        """The oldest batchable range that is not the live tail; its oldest rows come next."""
        if not self._gaps or self._gaps[0] == self._tail():
            return None
        return self._batchable(*self._gaps[0])

    def backlog_start(self) -> int | None:
        """The oldest unbatched seq outside the live tail (held or not), to order it against
        resends; None when there is no backlog."""
        if not self._gaps or self._gaps[0] == self._tail():
            return None
        return self._gaps[0][0]

    # --- what the spool committed ---

    def written(self, first: int, count: int, *, held: int | None, now: float) -> None:
        """``count`` samples from ``first`` (the old :attr:`next_seq`) were committed; ``held`` is
        the first of them waiting for a trusted clock, if any."""
        if count <= 0:
            return
        if first != self.next_seq:
            raise ValueError(f"written from seq {first}, expected {self.next_seq}")
        last = first + count - 1
        if self._tail() is not None:
            self._gaps[-1] = (self._gaps[-1][0], last)
        else:
            self._gaps.append((first, last))
            self._tail_since = now
        self.next_seq = last + 1
        if self.hold_from is None and held is not None:
            self.hold_from = held

    def clock_fixed(self) -> None:
        """Every waiting sample of this boot has its real timestamp now: batch them."""
        self.hold_from = None

    def took_live(self, lo: int, hi: int, now: float) -> None:
        """A live batch was made of ``[lo, hi]``; the next one waits from ``now``."""
        self._remove(lo, hi)
        self._tail_since = now

    def took_backlog(self, lo: int, hi: int) -> None:
        """A backlog batch was made of ``[lo, hi]``."""
        self._remove(lo, hi)

    def gone(self, lo: int, hi: int) -> None:
        """No rows are left in ``[lo, hi]`` (evicted, or never there): nothing to batch."""
        self._remove(lo, hi)

    def evicted(self, lo: int, hi: int) -> bool:
        """Unbatched rows ``[lo, hi]`` were evicted under the size cap. Returns True when the
        first held sample was among them: the spool finds the next one for :meth:`hold`."""
        self._remove(lo, hi)
        return self.hold_from is not None and self.hold_from <= hi

    def hold(self, seq: int | None) -> None:
        """The first sample of this boot still waiting for a trusted clock is now ``seq``."""
        self.hold_from = seq

    def _remove(self, lo: int, hi: int) -> None:
        """Take ``[lo, hi]`` out of the ranges, splitting one if needed."""
        gaps = self._gaps
        i = max(bisect.bisect_right(gaps, (lo, lo)) - 1, 0)
        out = gaps[:i]
        for g_lo, g_hi in gaps[i:]:
            if g_hi < lo or g_lo > hi:
                out.append((g_lo, g_hi))
                continue
            if g_lo < lo:
                out.append((g_lo, lo - 1))
            if g_hi > hi:
                out.append((hi + 1, g_hi))
        self._gaps = out


def _uncovered(lo: int, hi: int, ranges: Sequence[Span]) -> list[Span]:
    """Parts of ``[lo, hi]`` not covered by the sorted ``ranges``."""
    gaps: list[Span] = []
    cursor = lo
    for r_lo, r_hi in ranges:
        if r_lo > cursor:
            gaps.append((cursor, min(r_lo - 1, hi)))
        cursor = max(cursor, r_hi + 1)
    if cursor <= hi:
        gaps.append((cursor, hi))
    return [g for g in gaps if g[0] <= g[1]]
