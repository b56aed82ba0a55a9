"""JSON log lines in the shape users of the original tool already parse.

    {"fields":{"interface":"172.31.20.216","method":"GET","session_id":2,"type":"request",
     "url":"https://checkip.amazonaws.com:443/"},"level":"info",
     "timestamp":"2021-03-08T16:19:13.807451213Z","message":"outbound request"}

Top-level keys keep that order (fields, level, timestamp, message); fields are sorted by
name as the original's were. Logged through stdlib logging so operators can reroute it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

LOGGER_NAME = "demux_proxy"


def _timestamp(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        if record.exc_info and record.exc_info[1] is not None:
            fields = {**fields, "error": repr(record.exc_info[1])}
        line = {
            "fields": dict(sorted(fields.items())),
            "level": record.levelname.lower(),
            "timestamp": _timestamp(getattr(record, "ns", None) or time.time_ns()),
            "message": record.getMessage(),
        }
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        pairs = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        ts = _timestamp(getattr(record, "ns", None) or time.time_ns())
        text = f"{ts} {record.levelname.lower():5} {record.getMessage()}"
        if pairs:
            text += " " + pairs
        if record.exc_info and record.exc_info[1] is not None:
            text += f" error={record.exc_info[1]!r}"
        return text


def setup(level: str, fmt: str) -> logging.Logger:
    """Configure the `demux_proxy` logger: one line per event on stdout."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with `fields`; the caller's clock is not needed, the record's ns is."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields, "ns": time.time_ns()})
