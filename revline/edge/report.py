"""What the device says about itself (``status/<vin>``) and does when asked (``cmd/<vin>``).

* **Status.** Every ``status_every_s``, on every connect and after a repair command, the publisher
  sends a :class:`revline.contract.Status`: the spool's backlog and oldest unsent sample, the
  sequence number below which everything was acked end to end, the unsent ranges the spool
  evicted at its size cap (with counts), what was lost to its own crashes, the clock state and
  the software version. Its MQTT last will is the same status with ``online`` false. Not
  retained (the shipped broker refuses retained messages): the consumer stores the latest one.
* **Crashes.** Samples wait in the sampler's memory up to ``flush_interval_s`` before they are
  committed to the spool; a ``kill -9`` or a power cut loses them, and they never got a sequence
  number. :func:`note_start` finds out on the next start (the spool still says ``running``) and
  records a :class:`revline.contract.Crash` whose count is an estimate: the size of the last
  flush before it.
* **Repair.** A :class:`revline.contract.Command` names sequence ranges the database is missing.
  The batches holding them are resent as they are (same ids, same bytes: the database keeps one
  copy) if the spool still has them: durable rows stay until the size cap needs their room
  (:meth:`revline.edge.spool.Spool.enforce_cap` evicts them first, oldest first). What it no
  longer holds is declared ``not_held`` in the next status. Commands are untrusted: one that
  does not decode is dead-lettered by the publisher, and what one may ask for is bounded.

Called from the publisher's thread only (:class:`revline.edge.publisher.Publisher`), except
:func:`note_start` / :func:`note_stop`, which the service calls around it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final

from revline import __version__
from revline.contract import (
    MAX_STATUS_RANGES,
    SCHEMA_VERSION,
    ContractError,
    Crash,
    LossRange,
    Status,
    cmd_topic,
    decode_command,
    encode,
    status_topic,
)
from revline.edge.config import EdgeSettings
from revline.edge.spool import DURABLE, Spool, SpoolReader
from revline.logs import kv

__all__ = ["MAX_REPAIR_BATCHES", "Reporter", "note_start", "note_stop"]

log = logging.getLogger("revline.edge.report")

MAX_REPAIR_BATCHES: Final = 200
"""Batches queued for a repair resend at most; what a command asks beyond it is asked again."""
_MAX_CRASHES: Final = 20


def note_start(spool: Spool) -> Crash | None:
    """Record that the service runs; if it did not stop cleanly last time, record the crash
    (samples lost before they reached the spool: about one flush) and return it."""
    crash = None
    if int(spool.get_meta("running", 0) or 0):
        samples = int(spool.get_meta("last_flush_n", 0) or 0)
        at = float(spool.get_meta("last_flush_wall", 0.0) or 0.0)
        crash = Crash(seq=spool.next_seq, samples=samples, at=max(int(at * 1e6), 0))
        crashes = _crashes(spool)[-(_MAX_CRASHES - 1) :]
        crashes.append(crash)
        spool.set_meta("crashes", json.dumps([[c.seq, c.samples, c.at] for c in crashes]))
        spool.set_meta("crash_lost", int(spool.get_meta("crash_lost", 0) or 0) + samples)
        log.warning(
            "the edge did not stop cleanly last time: samples not yet in the spool were lost",
            extra=kv(estimated=samples, before_seq=crash.seq),
        )
    spool.set_meta("last_flush_n", 0)
    spool.set_meta("running", 1)
    return crash


def note_stop(spool: Spool) -> None:
    """Record a clean stop: everything sampled is in the spool."""
    spool.set_meta("running", 0)


def _crashes(spool: Spool) -> list[Crash]:
    try:
        raw = json.loads(str(spool.get_meta("crashes", "[]")))
        return [Crash(seq=int(a), samples=int(b), at=int(c)) for a, b, c in raw]
    except (ValueError, TypeError):  # written by us; never a reason to stop reporting
        return []


def _short(text: str) -> str:
    """``text`` as a status's short text field takes it (see revline.contract.ShortText)."""
    return "".join(c for c in text if c.isascii() and (c.isalnum() or c in " ._+:()-"))[:60]


def _subtract(lo: int, hi: int, held: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    start = lo
    for a, b in held:
        if b < start:
            continue
        if a > hi:
            break
        if a > start:
            out.append((start, a - 1))
        start = max(start, b + 1)
    if start <= hi:
        out.append((start, hi))
    return out


class Reporter:
    """Builds the status, remembers when it is due, turns commands into resends."""

    def __init__(self, settings: EdgeSettings, spool: Spool) -> None:
        self.vin = settings.vin
        self.spool = spool
        self.topic = status_topic(settings.vin)
        self.cmd_topic = cmd_topic(settings.vin)
        self.every_s = settings.status_every_s
        self._next = 0.0
        self._repairs: dict[int, tuple[int, int]] = {}  # batch id -> (lo, samples)
        self._not_held: list[LossRange] = []
        self.commands = 0
        self.repairs_queued = 0

    def offline(self) -> bytes:
        """The last will: offline, nothing else (the broker sends it when the device vanishes;
        a clean stop sends :meth:`status` with ``online=False`` instead)."""
        return encode(Status(v=SCHEMA_VERSION, vin=self.vin, online=False))

    def connected(self) -> None:
        """A new connection: the status is due at once."""
        self._next = 0.0

    def due(self, now: float) -> bool:
        """Whether to publish the status now (monotonic seconds)."""
        return now >= self._next

    def status(self, now: float, *, online: bool = True) -> bytes:
        """The status as sent; the next one is due ``status_every_s`` after ``now``. A clean
        stop sends it with ``online=False``: the server keeps the backlog left behind."""
        self._next = now + self.every_s
        with SpoolReader(self.spool.path) as reader:
            meta = reader.meta()
            by_state = reader.samples_by_state()
            samples = reader.sample_count()
            oldest = reader.oldest_unsent_ts()
            durable_below = reader.durable_below()
            evicted = reader.evicted_ranges(MAX_STATUS_RANGES)
            next_seq = reader.next_seq()
        crashes = _crashes(self.spool)
        status = Status(
            v=SCHEMA_VERSION,
            vin=self.vin,
            online=online,
            sent_at=time.time_ns() // 1000,
            backlog=max(samples - by_state.get(DURABLE, 0), 0),
            oldest_unsent=oldest,
            next_seq=next_seq,
            durable_below=durable_below,
            evicted=[LossRange(lo, hi, n) for lo, hi, n in evicted],
            evicted_total=int(meta.get("evicted_unsent", 0) or 0),
            not_held=list(self._not_held),
            crashes=crashes,
            crash_lost_total=int(meta.get("crash_lost", 0) or 0),
            clock=_short(str(meta.get("clock", ""))),
            version=__version__,
        )
        return encode(status)

    def command(self, payload: bytes) -> None:
        """Queue the resends a command asks for; ContractError for one to dead-letter."""
        command = decode_command(payload)
        if command.vin != self.vin:
            raise ContractError("vin_mismatch", f"command for {command.vin} on {self.cmd_topic}")
        self.commands += 1
        with SpoolReader(self.spool.path) as reader:
            floor = reader.durable_below()
        not_held: list[LossRange] = []
        for lo, hi in command.resend:
            room = MAX_REPAIR_BATCHES - len(self._repairs)
            if room > 0:
                for batch_id, first, samples, state in self.spool.batches_covering(lo, hi, room):
                    if state == DURABLE and batch_id not in self._repairs:
                        self._repairs[batch_id] = (first, samples)
                        self.repairs_queued += 1
            if lo < floor:  # above it, what is not sent yet is on its way, not lost
                top = min(hi, floor - 1)
                held = self.spool.batch_ranges(lo, top)
                not_held += [LossRange(a, b, b - a + 1) for a, b in _subtract(lo, top, held)]
        if not_held:
            known = {(r.lo, r.hi) for r in self._not_held}
            self._not_held += [r for r in not_held if (r.lo, r.hi) not in known]
            self._not_held = self._not_held[-MAX_STATUS_RANGES:]
            log.warning(
                "asked to resend samples the spool no longer holds",
                extra=kv(ranges=len(not_held), samples=sum(r.samples for r in not_held)),
            )
        self._next = 0.0  # answer with a status: what is not held, at once

    def take_repairs(self) -> list[tuple[int, int, int]]:
        """``(batch id, lo, samples)`` of the batches to resend now; forgotten once taken."""
        taken = [(i, lo, n) for i, (lo, n) in self._repairs.items()]
        self._repairs.clear()
        return taken
