"""Insight: trips, odometer, trouble codes, health and driving events (docs/insight.md).

Pure policies (:mod:`~revline.insight.segment`, :mod:`~revline.insight.episodes`,
:mod:`~revline.insight.odometer`, :mod:`~revline.insight.dtc`) and their thresholds
(:mod:`~revline.insight.thresholds`); :mod:`~revline.insight.store` keeps the tables up to date
from the consumer's writes through the derivation seam (:mod:`revline.storage.derive`).
"""
