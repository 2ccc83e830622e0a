"""``revline edge status``: what the spool says, read-only, safe while the service runs."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revline.edge.spool import DURABLE, PUBLISHED

__all__ = ["SpoolStatus", "format_status", "read_status"]


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


def _meta(db: sqlite3.Connection) -> dict[str, Any]:
    return dict(db.execute("SELECT key, value FROM meta").fetchall())


def read_status(path: str | Path, *, now: float | None = None) -> SpoolStatus:
    """Read the spool without writing to it (SQLite read-only URI)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no spool at {path}")
    now = time.time() if now is None else now
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = _meta(db)
        (samples,) = db.execute("SELECT count(*) FROM samples").fetchone()
        counts = dict(
            db.execute("SELECT state, coalesce(sum(n), 0) FROM batches GROUP BY state").fetchall()
        )
        published = int(counts.get(PUBLISHED, 0))
        durable = int(counts.get(DURABLE, 0))
        # The oldest sample not covered by a PUBACKed batch: walk covered ranges in seq order.
        (cursor,) = db.execute("SELECT min(seq) FROM samples").fetchone()
        oldest_ts: int | None = None
        if cursor is not None:
            for lo, hi in db.execute(
                "SELECT lo, hi FROM batches WHERE state >= ? ORDER BY lo", (PUBLISHED,)
            ):
                if lo > cursor:
                    break
                cursor = max(cursor, hi + 1)
            row = db.execute(
                "SELECT ts, mono FROM samples WHERE seq >= ? ORDER BY seq LIMIT 1", (cursor,)
            ).fetchone()
            if row is not None:
                oldest_ts = row[0]
        (recent,) = db.execute(
            "SELECT coalesce(sum(n), 0) FROM batches WHERE sent_at >= ?", (now - 60,)
        ).fetchone()
        last_ack = meta.get("last_ack_wall")
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
            published_last_minute=int(recent),
            evicted_unsent=int(meta.get("evicted_unsent", 0)),
            evicted_durable=int(meta.get("evicted_durable", 0)),
            next_seq=int(meta.get("next_seq", 0)),
            clock=str(meta.get("clock", "unknown")),
        )
    finally:
        db.close()


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
        ]
    )
