"""Helpers of the storage tests: TimescaleDB in WASM as a migration Session, and sample makers."""

from __future__ import annotations

import time
from typing import Any

from revline.contract import NUMERIC_FIELDS, Batch, Sample
from revline.tools.pglite import TIMESCALE_DIR, PGliteError, PGliteSession

__all__ = [
    "ROLLUP_COLUMNS",
    "TIMESCALE_DIR",
    "PGliteError",
    "PGliteSession",
    "batch",
    "now_us",
    "sample",
]


ROLLUP_COLUMNS = (
    "vin",
    "bucket",
    "sample_count",
    *(f"{name}_{agg}" for name in NUMERIC_FIELDS for agg in ("avg", "min", "max")),
)
"""The columns of samples_1m / samples_1h in both modes, as dashboards query them."""


def now_us() -> int:
    """Now, in the contract's microseconds since the epoch."""
    return time.time_ns() // 1000


def sample(ts: int, seq: int, **values: Any) -> Sample:
    """A sample at ``ts`` with the given measurements."""
    return Sample(ts=ts, seq=seq, **values)


def batch(vin: str, samples: list[Sample], batch_id: int = 1) -> Batch:
    """A batch of one vehicle."""
    return Batch(v=1, vin=vin, batch=batch_id, samples=samples)
