"""``revline edge status``: what the spool says, read-only, safe while the service runs.

The spool's tables are read by :class:`revline.edge.spool.SpoolReader`; this module turns what
it says into a snapshot for people and scripts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from revline.edge.spool import DURABLE, PUBLISHED, DeadLetter, SpoolReader

__all__ = ["SpoolStatus", "format_status", "read_dead_letters", "read_status"]


@dataclass(frozen=True)
class SpoolStatus:
    """A snapshot of the spool for people and scripts."""

    path: str
    size_bytes: int
    samples: int
    unsent: int
    published: int
    durable: int
    oldest_unsent_age_s: float | None
    last_ack_age_s: float | None
    published_last_minute: int
    evicted_unsent: int
    evicted_durable: int
    next_seq: int
    clock: str
    rejected: int = 0
    """Messages refused on ``ack/<vin>`` since the spool was made (dead letters)."""
    rejected_kept: int = 0
    """Of those, still kept with their raw bytes (the newest; see ``read_dead_letters``)."""
    last_rejected_reason: str | None = None
    last_rejected_age_s: float | None = None
    acks_ignored: int = 0
    """Batch ids named by acks that were not trusted (unknown, or not yet PUBACKed)."""
    last_ignored_reason: str | None = None


def read_dead_letters(path: str | Path, *, limit: int = 1000) -> list[DeadLetter]:
    """The dead letters a spool keeps, newest first; read-only, safe while the service runs."""
    with SpoolReader(path) as spool:
        return spool.dead_letters(limit)


def read_status(path: str | Path, *, now: float | None = None) -> SpoolStatus:
    """Read the spool without writing to it (SQLite read-only URI)."""
    path = Path(path)
    now = time.time() if now is None else now
    with SpoolReader(path) as spool:
        meta = spool.meta()
        samples = spool.sample_count()
        by_state = spool.samples_by_state()
        oldest_ts = spool.oldest_unsent_ts()
        recent = spool.published_since(now - 60)
        kept = spool.dead_letters_kept()
    published = by_state.get(PUBLISHED, 0)
    durable = by_state.get(DURABLE, 0)
    last_ack = meta.get("last_ack_wall")
    last_rejected = meta.get("last_rejected_wall")
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    return SpoolStatus(
        path=str(path),
        size_bytes=size,
        samples=samples,
        unsent=samples - published - durable,
        published=published,
        durable=durable,
        oldest_unsent_age_s=None if oldest_ts is None else max(now - oldest_ts / 1e6, 0.0),
        last_ack_age_s=None if last_ack is None else max(now - float(last_ack), 0.0),
        published_last_minute=recent,
        evicted_unsent=int(meta.get("evicted_unsent", 0)),
        evicted_durable=int(meta.get("evicted_durable", 0)),
        next_seq=int(meta.get("next_seq", 0)),
        clock=str(meta.get("clock", "unknown")),
        rejected=int(meta.get("rejected", 0)),
        rejected_kept=kept,
        last_rejected_reason=meta.get("last_rejected_reason"),
        last_rejected_age_s=None if last_rejected is None else max(now - float(last_rejected), 0.0),
        acks_ignored=int(meta.get("acks_ignored", 0)),
        last_ignored_reason=meta.get("last_ignored_reason"),
    )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_status(status: SpoolStatus) -> str:
    """Lines for a terminal."""
    oldest = "none" if status.oldest_unsent_age_s is None else _age(status.oldest_unsent_age_s)
    bad_acks = f"{status.rejected} dead-lettered ({status.rejected_kept} kept)"
    if status.last_rejected_reason is not None:
        bad_acks += f", last {status.last_rejected_reason} {_age(status.last_rejected_age_s)}"
    ignored = f"{status.acks_ignored} batch ids"
    if status.last_ignored_reason is not None:
        ignored += f", last {status.last_ignored_reason}"
    return "\n".join(
        [
            f"spool            {status.path} ({status.size_bytes / 1e6:.1f} MB)",
            f"samples          {status.samples} (next seq {status.next_seq})",
            f"  unsent         {status.unsent}",
            f"  published      {status.published} (PUBACK, waiting for the end-to-end ack)",
            f"  durable        {status.durable} (in the database)",
            f"oldest unsent    {oldest}",
            f"last ack         {_age(status.last_ack_age_s)}",
            f"publish rate     {status.published_last_minute / 60:.1f} samples/s (last minute)",
            f"evicted          {status.evicted_unsent} unsent, {status.evicted_durable} durable",
            f"clock            {status.clock}",
            f"bad acks         {bad_acks}",
            f"ignored acks     {ignored} (unknown, or not yet PUBACKed)",
        ]
    )
