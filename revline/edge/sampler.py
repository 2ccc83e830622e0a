"""Readings in, spool rows out: timestamps from the clock model, values checked, flushed often.

The sampler never waits for the network. It buffers the readings of one flush interval in memory
and commits them to the spool in one transaction, so a crash loses at most that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from typing import Final

from revline.contract import DTC_PATTERN, EXTRA_KEY_PATTERN, MAX_DTC_CODES
from revline.edge.clock import ClockJump, ClockModel, ClockSource
from revline.edge.reading import Reading
from revline.edge.spool import Spool, SpoolRow, pack_values
from revline.fields import FIELDS
from revline.logs import kv

__all__ = ["FIELD_BOUNDS", "Sampler", "clean_dtc", "clean_values"]

log = logging.getLogger("revline.edge.sampler")


# The contract's own limits (revline.fields), so that a value the consumer would reject (and
# dead-letter with its whole batch) is dropped here, one value at a time.
FIELD_BOUNDS: Final = {field.name: (field.lo, field.hi) for field in FIELDS}
_EXTRA_LIMIT: Final = 1e12
_MAX_EXTRA: Final = 64
_EXTRA_KEY: Final = re.compile(EXTRA_KEY_PATTERN)
_DTC: Final = re.compile(DTC_PATTERN)


def clean_dtc(codes: tuple[str, ...] | None) -> list[str] | None:
    """A trouble-code set as the contract takes it: sorted, unique, only well-formed codes (a
    malformed one would make the whole batch invalid), at most ``MAX_DTC_CODES``."""
    if codes is None:
        return None
    return sorted({code for code in codes if _DTC.fullmatch(code)})[:MAX_DTC_CODES]


def clean_values(
    values: dict[str, float], extra: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Values within the contract's bounds, and the names of those dropped (NaN, out of range)."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for name, value in values.items():
        bounds = FIELD_BOUNDS.get(name)
        if bounds is None or not (bounds[0] <= value <= bounds[1]):  # NaN fails both
            dropped.append(name)
        else:
            kept[name] = value
    kept_extra: dict[str, float] = {}
    for name, value in extra.items():
        # A name the contract refuses would make the whole batch undecodable, never acked.
        ok = _EXTRA_KEY.fullmatch(name) is not None and math.isfinite(value)
        ok = ok and abs(value) <= _EXTRA_LIMIT
        if ok and len(kept_extra) < _MAX_EXTRA:
            kept_extra[name] = value
        else:
            dropped.append(name)
    return kept, kept_extra, dropped


class Sampler:
    """Turns readings into spool rows and commits them every ``flush_interval_s``."""

    def __init__(
        self,
        spool: Spool,
        model: ClockModel,
        clock: ClockSource,
        *,
        flush_interval_s: float = 0.5,
    ) -> None:
        self.spool = spool
        self.model = model
        self.clock = clock
        self.flush_interval_s = flush_interval_s
        self._buffer: list[SpoolRow] = []
        self._fix_pending = False
        self._warned: set[str] = set()
        self.dropped_values = 0
        self.written = 0

    def check_clock(self, gps_wall_us: int | None = None, mono_ns: int | None = None) -> None:
        """Look at the clocks; on first trust, schedule the fix-up of this boot's waiting rows."""
        jump = self.model.observe(
            self.clock.mono_ns() if mono_ns is None else mono_ns,
            self.clock.wall_ns(),
            synchronized=self.clock.synchronized(),
            gps_wall_us=gps_wall_us,
        )
        if jump is not None:
            self._on_jump(jump)

    def _on_jump(self, jump: ClockJump) -> None:
        if jump.first_trust:
            log.info("wall clock trusted", extra=kv(source=self.model.source))
            self._fix_pending = True
        else:
            log.warning(
                "wall clock jumped; timestamps follow it",
                extra=kv(delta_s=jump.delta_us / 1e6, source=self.model.source),
            )
        self.spool.set_meta("clock", f"trusted ({self.model.source})")

    def add(self, reading: Reading) -> None:
        """Stamp one reading and buffer it for the next flush."""
        if reading.wall_us is not None:
            self.check_clock(gps_wall_us=reading.wall_us, mono_ns=reading.mono_ns)
        values, extra, dropped = clean_values(reading.values, reading.extra)
        if dropped:
            self.dropped_values += len(dropped)
            for name in dropped:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("value outside the contract's bounds dropped", extra=kv(field=name))
        dtc = clean_dtc(reading.dtc)
        if not values and not extra and dtc is None:
            return
        ts, trusted = self.model.stamp(reading.mono_ns, self.clock.wall_ns())
        mono_us = None if trusted else reading.mono_ns // 1000
        self._buffer.append((ts, pack_values(values, extra, dtc), mono_us))

    @property
    def buffered(self) -> int:
        """Samples waiting for the next flush."""
        return len(self._buffer)

    async def flush(self) -> None:
        """Commit the buffer to the spool (in a thread: SQLite must not stall the event loop)."""
        rows, self._buffer = self._buffer, []
        if rows:
            await asyncio.to_thread(self.spool.write, rows)
            self.written += len(rows)
        if self._fix_pending and self.model.offset_us is not None:
            fixed = await asyncio.to_thread(self.spool.fix_clock, self.model.offset_us)
            self._fix_pending = False
            if fixed:
                log.info("timestamps fixed after clock sync", extra=kv(samples=fixed))

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Flush every interval and check the clock; a last flush when ``stop`` is set."""
        if not self.model.trusted:
            self.spool.set_meta("clock", "untrusted (waiting for NTP or GPS time)")
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.flush_interval_s)
            self.check_clock()
            await self.flush()
        await self.flush()
