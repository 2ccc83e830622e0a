"""Who is calling: the API key of a request, checked against ``api_keys``, and its rate limit.

Keys come in ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``), never in a URL (URLs end
up in access logs). Checked keys are cached for ``key_cache_s``; a revocation is pushed to every
server at once (:data:`revline.api.keys.KEYS_CHANNEL`, see :mod:`revline.api.live`). No key is
ever logged or echoed: errors name the key's id at most.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from revline.api.errors import ApiError
from revline.api.keys import Presented, Scopes, digest_matches, parse_key, parse_scopes
from revline.api.ratelimit import Buckets

__all__ = ["Authenticator", "Principal"]

_HOW: Final = "send the key as 'Authorization: Bearer <key>' (revline api-key add makes one)"


@dataclass(frozen=True, slots=True)
class Principal:
    """The key a request was made with."""

    key_id: str
    name: str
    scopes: Scopes

    def require_read(self, vin: str) -> None:
        """403 unless this key may read ``vin``."""
        if not self.scopes.may_read(vin):
            raise ApiError(
                403, "forbidden", f"key {self.key_id} may not read vehicle {vin} (no read:{vin} "
                "or read:* scope)"
            )

    def require_ingest(self, vin: str) -> None:
        """403 unless this key may post ``vin``'s batches."""
        if not self.scopes.may_ingest(vin):
            raise ApiError(
                403, "forbidden", f"key {self.key_id} may not post batches of vehicle {vin} "
                f"(no ingest:{vin} scope)"
            )


@dataclass(frozen=True, slots=True)
class _Known:
    digest: bytes
    principal: Principal
    rate_per_s: float
    burst: int
    revoked: bool
    fetched_at: float


class Authenticator:
    """Checks the key of each request, with a short cache, and takes a token from its bucket."""

    def __init__(
        self,
        pool: Any,
        *,
        rate_per_s: float,
        burst: int,
        cache_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._rate = rate_per_s
        self._burst = burst
        self._cache_s = cache_s
        self._clock = clock
        self._known: dict[str, _Known] = {}
        self.buckets = Buckets()

    def forget(self, key_id: str | None = None) -> None:
        """Drop one key (revoked) or every key (the revocation feed was down) from the cache."""
        if key_id is None:
            self._known.clear()
        else:
            self._known.pop(key_id, None)

    async def check(self, headers: Mapping[str, str]) -> Principal:
        """The principal of a request's headers; 401 (no or bad key) or 429 (over its rate)."""
        presented = _presented(headers)
        now = self._clock()
        known = self._known.get(presented.id)
        if known is None or now - known.fetched_at >= self._cache_s:
            known = await self._fetch(presented.id, now)
        if known is None or not digest_matches(presented, known.digest):
            raise ApiError(401, "unknown_key", f"this key is not known here; {_HOW}")
        if known.revoked:
            raise ApiError(401, "revoked_key", f"key {presented.id} was revoked")
        wait = self.buckets.take(presented.id, known.rate_per_s, known.burst, now)
        if wait:
            raise ApiError(
                429,
                "rate_limited",
                f"key {presented.id} is over its limit of {known.rate_per_s:g} requests/s "
                f"(burst {known.burst}); retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        return known.principal

    async def _fetch(self, key_id: str, now: float) -> _Known | None:
        row = await self._pool.fetchrow(
            "SELECT name, key_hash, scopes, rate_per_s, burst, revoked_at IS NOT NULL AS revoked "
            "FROM api_keys WHERE id = $1",
            key_id,
        )
        if row is None:
            self._known.pop(key_id, None)
            return None
        known = _Known(
            digest=bytes(row["key_hash"]),
            principal=Principal(key_id, row["name"], parse_scopes(row["scopes"])),
            rate_per_s=float(row["rate_per_s"] or self._rate),
            burst=int(row["burst"] or self._burst),
            revoked=bool(row["revoked"]),
            fetched_at=now,
        )
        self._known[key_id] = known
        return known


def _presented(headers: Mapping[str, str]) -> Presented:
    value = headers.get("authorization")
    if value is not None:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "malformed_key", f"Authorization is not 'Bearer <key>'; {_HOW}")
        token = token.strip()
    else:
        token = (headers.get("x-api-key") or "").strip()
        if not token:
            raise ApiError(401, "missing_key", f"no API key in the request; {_HOW}")
    presented = parse_key(token)
    if presented is None:
        raise ApiError(
            401, "malformed_key", f"that is not a Revline API key (rvl_<id>_<secret>); {_HOW}"
        )
    return presented
