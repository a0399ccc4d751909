"""Structured logs: one JSON object per line on stderr, written with orjson.

Every record carries ``ts`` (UTC, ISO 8601 with microseconds), ``level``,
``logger`` and ``event`` (the message), plus the fields passed in
``extra={...}``. No key material is ever passed to a logger.

>>> configure("INFO")                                   # doctest: +SKIP
>>> logging.getLogger("citycard.server").info("engine started", extra={"port": 7700})
{"ts":"2026-11-30T07:00:00.000000+00:00","level":"info","logger":"citycard.server","event":"engine started","port":7700}
"""

from __future__ import annotations

import datetime
import logging
import sys

import orjson

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> None:
    """Send every log record to stderr as JSON at ``level`` and above.

    Raises ValueError for an unknown level name.
    """
    name = level.upper()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
