"""Log setup shared by every service: logfmt-style lines for people, JSON lines for machines.

Also the two things every long-running process needs to stay readable: :class:`Throttle`, the one
rate limit for a recurring log line (a broker that stays down, a database outage, bad acks), and
:func:`quiet_libraries`, the one place where library noise is silenced (python-OBD's own console
handler, pint's unit redefinitions at import, stamina's line per retry): the service's own line
per event says it once.
"""

from __future__ import annotations

import json as _json
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["Throttle", "ThrottledLog", "kv", "quiet_libraries", "setup_logging"]

_MAX_KEYS = 64
"""Kinds a Throttle tracks at once: kinds are SQLSTATEs and error types, a few, but bounded."""


class Throttle:
    """When to log a recurring event: the first of each kind (``key``) at once, then at most one
    line per ``every_s`` seconds per kind, which reports how many happened since the last one.
    Pure: the caller passes the time (monotonic seconds) and writes the line.
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.total = 0
        """Events counted since the last :meth:`reset` (e.g. failed attempts since a success)."""
        self.held = 0
        """Events since the last :meth:`reset` that did not get a line of their own."""
        self._pending: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def event(self, now: float, key: str = "") -> int:
        """Count one event of kind ``key``; how many events a line should report now (this one
        and those held back since the last line of its kind), or 0 to stay quiet."""
        if key not in self._pending and len(self._pending) >= _MAX_KEYS:
            self._pending.clear()
            self._last.clear()
        self.total += 1
        self._pending[key] = self._pending.get(key, 0) + 1
        count = self.due(now, key)
        if not count:
            self.held += 1
        return count

    def due(self, now: float, key: str = "", *, force: bool = False) -> int:
        """Events of ``key`` held back that a line should report now: once ``every_s`` has passed
        since its last line, or at once with ``force`` (at stop); 0 if none or not yet."""
        count = self._pending.get(key, 0)
        last = self._last.get(key)
        if not count or (not force and last is not None and now - last < self.every_s):
            return 0
        self._pending[key] = 0
        self._last[key] = now
        return count

    def pending(self) -> list[str]:
        """The kinds that have events held back."""
        return [key for key, count in self._pending.items() if count]

    def reset(self) -> int:
        """The trouble is over: forget every kind and count; return how many events were held
        back without a line of their own."""
        held = self.held
        self.total = self.held = 0
        self._pending.clear()
        self._last.clear()
        return held


class ThrottledLog:
    """One log line per ``every_s`` for a recurring event, saying how often it happened: a
    :class:`Throttle` of one kind bound to a logger, a level and a message.

    The first event is logged at once; later ones are counted and reported with the next line,
    which :meth:`tick` also writes once the interval has passed, so a burst's count is never lost.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        message: str,
        *,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.message = message
        self.clock = clock
        self._throttle = Throttle(every_s)
        self.total = 0
        """Events ever counted."""
        self._fields: dict[str, Any] = {}
        self._exc_info: BaseException | None = None

    @property
    def every_s(self) -> float:
        """Seconds between two lines at most."""
        return self._throttle.every_s

    def __call__(self, exc: BaseException | None = None, **fields: Any) -> None:
        """Count one event; log it (with ``fields`` of the latest event) if the interval allows."""
        self.total += 1
        self._fields = fields
        self._exc_info = exc
        self._write(self._throttle.event(self.clock()), forced=False)

    def tick(self, *, force: bool = False) -> None:
        """Write the pending count if the interval has passed since the last line (or ``force``)."""
        self._write(self._throttle.due(self.clock(), force=force), forced=force)

    def _write(self, count: int, *, forced: bool) -> None:
        if not count:
            return
        # A forced line (at stop) reports events that may be long over: say so, or a count of
        # old connection failures reads like a failure happening now.
        message = f"{self.message} (earlier, not reported yet)" if forced else self.message
        fields = kv(count=count, **self._fields)
        self.logger.log(self.level, message, exc_info=self._exc_info, extra=fields)
        self._exc_info = None



def kv(**fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call: ``log.info("batch", extra=kv(samples=500, ms=12.5))``."""
    return {"fields": fields}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, "fields", {})
    return fields


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        for key, value in _fields(record).items():
            text = f"{value:.1f}" if isinstance(value, float) else str(value)
            line += f" {key}={text!r}" if " " in text else f" {key}={text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.dumps(out, default=str)


_CHATTY = ("asyncio", "bleak", "testcontainers", "docker", "urllib3")
"""Libraries kept at warning and above (below debug)."""
_NOISY: dict[str, int] = {
    # python-OBD logs every failed adapter attempt twice (an error and "Cannot load commands")
    # through a console handler of its own: the source's "reconnecting" line says it once.
    "obd": logging.CRITICAL,
    # pint warns that python-OBD redefines 'percent', '%' and 'ppm' at every start.
    "pint": logging.ERROR,
    # stamina logs a warning per scheduled retry; the retrying code logs its own line.
    "stamina": logging.ERROR,
}


def quiet_libraries(level: int | None = None) -> None:
    """Silence library noise (see ``_NOISY``) unless logging at debug. Called by
    :func:`setup_logging`, and again after importing python-OBD, which sets its logger's level
    and adds its own console handler when imported."""
    root = logging.getLogger()
    level = root.level if level is None else level
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.WARNING, level))
    for name, quiet in _NOISY.items():
        logger = logging.getLogger(name)
        # A library's own handler writes its lines a second time, in its own format.
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(level if level <= logging.DEBUG else max(quiet, level))
    if level > logging.DEBUG:
        warnings.filterwarnings("ignore", module=r"pint(\.|$)")


def setup_logging(level: str = "info", *, json: bool = False) -> None:
    """Route all logs to stderr in one format; quiet chatty libraries (:func:`quiet_libraries`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if json else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()
