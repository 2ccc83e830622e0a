"""The gap and coverage policy, held to its word with hypothesis (no server)."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from revline.audit.policy import (
    MAX_RANGES_PER_REQUEST,
    Gap,
    Run,
    holes,
    merge,
    reconcile,
    requests_due,
    runs,
    subtract,
)

VIN = "1HGCM82633A004352"
seq_sets = st.sets(st.integers(min_value=0, max_value=300), max_size=120)


def _seqs(ranges: list[Run]) -> set[int]:
    return {s for r in ranges for s in range(r.lo, r.hi + 1)}


def _runs(seqs: set[int]) -> list[Run]:
    return runs((s, 1000 + s) for s in seqs)[0]


@given(st.lists(seq_sets, min_size=1, max_size=6))
def test_merging_writes_in_any_order_stores_their_union_and_counts_each_duplicate(
    writes: list[set[int]],
) -> None:
    """However writes overlap and in whatever order they come, the runs hold their union,
    sorted, disjoint and never touching, and the duplicates are exactly the repeats."""
    stored: list[Run] = []
    seen: set[int] = set()
    for write in writes:
        stored, overlap = merge(stored, _runs(write))
        assert overlap == len(write & seen)
        seen |= write
    assert _seqs(stored) == seen
    for a, b in pairwise(stored):
        assert a.hi + 1 < b.lo
    assert all(r.ts_min == 1000 + r.lo and r.ts_max == 1000 + r.hi for r in stored)


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=80))
def test_runs_count_repeats_within_a_write(seqs: list[int]) -> None:
    """A sequence number twice in one write (a message delivered twice) is one repeat."""
    found, repeats = runs((s, s) for s in seqs)
    assert _seqs(found) == set(seqs)
    assert repeats == len(seqs) - len(set(seqs))


@given(seq_sets)
def test_holes_are_exactly_what_is_missing_between_first_and_last(seqs: set[int]) -> None:
    """The holes are every number between the first and last stored that is not stored."""
    stored = [(r.lo, r.hi) for r in _runs(seqs)]
    missing = {s for lo, hi in holes(stored) for s in range(lo, hi + 1)}
    expected = set(range(min(seqs), max(seqs) + 1)) - seqs if seqs else set()
    assert missing == expected


@given(seq_sets, seq_sets)
def test_subtract_removes_exactly_the_numbers_named(a: set[int], b: set[int]) -> None:
    """subtract() leaves a's numbers that b does not hold."""
    left = subtract([(r.lo, r.hi) for r in _runs(a)], [(r.lo, r.hi) for r in _runs(b)])
    assert {s for lo, hi in left for s in range(lo, hi + 1)} == a - b


def test_a_gap_filled_after_a_request_is_repaired_and_before_one_was_only_late() -> None:
    """Filled holes end repaired when asked for, and are forgotten as late otherwise."""
    gaps = [Gap(VIN, 10, 19, requests=1), Gap(VIN, 30, 39, requests=0)]
    changes = reconcile(gaps, {VIN: []}, {})
    assert changes.repaired == [(VIN, 10)]
    assert changes.late == [(VIN, 30)]


def test_a_hole_opens_a_gap_and_a_declared_one_ends_lost_with_its_cause() -> None:
    """A new hole opens a gap; one whose missing samples are all declared ends lost."""
    holes_now = {VIN: [(5, 9), (50, 59)]}
    changes = reconcile([Gap(VIN, 50, 59)], holes_now, {VIN: [(40, 70, "evicted")]})
    assert changes.opened == [(VIN, 5, 9, 5)]
    assert changes.lost == [(VIN, 50, "evicted", 10)]


def test_requests_wait_for_the_settle_time_stay_below_the_durable_floor_and_skip_declared() -> None:
    """Only gaps old enough, below what the device acked, and not declared lost are asked for."""
    gaps = [Gap(VIN, 10, 19, opened_at=0.0), Gap(VIN, 100, 109, opened_at=0.0)]
    holes_now = {VIN: [(10, 19), (100, 109)]}

    def due(
        gaps: list[Gap],
        now: float,
        floor: dict[str, int | None] | None = None,
        declared: dict[str, list[tuple[int, int, str]]] | None = None,
    ) -> dict[str, list[tuple[int, int]]]:
        return requests_due(
            gaps,
            holes_now,
            now=now,
            settle_s=60.0,
            retry_s=60.0,
            max_requests=3,
            max_vehicles=10,
            durable_below=floor or {},
            declared=declared or {},
        )

    assert due(gaps, 30.0) == {}
    asked = due(gaps, 61.0, {VIN: 105}, {VIN: [(15, 16, "x")]})
    assert asked == {VIN: [(10, 14), (17, 19), (100, 104)]}
    assert due([Gap(VIN, 10, 19, requests=1, opened_at=0.0, requested_at=61.0)], 90.0) == {}
    assert due([Gap(VIN, 10, 19, requests=3, opened_at=0.0, requested_at=0.0)], 999.0) == {}


@given(st.integers(min_value=1, max_value=200))
def test_a_request_names_a_bounded_number_of_ranges(count: int) -> None:
    """However many holes a vehicle has, one command names at most the limit."""
    holes_now = {VIN: [(i * 10, i * 10 + 4) for i in range(count)]}
    gaps = [Gap(VIN, lo, hi) for lo, hi in holes_now[VIN]]
    asked = requests_due(
        gaps,
        holes_now,
        now=1e9,
        settle_s=1,
        retry_s=1,
        max_requests=1,
        max_vehicles=1,
        durable_below={},
        declared={},
    )
    assert len(asked[VIN]) == min(count, MAX_RANGES_PER_REQUEST)


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5), st.booleans()), max_size=8),
    seq_sets,
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 30)), max_size=4),
)
def test_every_followed_gap_ends_in_exactly_one_state_and_every_hole_is_followed(
    spans: list[tuple[int, int, bool]],
    stored: set[int],
    declared_spans: list[tuple[int, int]],
) -> None:
    """Each open gap is still missing, repaired, late or lost (one of them); after the
    changes, every sample missing now belongs to a gap."""
    gaps: list[Gap] = []
    taken: set[int] = set()
    for start, length, asked in spans:
        lo = start * 15
        numbers = set(range(lo, lo + length + 1))
        if numbers & taken:
            continue
        taken |= numbers
        gaps.append(Gap(VIN, lo, lo + length, requests=int(asked)))
    current = holes([(r.lo, r.hi) for r in _runs(stored)])
    declared = [(lo, lo + n, "evicted") for lo, n in declared_spans]
    changes = reconcile(gaps, {VIN: current}, {VIN: declared})
    ended = [lo for _, lo in changes.repaired + changes.late]
    ended += [lo for _, lo, _, _ in changes.lost]
    still = [lo for _, lo, _ in changes.missing]
    opened_lost = {lo for _, lo, _, _ in changes.lost} & {lo for _, lo, _, _ in changes.opened}
    assert sorted(ended + still) == sorted([g.lo for g in gaps] + sorted(opened_lost))
    followed = [(g.lo, g.hi) for g in gaps] + [(lo, hi) for _, lo, hi, _ in changes.opened]
    assert subtract(current, followed) == []
