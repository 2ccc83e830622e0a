"""Collecting messages into write batches by size and age. Pure: the caller supplies the clock."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Batcher", "Pending"]

T = TypeVar("T")


@dataclass(slots=True)
class Pending(Generic[T]):
    """Items in arrival order, how many samples they hold and how many bytes they take."""

    items: list[T] = field(default_factory=list)
    samples: int = 0
    opened_at: float = 0.0
    size: int = 0


class Batcher(Generic[T]):
    """Closes a batch when it holds ``max_samples`` samples, ``max_items`` items, ``max_bytes``
    bytes, or is ``max_age`` seconds old, whichever comes first.

    A single item larger than ``max_samples`` or ``max_bytes`` still makes one batch on its own:
    items are never split, because one MQTT message is acked as a whole.
    """

    def __init__(
        self,
        *,
        max_samples: int,
        max_age: float,
        max_items: int = 10_000,
        max_bytes: int = sys.maxsize,
    ) -> None:
        if max_samples < 1 or max_items < 1 or max_bytes < 1 or max_age <= 0:
            raise ValueError("max_samples, max_items, max_bytes must be >= 1 and max_age > 0")
        self.max_samples = max_samples
        self.max_age = max_age
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._open: Pending[T] = Pending()

    def __len__(self) -> int:
        return len(self._open.items)

    @property
    def samples(self) -> int:
        """Samples in the open batch."""
        return self._open.samples

    def add(self, item: T, samples: int, now: float, size: int = 0) -> list[Pending[T]]:
        """Add an item of ``samples`` samples and ``size`` bytes; return the batches this closed,
        in order (usually none, at most two)."""
        if samples < 0 or size < 0:
            raise ValueError("samples and size must be >= 0")
        closed: list[Pending[T]] = []
        opened = self._open
        if opened.items and (
            opened.samples + samples > self.max_samples or opened.size + size > self.max_bytes
        ):
            # Close before adding so that a batch never exceeds max_samples or max_bytes unless
            # a single item does on its own.
            closed.append(self.take())
        if not self._open.items:
            self._open.opened_at = now
        self._open.items.append(item)
        self._open.samples += samples
        self._open.size += size
        if (
            self._open.samples >= self.max_samples
            or len(self._open.items) >= self.max_items
            or self._open.size >= self.max_bytes
        ):
            closed.append(self.take())
        return closed

    def deadline(self) -> float | None:
        """When the open batch is due by age, or None if it is empty."""
        return self._open.opened_at + self.max_age if self._open.items else None

    def due(self, now: float) -> bool:
        """True if the open batch is non-empty and at least ``max_age`` old."""
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self) -> Pending[T]:
        """Close and return the open batch (possibly empty) and start a new one."""
        closed, self._open = self._open, Pending()
        return closed
