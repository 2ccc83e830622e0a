"""Deciding whether one MQTT message is a batch to store or a message to dead-letter. Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from revline.contract import ContractError
from revline.wire_v2 import AnyBatch, RowBatch, decode_any_rows

__all__ = ["CONSUMER_REASONS", "Invalid", "check"]

CONSUMER_REASONS = ("future_timestamp", "too_old", "duplicate_sample")
"""Reasons added to the contract's for a batch that decoded but cannot be stored as it is."""


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a message cannot be stored: a stable ``reason`` code and a human ``detail``."""

    reason: str
    detail: str
    batch: AnyBatch | None = None
    """The decoded batch when it was well-formed but refused (one of ``CONSUMER_REASONS``): the
    device still gets its end-to-end ack, since sending the same bytes again cannot help."""


def check(
    payload: bytes,
    topic: str,
    *,
    now_us: int,
    max_future_us: int,
    max_age_us: int | None = None,
) -> AnyBatch | Invalid:
    """The decoded batch (v1: a Batch; v2: a RowBatch of staging rows), or why it is rejected.

    Beyond the contract's reasons: ``future_timestamp`` (a sample more than ``max_future_us``
    ahead of ``now_us``), ``too_old`` (a sample more than ``max_age_us`` behind it: retention
    would delete it after it was acked; None checks nothing) and ``duplicate_sample`` (two
    samples with the same ``(ts, seq)``: the cold table would keep one and the other would
    vanish uncounted).
    """
    try:
        batch = decode_any_rows(payload, topic)  # v1 MessagePack, v1 JSON or v2 columns
    except ContractError as exc:
        return Invalid(exc.reason, exc.detail)
    # Samples are not required to be sorted, so look at all of them; these are the only
    # per-sample Python loops on the hot path (a v2 batch has its columns already).
    if isinstance(batch, RowBatch):
        stamps, seqs = batch.ts, batch.seq
    else:
        stamps = [sample.ts for sample in batch.samples]
        seqs = [sample.seq for sample in batch.samples]
    newest = max(stamps)
    if newest > now_us + max_future_us:
        ahead = (newest - now_us) / 1e6
        return Invalid(
            "future_timestamp",
            f"sample ts {newest} is {ahead:.1f} s ahead of the consumer clock "
            f"(limit {max_future_us / 1e6:.0f} s)",
            batch,
        )
    oldest = min(stamps)
    if max_age_us is not None and oldest < now_us - max_age_us:
        behind = (now_us - oldest) / 86_400e6
        return Invalid(
            "too_old",
            f"sample ts {oldest} is {behind:.1f} days behind the consumer clock "
            f"(limit {max_age_us / 86_400e6:.1f} days, inside the raw retention)",
            batch,
        )
    # Distinct sequence numbers (what every device sends) imply distinct identities; a set of
    # ints costs a third of a set of pairs, which is only built when some seq repeats.
    if len(set(seqs)) == len(seqs):
        return batch
    identities = set(zip(stamps, seqs, strict=True))
    if len(identities) != len(seqs):
        counts = Counter(zip(stamps, seqs, strict=True))
        repeated = [identity for identity, n in counts.items() if n > 1]
        return Invalid(
            "duplicate_sample",
            f"{len(seqs) - len(identities)} samples repeat the identity (ts, seq) of "
            f"another sample in the batch: {', '.join(map(str, repeated[:3]))}",
            batch,
        )
    return batch
