"""Structured logs: one JSON object per line on stderr, written with orjson.

Every record carries ``ts`` (UTC, ISO 8601 with microseconds), ``level``,
``logger`` and ``event`` (the message), plus the fields passed in
``extra={...}``. No key material is ever passed to a logger.

>>> configure("INFO")                                   # doctest: +SKIP
>>> logging.getLogger("citycard.server").info("engine started", extra={"port": 7700})  # doctest: +SKIP
{"ts":"2026-11-30T07:00:00.000000+00:00","level":"info","logger":"citycard.server","event":"engine started","port":7700}
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
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


# Hex digits of a card pseudonym: 64 bits, so that two cards of a city (or of
# ten million) practically never share one, short enough to read in a log.
PSEUDONYM_HEX_DIGITS = 16
_PSEUDONYM_LABEL = b"citycard/v1/log-pseudonym"


class CardPseudonyms:
    """Card uids as they appear in logs: keyed hashes, never the uid.

    The key is derived from the engine's master secret, so the same card has
    the same pseudonym in every log line of a deployment (an SRE can follow
    it), while only someone holding the master secret (the card office) can
    tell which card it is, by computing the pseudonym of a known uid.

    >>> CardPseudonyms(bytes(32))(0x04A1B2C3D4E5F6)
    'card:3f81e5267d67ce5b'
    """

    def __init__(self, master_key: bytes) -> None:
        self._key = hmac.new(master_key, _PSEUDONYM_LABEL, hashlib.sha256).digest()

    def __call__(self, card_uid: int) -> str:
        digest = hmac.new(self._key, card_uid.to_bytes(8, "big", signed=True), hashlib.sha256).hexdigest()
        return "card:" + digest[:PSEUDONYM_HEX_DIGITS]
