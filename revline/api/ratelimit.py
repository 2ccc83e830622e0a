"""Per-key rate limits: a token bucket per key, with the clock passed in. Pure.

Each key may make ``burst`` requests at once and ``rate_per_s`` a second on average. A request
that finds the bucket empty is refused with the seconds until a token is back (``Retry-After``).
Buckets live in the server process: with N API processes behind a proxy, a key's limit is N
times this (docs/api.md says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["Buckets", "TokenBucket"]

_MAX_BUCKETS: Final = 100_000
"""Buckets kept at most; past it the fullest (idlest) ones are forgotten, which only forgives."""


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; one request takes one."""

    rate_per_s: float
    burst: int
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one is there (nothing taken)."""
        elapsed = max(0.0, now - self.at)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate_per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class Buckets:
    """One :class:`TokenBucket` per key id."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key_id: str, rate_per_s: float, burst: int, now: float) -> int:
        """0 if the request may go ahead, else whole seconds to wait (at least 1)."""
        bucket = self._buckets.get(key_id)
        if bucket is None or bucket.rate_per_s != rate_per_s or bucket.burst != burst:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[key_id] = TokenBucket(rate_per_s, burst, float(burst), now)
        wait = bucket.take(now)
        return 0 if wait == 0.0 else max(1, math.ceil(wait))

    def _forget_idle(self, now: float) -> None:
        for key_id in [
            k for k, b in self._buckets.items() if b.tokens + (now - b.at) * b.rate_per_s >= b.burst
        ]:
            del self._buckets[key_id]
        if len(self._buckets) >= _MAX_BUCKETS:
            self._buckets.clear()
