"""API keys: how they look, what they allow, and how they are stored (hashed). Pure, but for the
three small database functions at the end that ``revline api-key`` and the server use.

A key is ``rvl_<id>_<secret>``: ``id`` (12 lower-case letters and digits) names the row of
``api_keys`` (sql/010_api.sql), ``secret`` is 32 random bytes in URL-safe base64. The table keeps
only ``sha256(key)``: a 256-bit random key needs no slow hash, and a stolen table gives no key.
A presented key is checked by looking its id up and comparing hashes in constant time
(:func:`hmac.compare_digest`), so neither a wrong secret nor a wrong id is faster to refuse.

Scopes (:class:`Scopes`): ``read:*`` reads every vehicle, ``read:<VIN>`` reads that one,
``ingest:<VIN>`` posts that vehicle's batches. A key never appears in a log line: everything that
prints a key prints its id (:attr:`Presented.id`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from revline.contract import is_valid_vin

__all__ = [
    "ALL_VEHICLES",
    "KEYS_CHANNEL",
    "KeyRecord",
    "Presented",
    "ScopeError",
    "Scopes",
    "add_key",
    "digest_matches",
    "hash_key",
    "list_keys",
    "make_key",
    "parse_key",
    "parse_scopes",
    "revoke_key",
]

ALL_VEHICLES: Final = "*"
KEYS_CHANNEL: Final = "revline_api_keys"
"""NOTIFY channel: a key was revoked (payload: its id); servers drop it from their cache."""

_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_ID_LEN: Final = 12
_SECRET_BYTES: Final = 32
_KEY_RE: Final = re.compile(r"^rvl_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
_MAX_PRESENTED: Final = 200
"""Longer header values are refused before any work (a key is 61 characters)."""


class ScopeError(ValueError):
    """A scope that is not ``read:*``, ``read:<VIN>`` or ``ingest:<VIN>``."""


@dataclass(frozen=True, slots=True)
class Scopes:
    """What a key may do."""

    read_all: bool = False
    read: frozenset[str] = frozenset()
    """VINs it may read (beside ``read_all``)."""
    ingest: frozenset[str] = frozenset()
    """VINs whose batches it may post."""

    def may_read(self, vin: str) -> bool:
        """Whether this key may read ``vin``'s data."""
        return self.read_all or vin in self.read

    def may_ingest(self, vin: str) -> bool:
        """Whether this key may post ``vin``'s batches."""
        return vin in self.ingest

    @property
    def reads_anything(self) -> bool:
        """Whether any vehicle may be read with this key."""
        return self.read_all or bool(self.read)

    def as_list(self) -> list[str]:
        """The stored form, sorted: ``["ingest:VIN", "read:*", ...]``."""
        found = {f"read:{vin}" for vin in self.read} | {f"ingest:{vin}" for vin in self.ingest}
        if self.read_all:
            found.add(f"read:{ALL_VEHICLES}")
        return sorted(found)


def parse_scopes(texts: Iterable[str]) -> Scopes:
    """:class:`Scopes` from their text form; :class:`ScopeError` names the first bad one."""
    read_all = False
    read: set[str] = set()
    ingest: set[str] = set()
    count = 0
    for text in texts:
        count += 1
        kind, _, target = text.partition(":")
        if kind == "read" and target == ALL_VEHICLES:
            read_all = True
        elif kind in {"read", "ingest"} and is_valid_vin(target):
            (read if kind == "read" else ingest).add(target)
        else:
            raise ScopeError(
                f"scope {text[:80]!r}: expected read:*, read:<VIN> or ingest:<VIN>"
            )
    if count == 0:
        raise ScopeError("a key needs at least one scope")
    return Scopes(read_all, frozenset(read), frozenset(ingest))


@dataclass(frozen=True, slots=True)
class Presented:
    """A key as a client sent it, well-formed: its id and its hash (the key itself is not kept)."""

    id: str
    digest: bytes


def hash_key(key: str) -> bytes:
    """The stored form of a key: SHA-256 of its text."""
    return hashlib.sha256(key.encode("ascii")).digest()


def make_key() -> tuple[str, str]:
    """A new ``(id, key)``; the key is printed once and never stored."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))
    secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode()
    return key_id, f"rvl_{key_id}_{secret}"


def parse_key(text: str) -> Presented | None:
    """The id and hash of a presented key, or None if it cannot be a key at all."""
    if len(text) > _MAX_PRESENTED:
        return None
    match = _KEY_RE.fullmatch(text)
    if match is None:
        return None
    return Presented(match.group(1), hash_key(text))


def digest_matches(presented: Presented, stored: bytes) -> bool:
    """Constant-time comparison of a presented key's hash with the stored one."""
    return hmac.compare_digest(presented.digest, stored)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One row of ``api_keys`` (no hash)."""

    id: str
    name: str
    scopes: Scopes
    rate_per_s: float | None
    burst: int | None
    created_at: datetime
    revoked_at: datetime | None


async def add_key(
    connection: Any,
    name: str,
    scopes: Sequence[str],
    *,
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> tuple[str, str]:
    """Store a new key; returns ``(id, key)``. The key is in no table and no log."""
    parsed = parse_scopes(scopes)
    key_id, key = make_key()
    await connection.execute(
        "INSERT INTO api_keys (id, name, key_hash, scopes, rate_per_s, burst) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        key_id,
        name,
        hash_key(key),
        parsed.as_list(),
        rate_per_s,
        burst,
    )
    return key_id, key


async def list_keys(connection: Any) -> list[KeyRecord]:
    """Every key, oldest first, revoked ones included."""
    rows = await connection.fetch(
        "SELECT id, name, scopes, rate_per_s, burst, created_at, revoked_at FROM api_keys "
        "ORDER BY created_at, id"
    )
    return [
        KeyRecord(
            r["id"], r["name"], parse_scopes(r["scopes"]), r["rate_per_s"], r["burst"],
            r["created_at"], r["revoked_at"],
        )
        for r in rows
    ]


async def revoke_key(connection: Any, key_id: str) -> bool:
    """Revoke a key (kept for the record) and tell running servers; False if no such key."""
    async with connection.transaction():
        status = await connection.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
        )
        revoked: bool = status.split()[-1] != "0"
        if revoked:
            await connection.execute("SELECT pg_notify($1, $2)", KEYS_CHANNEL, key_id)
    return revoked
