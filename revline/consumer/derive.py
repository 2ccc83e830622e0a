"""Which derivations the consumer keeps (:mod:`revline.storage.derive` is the seam)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from revline.mqtt import parse_mqtt_url
from revline.storage.notify import StateNotify

if TYPE_CHECKING:
    from revline.audit.service import AuditConfig
    from revline.consumer.config import ConsumerSettings
    from revline.storage.derive import Derivation

__all__ = ["derivations"]


def derivations(settings: ConsumerSettings) -> list[Derivation]:
    """The derivations the consumer keeps, in the order they run in each write, from its
    settings. Each part that derives something (trips, accounting...) registers it here."""
    from revline.audit.service import Audit  # noqa: PLC0415 - prometheus, paho: when serving
    from revline.insight.store import Insight, InsightMarks  # noqa: PLC0415 - loaded here

    # Folding beside ingest: one chunk at a time, of 100 vehicles, resting as long as each took,
    # so that a car's fold never holds up the writes (`revline insight fold` has no such limit).
    folds = Insight(chunk=100, workers=1, share=0.5)
    found: list[Derivation] = [folds if settings.insight_fold else InsightMarks()]
    if settings.audit == "on":
        found.append(Audit(_audit_config(settings)))  # revline.audit: loss you can see
    found.append(StateNotify())  # last: live-stream listeners re-read what the others wrote
    return found


def _audit_config(settings: ConsumerSettings) -> AuditConfig:
    """The audit's settings from the consumer's: its own MQTT login (docs/audit.md)."""
    from revline.audit.service import AuditConfig  # noqa: PLC0415

    url = settings.audit_mqtt_url
    if not url and parse_mqtt_url(settings.mqtt_url).username is None:
        url = settings.mqtt_url  # no login, so no client id bound to it: a second client is fine
    return AuditConfig(
        mqtt_url=url,
        client_id=f"{settings.effective_client_id}-audit",
        ca_file=settings.ca_file or None,
        cert_file=settings.cert_file or None,
        key_file=settings.key_file or None,
        every_s=settings.audit_every_s,
        repair_after_s=settings.repair_after_s,
        retry_s=max(settings.repair_after_s, settings.audit_every_s),
    )
