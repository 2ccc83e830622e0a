"""Log setup shared by every service: logfmt-style lines for people, JSON lines for machines."""

from __future__ import annotations

import json as _json
import logging
import time
from typing import Any

__all__ = ["kv", "setup_logging"]



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


def setup_logging(level: str = "info", *, json: bool = False) -> None:
    """Route all logs to stderr in one format; quiet chatty libraries below warning."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if json else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio", "obd", "bleak", "testcontainers", "docker", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
