"""What a source hands to the sampler: measured values at one monotonic instant.

Sources (OBD over serial/RFCOMM/BLE, GPS, the simulator) know nothing about wall clocks,
sequence numbers or the spool: they yield :class:`Reading` objects stamped with
``time.monotonic_ns()``. The sampler turns each reading into a contract ``Sample`` (time from the
clock model, sequence from the spool) and commits it to the spool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

__all__ = ["Reading", "Source"]


@dataclass(frozen=True, slots=True)
class Reading:
    """Values read together. Keys of ``values`` are ``revline.contract.Sample`` field names
    (``speed``, ``rpm``, ``lat``...); ``extra`` holds any other PID by its python-OBD name."""

    mono_ns: int
    values: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    wall_us: int | None = None
    """A trustworthy UTC time for this instant when the source has one (GPS fix time)."""
    dtc: tuple[str, ...] | None = None
    """The full set of stored and pending trouble codes (``P0301``...), only on the reading taken
    when that set changed since the source last said it (empty: cleared); else None."""


class Source(Protocol):
    """An async context manager that yields readings until closed; reconnects on its own."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def readings(self) -> AsyncIterator[Reading]: ...
