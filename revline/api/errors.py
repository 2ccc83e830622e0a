"""The API's one error type: a status, a stable code and a sentence saying why."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

__all__ = ["ApiError", "ErrorBody"]


class ErrorBody(msgspec.Struct):
    """The body of every error response."""

    error: str
    """Stable code, e.g. ``missing_key``, ``forbidden``, ``rate_limited``, ``invalid``."""
    detail: str
    """What was wrong, for a person."""
    ack: dict[str, object] | None = None
    """Ingest only: the end-to-end ack of a batch that decoded but was refused and kept in the
    dead-letter table (sending it again cannot help, so the device may forget it)."""


class ApiError(Exception):
    """Raised by handlers and dependencies; answered as ``status`` with an :class:`ErrorBody`."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        ack: dict[str, object] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.ack = ack

    def body(self) -> ErrorBody:
        """The response body."""
        return ErrorBody(self.error, self.detail, self.ack)
