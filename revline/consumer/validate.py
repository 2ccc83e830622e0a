"""Deciding whether one MQTT message is a batch to store or a message to dead-letter. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from revline.contract import Batch, ContractError, decode_batch

__all__ = ["Invalid", "check"]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a message cannot be stored: a stable ``reason`` code and a human ``detail``."""

    reason: str
    detail: str
    batch: Batch | None = None
    """The decoded batch when it was well-formed but refused (``future_timestamp``)."""


def check(payload: bytes, topic: str, *, now_us: int, max_future_us: int) -> Batch | Invalid:
    """The decoded batch, or why it is rejected (contract reasons plus ``future_timestamp``)."""
    try:
        batch = decode_batch(payload, topic)
    except ContractError as exc:
        return Invalid(exc.reason, exc.detail)
    # Samples are not required to be sorted, so look at all of them; this is the only per-sample
    # Python loop on the hot path and costs about as much as one attribute read each.
    newest = max(sample.ts for sample in batch.samples)
    if newest > now_us + max_future_us:
        ahead = (newest - now_us) / 1e6
        return Invalid(
            "future_timestamp",
            f"sample ts {newest} is {ahead:.1f} s ahead of the consumer clock "
            f"(limit {max_future_us / 1e6:.0f} s)",
            batch,
        )
    return batch
