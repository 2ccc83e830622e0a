"""What a database error means for Revline: bad data in one message, a database that cannot be
used as configured, or an outage to wait out. Shared by the consumer and ``revline migrate``."""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg

__all__ = [
    "UnusableDatabaseError",
    "connect_problem",
    "describe",
    "is_data_error",
    "sqlstate",
    "unusable_database",
]


# The only database errors that are about the values written, never about the deployment:
# class 22 (data exception: out of range, invalid text, a NUL in a string...), and the integrity
# violations that compare a row's values (unique, check, exclusion) or refuse a too-big value.
# Not 23502 (NOT NULL: a column added without default), 23503 (FOREIGN KEY: rows the deployment
# has not created yet) nor 23001 (RESTRICT): those say the schema expects something we cannot
# send, and waiting for an operator beats dropping data.
_DATA_SQLSTATES: Final = frozenset({"23505", "23514", "23P01", "54000"})
# asyncpg's client-side "invalid input" error; asyncpg.DataError is the server's class 22.
_ClientDataError: Final = asyncpg.exceptions._base.DataError


def is_data_error(exc: BaseException) -> bool:
    """True only for an error about the values written, the one fault that may dead-letter a
    message (and only when that message, written alone, raised it). Everything else is an
    outage: privileges (42501), missing objects (42P01, 42703), read-only after a failover
    (25006), disk or memory (53xxx), shutdowns (57Pxx), connections (08xxx), timeouts, lock and
    serialization failures, internal errors, and any error not known here: retry, ack nothing."""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state.startswith("22") or state in _DATA_SQLSTATES
    # A value asyncpg's binary codecs refuse (an int beyond its column type, a lone surrogate in
    # a string): raised in Python before a byte of it reached the server.
    return isinstance(exc, (OverflowError, UnicodeEncodeError, _ClientDataError))


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a server error, else the exception's type name (e.g. ``OSError``)."""
    return str(getattr(exc, "sqlstate", "") or type(exc).__name__)


def describe(exc: BaseException) -> str:
    """One line for a log or an operator: ``42501: permission denied for table samples``,
    ``ConnectionRefusedError: [Errno 111] ...``; at most 300 characters of message."""
    text = " ".join(str(exc).split())[:300] or repr(exc)
    return f"{sqlstate(exc)}: {text}"


class UnusableDatabaseError(Exception):
    """The database answers but cannot be used as configured, and waiting will not change that:
    it does not exist, the login is refused, or it is not migrated. One line for the operator;
    the consumer stops at start instead of retrying."""


def unusable_database(exc: BaseException) -> UnusableDatabaseError | None:
    """``exc`` (from connecting) as an :class:`UnusableDatabaseError` if waiting cannot cure it:
    no such database, login refused, a malformed URL; else None."""
    state = str(getattr(exc, "sqlstate", "") or "")
    text = " ".join(str(exc).split())
    if state == "3D000":
        return UnusableDatabaseError(f"{text} (SQLSTATE 3D000): check database_url")
    if state.startswith("28"):
        return UnusableDatabaseError(
            f"login refused: {text} (SQLSTATE {state}): check database_url"
        )
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return UnusableDatabaseError(f"database_url: {text}")
    return None


def connect_problem(url: str, *, timeout_s: float = 10.0) -> str | None:
    """Connect to ``url`` once, outside any event loop: None if it answers and lets us in, else
    one line saying why (for tools that check a database before they start work on it)."""

    async def probe() -> None:
        connection = await asyncpg.connect(url, timeout=timeout_s)
        await connection.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        line = unusable_database(exc)
        return str(line) if line is not None else f"database unreachable: {describe(exc)}"
    return None
