"""Gap and coverage policy: pure functions of sequence ranges, no I/O, no clock reads.

A vehicle's stored samples are kept as runs of contiguous sequence numbers, inclusive ranges
``(lo, hi)``, sorted, never overlapping or touching. What a write adds is merged in
(:func:`merge`); the holes between runs are the gaps (:func:`holes`); what the audit task does
with a gap (wait, ask the device again, accept the device's word that it is lost) is decided by
:func:`reconcile` and :func:`requests_due`. ``tests/audit/test_policy.py`` holds them to their
word with hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Final

__all__ = [
    "Gap",
    "GapChanges",
    "Range",
    "Run",
    "covered",
    "holes",
    "merge",
    "reconcile",
    "requests_due",
    "runs",
    "runs_of",
    "size",
    "subtract",
]

Range = tuple[int, int]
"""Inclusive ``(lo, hi)`` of sequence numbers."""

MAX_RANGES_PER_REQUEST: Final = 32
"""Ranges named in one repair command at most (a command stays small; the rest come later)."""


@dataclass(frozen=True, slots=True)
class Run:
    """Stored sequence numbers ``lo..hi`` (all of them) and their samples' time bounds (µs)."""

    lo: int
    hi: int
    ts_min: int
    ts_max: int


def size(ranges: Iterable[Range]) -> int:
    """How many sequence numbers ``ranges`` hold (they must not overlap)."""
    return sum(hi - lo + 1 for lo, hi in ranges)


def runs(pairs: Iterable[tuple[int, int]]) -> tuple[list[Run], int]:
    """The runs of ``(seq, ts)`` pairs, and how many pairs repeat a sequence number already seen
    among them (a message delivered twice within one write)."""
    seqs: list[int] = []
    stamps: list[int] = []
    for seq, ts in pairs:
        seqs.append(seq)
        stamps.append(ts)
    return runs_of(seqs, stamps)


def runs_of(seqs: Sequence[int], stamps: Sequence[int]) -> tuple[list[Run], int]:
    """:func:`runs` of parallel lists of sequence numbers and their timestamps. A write holds one
    run per vehicle nearly always: that case is found with C-speed builtins alone."""
    if not seqs:
        return [], 0
    distinct = sorted(set(seqs))
    repeats = len(seqs) - len(distinct)
    if distinct[-1] - distinct[0] + 1 == len(distinct):
        return [Run(distinct[0], distinct[-1], min(stamps), max(stamps))], repeats
    out: list[Run] = []
    ordered = sorted(zip(seqs, stamps, strict=True))
    lo = hi = ordered[0][0]
    ts_min = ts_max = ordered[0][1]
    for seq, ts in ordered[1:]:
        if seq > hi + 1:
            out.append(Run(lo, hi, ts_min, ts_max))
            lo = hi = seq
            ts_min = ts_max = ts
            continue
        hi = seq
        if ts < ts_min:
            ts_min = ts
        elif ts > ts_max:
            ts_max = ts
    out.append(Run(lo, hi, ts_min, ts_max))
    return out, repeats


def merge(existing: Sequence[Run], new: Sequence[Run]) -> tuple[list[Run], int]:
    """The union of two run lists (each sorted, disjoint), merged where they overlap or touch,
    and how many sequence numbers of ``new`` were already in ``existing`` (duplicates)."""
    overlap = 0
    for run in new:
        overlap += covered(((r.lo, r.hi) for r in existing), run.lo, run.hi)
    out: list[Run] = []
    for run in sorted([*existing, *new], key=lambda r: r.lo):
        if out and run.lo <= out[-1].hi + 1:
            last = out[-1]
            out[-1] = Run(
                last.lo,
                max(last.hi, run.hi),
                min(last.ts_min, run.ts_min),
                max(last.ts_max, run.ts_max),
            )
        else:
            out.append(run)
    return out, overlap


def covered(ranges: Iterable[Range], lo: int, hi: int) -> int:
    """How many of ``lo..hi`` the disjoint ``ranges`` hold."""
    total = 0
    for a, b in ranges:
        start, end = max(a, lo), min(b, hi)
        if start <= end:
            total += end - start + 1
    return total


def holes(ranges: Sequence[Range]) -> list[Range]:
    """The gaps between sorted, disjoint ``ranges``: what is missing between the first stored
    sequence number and the last."""
    out: list[Range] = []
    for (_, hi), (lo, _) in pairwise(ranges):
        if lo > hi + 1:
            out.append((hi + 1, lo - 1))
    return out


def subtract(ranges: Iterable[Range], minus: Iterable[Range]) -> list[Range]:
    """``ranges`` without the sequence numbers of ``minus``, sorted."""
    cuts = sorted(minus)
    out: list[Range] = []
    for lo, hi in sorted(ranges):
        start = lo
        for a, b in cuts:
            if b < start or a > hi:
                continue
            if a > start:
                out.append((start, a - 1))
            start = max(start, b + 1)
            if start > hi:
                break
        if start <= hi:
            out.append((start, hi))
    return out


@dataclass(frozen=True, slots=True)
class Gap:
    """A gap being followed: identified by its vehicle and first sequence number."""

    vin: str
    lo: int
    hi: int
    requests: int = 0
    opened_at: float = 0.0
    """When it was first seen (seconds, the caller's clock)."""
    requested_at: float | None = None


@dataclass(slots=True)
class GapChanges:
    """What :func:`reconcile` decided: new gaps, missing counts, gaps that ended."""

    opened: list[tuple[str, int, int, int]] = field(default_factory=list)
    """``(vin, lo, hi, missing)`` of holes no gap followed yet."""
    missing: list[tuple[str, int, int]] = field(default_factory=list)
    """``(vin, lo, missing)`` of open gaps still (partly) missing."""
    repaired: list[tuple[str, int]] = field(default_factory=list)
    """``(vin, lo)`` of requested gaps now filled."""
    late: list[tuple[str, int]] = field(default_factory=list)
    """``(vin, lo)`` of gaps filled before anyone asked: late delivery, not a loss; forgotten."""
    lost: list[tuple[str, int, str, int]] = field(default_factory=list)
    """``(vin, lo, cause, missing)`` of gaps whose every missing sample the device declared."""


def reconcile(
    gaps: Sequence[Gap],
    now_holes: Mapping[str, Sequence[Range]],
    declared: Mapping[str, Sequence[tuple[int, int, str]]],
) -> GapChanges:
    """Follow the gaps of the vehicles in ``now_holes`` (every vehicle looked at, holes or
    not) given what is missing now and what each device declared lost (``(lo, hi, cause)``).

    A hole no gap covers opens a gap; an open gap with nothing missing any more ended:
    repaired if it had been requested, else it was only late; one whose missing samples are all
    declared lost ends lost with the cause declared for most of them."""
    changes = GapChanges()
    by_vin: dict[str, list[Gap]] = {}
    for gap in gaps:
        by_vin.setdefault(gap.vin, []).append(gap)
    for vin, current in now_holes.items():
        followed = by_vin.get(vin, [])
        for lo, hi in subtract(current, [(g.lo, g.hi) for g in followed]):
            missing_new = [(lo, hi)]
            cause = _declared_cause(missing_new, declared.get(vin, ()))
            if cause is not None:
                changes.lost.append((vin, lo, cause, hi - lo + 1))
                changes.opened.append((vin, lo, hi, hi - lo + 1))
            else:
                changes.opened.append((vin, lo, hi, hi - lo + 1))
        for gap in followed:
            missing = [
                (max(a, gap.lo), min(b, gap.hi)) for a, b in current if a <= gap.hi and b >= gap.lo
            ]
            count = size(missing)
            if count == 0:
                (changes.repaired if gap.requests else changes.late).append((vin, gap.lo))
                continue
            cause = _declared_cause(missing, declared.get(vin, ()))
            if cause is not None:
                changes.lost.append((vin, gap.lo, cause, count))
            else:
                changes.missing.append((vin, gap.lo, count))
    return changes


def _declared_cause(
    missing: Sequence[Range], declared: Sequence[tuple[int, int, str]]
) -> str | None:
    """The cause declared for most of ``missing`` if all of it is declared lost, else None."""
    if not declared:
        return None
    if subtract(missing, [(lo, hi) for lo, hi, _ in declared]):
        return None
    weight: dict[str, int] = {}
    for lo, hi, cause in declared:
        weight[cause] = weight.get(cause, 0) + covered(missing, lo, hi)
    return max(weight, key=lambda c: (weight[c], c))


def requests_due(
    gaps: Sequence[Gap],
    now_holes: Mapping[str, Sequence[Range]],
    *,
    now: float,
    settle_s: float,
    retry_s: float,
    max_requests: int,
    durable_below: Mapping[str, int | None],
    declared: Mapping[str, Sequence[tuple[int, int, str]]],
    max_vehicles: int,
) -> dict[str, list[Range]]:
    """Which missing ranges to ask each device for now, per vehicle.

    Only open gaps seen at least ``settle_s`` ago (a live-first device fills its backlog behind
    the live data: holes come and go), below what the device says is acked end to end
    (``durable_below``: everything under it was acked; None or absent: not known, the age alone
    decides), not declared lost, asked at most ``max_requests`` times, ``retry_s`` apart. At most
    ``max_vehicles`` vehicles and :data:`MAX_RANGES_PER_REQUEST` ranges each, oldest gaps first.
    """
    out: dict[str, list[Range]] = {}
    for gap in sorted(gaps, key=lambda g: (g.opened_at, g.vin, g.lo)):
        if now - gap.opened_at < settle_s or gap.requests >= max_requests:
            continue
        if gap.requested_at is not None and now - gap.requested_at < retry_s:
            continue
        floor = durable_below.get(gap.vin)
        current = now_holes.get(gap.vin, ())
        missing = [
            (max(a, gap.lo), min(b, gap.hi)) for a, b in current if a <= gap.hi and b >= gap.lo
        ]
        if floor is not None:
            missing = [(lo, min(hi, floor - 1)) for lo, hi in missing if lo < floor]
        missing = subtract(missing, [(lo, hi) for lo, hi, _ in declared.get(gap.vin, ())])
        if not missing:
            continue
        if gap.vin not in out and len(out) >= max_vehicles:
            continue
        wanted = out.setdefault(gap.vin, [])
        room = MAX_RANGES_PER_REQUEST - len(wanted)
        wanted.extend(missing[:room])
    return out
