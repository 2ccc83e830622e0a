"""The spool's index without SQLite: unbatched ranges, live tail, backlog, the clock hold."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from revline.edge.index import Span, SpoolIndex


def take_live(index: SpoolIndex, rows: set[int], max_samples: int, now: float) -> Span | None:
    """What the spool does: the newest ``max_samples`` rows that exist in the live span."""
    span = index.live(max_samples, 0.0, now)
    if span is None:
        return None
    present = sorted(s for s in rows if span[0] <= s <= span[1])[-max_samples:]
    if not present:
        index.gone(*span)
        return None
    index.took_live(present[0], present[-1], now)
    return present[0], present[-1]


def take_backlog(index: SpoolIndex, rows: set[int], max_samples: int) -> Span | None:
    """What the spool does: the oldest ``max_samples`` rows that exist in the backlog span."""
    while (span := index.backlog()) is not None:
        present = sorted(s for s in rows if span[0] <= s <= span[1])[:max_samples]
        if present:
            index.took_backlog(present[0], present[-1])
            return present[0], present[-1]
        index.gone(*span)
    return None


def test_the_live_tail_goes_first_and_the_backlog_oldest_first() -> None:
    """Newest samples make the first batch; what they leave behind is backlog, oldest first."""
    index = SpoolIndex()
    index.written(0, 2000, held=None, now=0.0)
    assert index.backlog() is None  # everything is still the live tail
    assert index.live(500, 60.0, now=0.0) == (0, 1999)
    index.took_live(1500, 1999, now=0.0)
    index.written(2000, 3, held=None, now=1.0)
    assert index.backlog() == (0, 1499)
    assert index.backlog_start() == 0
    index.took_backlog(0, 499)
    assert index.live(500, 60.0, now=1.0) is None  # three samples, not yet old enough
    assert index.live(500, 0.5, now=1.5) == (2000, 2002)
    assert index.gaps == [(500, 1499), (2000, 2002)]
    assert index.unbatched == 1003


def test_the_live_tail_waits_for_a_full_batch_or_its_age() -> None:
    """A short tail is batched only once it has waited ``max_age_s`` since it began."""
    index = SpoolIndex()
    index.written(0, 10, held=None, now=100.0)
    index.written(10, 10, held=None, now=100.5)  # the same tail: its age counts from 100.0
    assert index.live(50, 1.0, now=100.9) is None
    assert index.live(20, 1.0, now=100.9) == (0, 19)  # full
    assert index.live(50, 1.0, now=101.0) == (0, 19)  # old enough


def test_samples_waiting_for_a_trusted_clock_are_not_batched_until_fixed() -> None:
    """From the first held sample on nothing is batched; older samples still go; then all do."""
    index = SpoolIndex()
    index.written(0, 100, held=None, now=0.0)
    index.took_live(0, 99, now=0.0)
    index.written(100, 50, held=None, now=0.0)
    index.written(150, 50, held=160, now=0.0)  # the clock was lost: from seq 160 on, held
    assert index.live(500, 0.0, now=0.0) == (100, 159)
    index.took_live(100, 159, now=0.0)
    assert index.live(500, 0.0, now=0.0) is None
    assert index.backlog() is None
    index.written(200, 10, held=205, now=0.0)  # a later held sample does not move the hold
    assert index.hold_from == 160
    index.clock_fixed()
    assert index.live(500, 0.0, now=0.0) == (160, 209)


def test_the_hold_clips_the_backlog_too() -> None:
    """A backlog range that runs into held samples is batched only up to them."""
    index = SpoolIndex(next_seq=300, gaps=[(0, 99), (200, 299)], hold_from=50)
    assert index.backlog() == (0, 49)
    assert index.backlog_start() == 0
    index.took_backlog(0, 49)
    assert index.backlog() is None  # (50, 99) is held
    assert index.backlog_start() == 50


def test_an_index_is_rebuilt_from_the_batches_at_start() -> None:
    """Unbatched ranges are the seqs between the oldest row and the newest that no batch covers."""
    index = SpoolIndex.rebuild(
        first_seq=10,
        next_seq=100,
        batches=[(0, 19), (30, 39), (35, 49), (90, 99)],
        hold_from=None,
        now=0.0,
    )
    assert index.gaps == [(20, 29), (50, 89)]
    assert index.backlog() == (20, 29)
    assert index.live(1, 0.0, now=0.0) is None  # the newest rows are batched: no live tail
    empty = SpoolIndex.rebuild(first_seq=None, next_seq=7, batches=[], hold_from=None, now=0.0)
    assert (empty.gaps, empty.next_seq) == ([], 7)


def test_rows_found_missing_are_dropped_from_the_ranges() -> None:
    """A range whose rows are gone (a durable batch evicted from its middle) is skipped."""
    index = SpoolIndex(next_seq=300, gaps=[(0, 199), (250, 299)])
    rows = set(range(100)) | set(range(250, 300))
    assert take_backlog(index, rows, 500) == (0, 99)
    assert take_backlog(index, rows, 500) is None  # (100, 199): no rows, and the rest is tail
    assert index.gaps == [(250, 299)]


def test_eviction_under_the_hold_asks_for_the_next_held_sample() -> None:
    """Evicting unsent rows that include the first held one makes the spool find the next."""
    index = SpoolIndex(next_seq=100, gaps=[(0, 99)], hold_from=20)
    assert not index.evicted(0, 9)
    assert index.evicted(10, 29)
    index.hold(30)
    assert index.gaps == [(30, 99)]
    assert index.live(500, 0.0, now=0.0) is None  # still held from 30


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["write", "write_held", "live", "backlog", "fix", "evict", "drop", "reopen"]
        ),
        st.integers(1, 40),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_every_sample_lands_in_exactly_one_batch_never_while_held(
    ops: list[tuple[str, int]],
) -> None:
    """Whatever the writes, takes, evictions, clock fixes and restarts, batches never overlap,
    never hold a sample waiting for the clock, and in the end cover every sample still there."""
    index = SpoolIndex()
    rows: set[int] = set()  # seqs in the spool
    held: set[int] = set()  # seqs waiting for a trusted clock
    batches: list[Span] = []
    now = 0.0

    def check(span: Span | None) -> None:
        if span is None:
            return
        assert not any(s in held for s in range(span[0], span[1] + 1))
        for lo, hi in batches:
            assert span[1] < lo or span[0] > hi  # no sample in two batches
        batches.append(span)

    for op, n in ops:
        now += 0.1
        if op in {"write", "write_held"}:
            first = index.next_seq
            new = range(first, first + n)
            rows.update(new)
            if op == "write_held" or held:  # once the clock is lost, later rows wait too
                held.update(new)
            index.written(first, n, held=first if op == "write_held" or held else None, now=now)
        elif op == "live":
            check(take_live(index, rows, n, now))
        elif op == "backlog":
            check(take_backlog(index, rows, n))
        elif op == "fix":
            held.clear()
            index.clock_fixed()
        elif op == "evict" and index.gaps:  # unsent rows, oldest first, as the size cap does
            lo = index.gaps[0][0]
            hi = min(lo + n - 1, index.gaps[0][1])
            if index.evicted(lo, hi):
                index.hold(min((s for s in held if s > hi), default=None))
            rows.difference_update(range(lo, hi + 1))
            held.difference_update(range(lo, hi + 1))
        elif op == "drop" and batches:  # a whole batch evicted (durable, or the cap's last resort)
            lo, hi = batches.pop(0)
            rows.difference_update(range(lo, hi + 1))
        elif op == "reopen":
            covered = sorted(batches)
            index = SpoolIndex.rebuild(
                first_seq=min(rows, default=None),
                next_seq=index.next_seq,
                batches=covered,
                hold_from=min(held, default=None),
                now=now,
            )
        gaps = index.gaps
        assert gaps == sorted(gaps)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(gaps))
    held.clear()
    index.clock_fixed()
    while (span := take_backlog(index, rows, 7) or take_live(index, rows, 7, now)) is not None:
        check(span)
    assert index.unbatched == 0
    in_batches = {s for lo, hi in batches for s in range(lo, hi + 1)}
    assert rows <= in_batches
