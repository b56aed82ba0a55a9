"""JSON log lines in the shape users of the original tool already parse.

    {"fields":{"interface":"172.31.20.216","method":"GET","session_id":2,"type":"request",
     "url":"https://checkip.amazonaws.com:443/"},"level":"info",
     "timestamp":"2021-03-08T16:19:13.807451213Z","message":"outbound request"}

Top-level keys keep that order (fields, level, timestamp, message); fields are sorted by
name as the original's were.

Two lines per request sit on the hot path, so `EventLog` formats them with orjson
directly (no LogRecord) and batches the writes, in order: a line reaches stdout at most
`FLUSH_S` after it was emitted, or as soon as `FLUSH_BYTES` are pending, and everything
pending is written at shutdown. (A write per loop iteration was a write per request
whenever requests come one at a time.) Everything else that
logs through stdlib `logging` (our own tracebacks, asyncio's complaints) goes through
`EventHandler` into the same EventLog, so there is one stream, one format, one order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from typing import Any, Final

import orjson

LOGGER_NAME: Final = "demux_proxy"
# stdlib logging's numbers, as literals: Final constants are compiled in where used
# (the modules of the request path are compiled, see setup.py), not looked up per call.
DEBUG: Final = 10
INFO: Final = 20
WARNING: Final = 30
ERROR: Final = 40
assert (DEBUG, INFO, WARNING, ERROR) == (
    logging.DEBUG,
    logging.INFO,
    logging.WARNING,
    logging.ERROR,
)
_dumps: Final = orjson.dumps
_SORT_KEYS: Final = orjson.OPT_SORT_KEYS
_time_ns: Final = time.time_ns
_NS: Final = 1_000_000_000
_running_loop: Final = asyncio.get_running_loop
_str: Final = str
_LEVEL_NAMES: Final = {
    DEBUG: "debug",
    INFO: "info",
    WARNING: "warning",
    ERROR: "error",
    50: "critical",
}


# The constant parts of a JSON line, encoded once: per level, and per message text (our
# messages are a few constants; others, from stdlib logging, are encoded each time).
_LEVEL_JSON: Final = {
    level: b',"level":"' + name.encode() + b'","timestamp":"'
    for level, name in _LEVEL_NAMES.items()
}
_MESSAGE_CACHE_MAX: Final = 256
# At most this late, or this much at once: one write() per 64 KiB of lines under load.
FLUSH_S: Final = 0.05
FLUSH_BYTES: Final = 64 * 1024


class _Clock:
    """RFC 3339 timestamps with nanoseconds, the strftime part cached per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def prefix(self, second: int) -> bytes:
        """b"YYYY-MM-DDTHH:MM:SS" of `second`: the caller appends ".%09dZ"."""
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return self._prefix

    def stamp(self, ns: int) -> str:
        second = ns // _NS
        return f"{self.prefix(second).decode()}.{ns - second * _NS:09d}Z"


class EventLog:
    def __init__(self, level: int = INFO, fmt: str = "json", fd: int | None = None) -> None:
        self.level = level
        self._json = fmt == "json"
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False  # a flush is due within FLUSH_S
        self._clock = _Clock()
        self._broken = False
        self._tails: dict[str, bytes] = {}  # message -> b'Z","message":"...","}\n'

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def emit(
        self, level: int, message: str, fields: dict[str, Any], *, in_order: bool = False
    ) -> None:
        """One line. `in_order`: the caller built `fields` with its keys in sorted order
        (the two lines of every request do), which spares sorting them again."""
        if level < self.level or self._broken:
            return
        if self._json:
            # Spliced by hand: fields sorted, the top level in the original's order, the
            # constant parts encoded once (two lines per request: this is the hot path).
            ns = _time_ns()
            second = ns // _NS
            # ".%09d" of the nanoseconds: "1" and nine digits, the "1" cut off (a bytes
            # %-format costs four times as much, and this runs twice per request).
            nanos = str(_NS + ns % _NS).encode()
            tail = self._tails.get(message)
            if tail is None:
                tail = b'Z","message":' + _dumps(message) + b"}\n"
                if len(self._tails) < _MESSAGE_CACHE_MAX:
                    self._tails[message] = tail
            level_json = _LEVEL_JSON.get(level)
            line = b"".join(
                (
                    b'{"fields":',
                    _dumps(fields, _str) if in_order else _dumps(fields, _str, _SORT_KEYS),
                    level_json if level_json is not None else _LEVEL_JSON[INFO],
                    self._clock.prefix(second),
                    b".",
                    nanos[1:],
                    tail,
                )
            )
        else:
            stamp = self._clock.stamp(time.time_ns())
            name = _LEVEL_NAMES.get(level, "info")
            pairs = " ".join(f"{k}={_text_value(v)}" for k, v in sorted(fields.items()))
            line = f"{stamp} {name:7} {message} {pairs}".rstrip().encode() + b"\n"
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                loop = _running_loop()
            except RuntimeError:
                self.flush()  # no loop (start, shutdown, the supervisor): at once
                return
            self._scheduled = True
            loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Write everything pending now (a timer left armed only flushes again)."""
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            # Nowhere to log to (stdout closed): say so once on stderr and keep proxying.
            self._broken = True
            print(f"demux-proxy: logging stopped: {exc}", file=sys.stderr)

    def debug(self, message: str, **fields: Any) -> None:
        self.emit(DEBUG, message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self.emit(INFO, message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self.emit(WARNING, message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self.emit(ERROR, message, fields)


def _text_value(value: Any) -> str:
    """A value for `--log-format text`: as it is when it is one plain word, else quoted
    as a JSON string (logfmt's rule), so that `key=value` pairs always split back. A list
    is its items joined by commas (egress=127.0.0.2,127.0.0.3), a mapping its JSON."""
    if isinstance(value, list | tuple):
        text = ",".join(_str(item) for item in value)
    elif isinstance(value, dict):
        text = _dumps(value, _str).decode()
    else:
        text = _str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return _dumps(text).decode()


class EventHandler(logging.Handler):
    """stdlib logging into the EventLog: same stream, same shape, tracebacks as a field."""

    def __init__(self, events: EventLog) -> None:
        super().__init__()
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
        if record.name != LOGGER_NAME:
            fields["logger"] = record.name
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
            fields["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        self._events.emit(record.levelno, record.getMessage(), fields)


def setup(level: str, fmt: str) -> EventLog:
    """The EventLog for stdout, with stdlib logging (ours and asyncio's) routed into it."""
    events = EventLog(logging.getLevelName(level.upper()), fmt)
    handler = EventHandler(events)
    for name in (LOGGER_NAME, "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(events.level)
        logger.propagate = False
    # What Python reports as "Exception ignored in ..." (one client's undecodable SNI
    # name, in the ssl module's callback) goes to the same log, not raw to stderr.
    sys.unraisablehook = lambda raised: events.warning(
        "exception ignored",
        error=repr(raised.exc_value),
        where=str(raised.err_msg or "")[:200],
    )
    return events
