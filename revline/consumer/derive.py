"""Which derivations the consumer keeps (:mod:`revline.storage.derive` is the seam)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from revline.storage.notify import StateNotify

if TYPE_CHECKING:
    from revline.consumer.config import ConsumerSettings
    from revline.storage.derive import Derivation

__all__ = ["derivations"]


def derivations(settings: ConsumerSettings) -> list[Derivation]:
    """The derivations the consumer keeps, in the order they run in each write, from its
    settings. Each part that derives something (trips, accounting...) registers it here."""
    from revline.insight.store import Insight, InsightMarks  # noqa: PLC0415 - loaded here

    insight = Insight() if settings.insight_fold else InsightMarks()
    return [insight, StateNotify()]  # notify last: listeners re-read what the others wrote
