"""HTTP ingest: a posted batch goes the consumer's way, and the answer is its end-to-end ack.

``POST /v1/vehicles/{vin}/batches`` is MQTT's ``telemetry/<vin>`` over HTTP: the body is decoded
and checked by the consumer's own :func:`revline.consumer.pipeline.classify` (v1 MessagePack or
JSON, v2 columns; size, VIN, bounds, clock) and written by its :class:`Writer` with its
derivations (live notifications, trips...), in one transaction. The outcomes:

- committed: 200, the body is the :class:`~revline.contract.Ack` naming the batch (a resend of a
  stored batch inserts nothing and is acked again: idempotent);
- the message's own fault: 4xx, and it is dead-lettered in ``rejected`` with its raw bytes,
  topic ``telemetry/<vin>``, as the consumer would (a batch that decoded but was refused, such as
  a future timestamp, carries its ack in the error body, as the consumer acks it on MQTT);
- the deployment's fault (database down, a privilege missing, a timeout): 503 with
  ``Retry-After``, nothing written, nothing dead-lettered. Retrying is always safe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final, NoReturn

from revline.api.errors import ApiError
from revline.consumer.pipeline import Fault, classify, dead_letter, fault
from revline.consumer.subscriber import Inbound
from revline.consumer.writer import Rejected, Writer
from revline.contract import SCHEMA_VERSION, Ack, ContractError, telemetry_topic
from revline.logs import kv
from revline.storage.errors import describe
from revline.wire_v2 import AnyBatch

__all__ = ["Ingest", "Outcome"]

log = logging.getLogger("revline.api.ingest")

_STATUS: Final = {
    "too_large": 413,
    "unsupported_version": 415,
    "vin_mismatch": 409,
    "undecodable": 400,
    "invalid": 422,
    "future_timestamp": 422,
    "too_old": 422,
    "duplicate_sample": 422,
    "db_error": 422,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """A committed batch: its ack, and how many of its samples were new."""

    ack: Ack
    samples: int
    inserted: int


class Ingest:
    """The consumer's validation and writer behind an HTTP handler."""

    def __init__(
        self, writer: Writer, *, max_future_s: float, max_age_s: float, retry_after_s: int
    ) -> None:
        self.writer = writer
        self._max_future_us = int(max_future_s * 1e6)
        self._max_age_us = int(max_age_s * 1e6)
        self._retry_after = str(retry_after_s)

    def _unavailable(self, exc: BaseException, what: str) -> ApiError:
        log.warning(
            "ingest: database unavailable; answered 503", extra=kv(what=what, error=describe(exc))
        )
        return ApiError(
            503,
            "unavailable",
            "the database cannot take the batch now; nothing was stored, send it again later",
            headers={"Retry-After": self._retry_after},
        )

    async def post(self, vin: str, payload: bytes) -> Outcome:
        """Store one posted batch; its :class:`Outcome`, or an :class:`ApiError` to answer."""
        try:
            topic = telemetry_topic(vin)
        except ContractError as exc:
            raise ApiError(404, "bad_vin", exc.detail) from None
        inbound = Inbound(
            mid=0, qos=1, topic=topic, payload=payload, received_at=time.time(), generation=0
        )
        item = classify(
            inbound,
            now_us=time.time_ns() // 1000,
            max_future_us=self._max_future_us,
            max_age_us=self._max_age_us,
        )
        if item.rejected is not None:
            await self._dead_letter(item.rejected, item.batch)
        assert item.batch is not None  # classify: a batch, or a dead letter
        batch = item.batch
        try:
            result = await self.writer.write([batch])
        except Exception as exc:  # noqa: BLE001 - judged: an outage, or the batch's values
            if fault(exc) is Fault.OUTAGE:
                raise self._unavailable(exc, "write") from None
            # The database refused the values: dead-letter only if a plain write works now
            # (the consumer's probe rule), else it is the deployment's fault.
            try:
                await self.writer.probe()
            except Exception as probe_exc:  # noqa: BLE001 - any failure: an outage
                raise self._unavailable(probe_exc, "probe") from None
            await self._dead_letter(_db_error(inbound, exc), batch)
        return Outcome(_ack(batch), result.samples, result.inserted)

    async def _dead_letter(self, rejected: Rejected, batch: AnyBatch | None) -> NoReturn:
        """Keep the refused message, then answer 4xx (503 if it cannot be kept)."""
        try:
            await self.writer.reject([rejected])
        except Exception as exc:  # noqa: BLE001 - keeping it failed: an outage, not a 4xx
            raise self._unavailable(exc, "dead letter") from None
        log.info(
            "ingest: batch rejected",
            extra=kv(topic=rejected.topic, reason=rejected.reason, detail=rejected.detail[:200]),
        )
        ack = msgspec_ack(batch) if batch is not None else None
        raise ApiError(
            _STATUS.get(rejected.reason, 400), rejected.reason, rejected.detail, ack=ack
        )


def _ack(batch: AnyBatch) -> Ack:
    return Ack(v=SCHEMA_VERSION, vin=batch.vin, batches=[batch.batch])


def msgspec_ack(batch: AnyBatch) -> dict[str, object]:
    """The ack of ``batch`` as a plain mapping (an error body's ``ack``)."""
    return {"v": SCHEMA_VERSION, "vin": batch.vin, "batches": [batch.batch]}


def _db_error(inbound: Inbound, exc: BaseException) -> Rejected:
    detail = describe(exc)
    if getattr(exc, "sqlstate", None):
        detail = f"SQLSTATE {detail}"
    return dead_letter(inbound, "db_error", detail)
