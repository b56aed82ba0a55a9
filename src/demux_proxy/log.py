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
whenever requests come one at a time.)

The writes themselves are `_Sink`'s, from a thread of its own: a reader that stops
reading (`start | less`, a stalled journald) fills the pipe and blocks that thread, never
the event loop. What the reader cannot take is held up to `BACKLOG_BYTES`, then dropped
and counted, and a warning line says how many (where they went missing) once the reader
is back. Among forked workers each write is whole lines of at most PIPE_BUF bytes, so
that the kernel keeps them whole in a pipe another worker writes to as well; a longer
line has its longest text fields cut to fit (`EventLog._fit`). Everything else that
logs through stdlib `logging` (our own tracebacks, asyncio's complaints) goes through
`EventHandler` into the same EventLog, so there is one stream, one format, one order.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import stat
import sys
import threading
import time
import traceback
from collections import deque
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
# What a field cut to fit a line in PIPE_BUF keeps at least (see EventLog._fit).
_KEPT: Final = 64
# Held for a reader that does not keep up, then dropped (and counted).
BACKLOG_BYTES: Final = 8 * 1024 * 1024
# How long an exit waits for the reader to take the last lines.
EXIT_WAIT_S: Final = 2.0
# The sink is gone for good: no reader, no descriptor.
_SLOW_READER: Final = "the log's reader did not keep up"
_FATAL_ERRNOS: Final = frozenset({errno.EPIPE, errno.EBADF, errno.EINVAL, errno.ECONNRESET})


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


def _note(text: str) -> None:
    """A word on stderr about the log itself; stderr may be gone too (the same reader)."""
    try:
        print(f"demux-proxy: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass  # nowhere left to say it


class _Sink:
    """Writes batches of lines to a descriptor from a thread of its own (module doc).

    Per process: a fork leaves the child without the thread (and maybe with the lock
    taken by it), so a sink used in another process than its own starts over there:
    a new lock, nothing queued (the parent writes what it had), a thread of its own.
    """

    def __init__(self, fd: int, json: bool) -> None:
        self.fd = fd
        self._json = json
        self._cond = threading.Condition(threading.RLock())  # signal handlers log too
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._busy = False
        self._writer: threading.Thread | None = None
        self.dropped = 0  # lines dropped since the last notice
        self._drop_at = 0  # where in the queue the notice goes (a failed write: first)
        self._drop_cause = _SLOW_READER  # why the first of them was dropped
        self._carry = b""  # the rest of a line a failed write cut: it goes first
        self.broken = False
        self._failing = False  # said once on stderr, until a write succeeds again
        self.piece = 0  # > 0: write whole lines, at most this many bytes at once
        self.stalled = False  # a wait ran out: the reader is not taking lines
        self._pid = os.getpid()

    def _forked(self) -> None:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._cond = threading.Condition(threading.RLock())
            self._queue = deque()
            self._queued = 0
            self._busy = False
            self._writer = None

    def put(self, data: bytes) -> None:
        self._forked()
        with self._cond:
            if self.broken:
                return
            if self._queued + len(data) > BACKLOG_BYTES:
                if not self.dropped:  # the notice goes after what was queued before
                    self._drop_at = len(self._queue)
                    self._drop_cause = _SLOW_READER
                self.dropped += data.count(b"\n")
                return
            self._queue.append(data)
            self._queued += len(data)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._run, name="demux-proxy-log", daemon=True
                )
                self._writer.start()
            self._cond.notify()

    def wait(self, timeout: float) -> bool:
        """Until everything put is written (or given up on); False after `timeout`."""
        self._forked()
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.stalled and (self._queue or self._busy):
                return False  # a wait already ran out: an exit waits once, not per call
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._writer is None or not self._writer.is_alive():
                    self.stalled = True
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                self._queued = 0
                dropped, self.dropped = self.dropped, 0
                at, self._drop_at = self._drop_at, 0
                cause = self._drop_cause
                self._busy = True
            try:
                notice_at = -1  # where the notice starts in what is written
                if dropped:  # in order: where the first line went missing
                    notice_at = sum(map(len, batch[:at]))
                    batch[at:at] = [self._dropped_line(dropped, cause)]
                self._write(b"".join(batch), notice_at, dropped)
            finally:
                with self._cond:
                    self._busy = False
                    if not self._queue:
                        self.stalled = False
                    self._cond.notify_all()
            if self.broken:
                return

    def _dropped_line(self, dropped: int, cause: str) -> bytes:
        message = f"log lines dropped: {cause}"
        if not self._json:
            stamp = _Clock().stamp(time.time_ns())
            return f"{stamp} warning {message} dropped={dropped}\n".encode()
        record = {
            "fields": {"dropped": dropped},
            "level": "warning",
            "timestamp": _Clock().stamp(time.time_ns()),
            "message": message,
        }
        return _dumps(record) + b"\n"

    def _write(self, data: bytes, notice_at: int = -1, noticed: int = 0) -> None:
        """Write `data`; the notice of `noticed` dropped lines starts at `notice_at`."""
        carried = len(self._carry)
        if carried:  # a line begun before a failure ends before anything else
            data, self._carry = self._carry + data, b""
            notice_at += carried if notice_at >= 0 else 0
        done = 0  # of `data`, the bytes written
        for piece in self._pieces(data):
            while piece:
                try:
                    n = os.write(self.fd, piece)
                except BlockingIOError:  # someone set O_NONBLOCK on the shared pipe
                    select.select([], [self.fd], [], 1.0)
                    continue
                except OSError as exc:
                    if exc.errno in _FATAL_ERRNOS:
                        self.broken = True  # stdout closed, its reader gone
                        _note(f"logging stopped: {exc}")
                        return
                    lost_from = self._failed(data, done, carried, exc)
                    if notice_at >= 0 and lost_from <= notice_at:  # the notice is lost too:
                        with self._cond:  # its count stands, not one line for it
                            self.dropped += noticed - 1
                    return
                piece = piece[n:]
                done += n
        self._failing = False

    def _failed(self, data: bytes, done: int, carried: int, exc: OSError) -> int:
        """A full disk, an I/O error: the rest of this batch is lost, the next may pass;
        where in `data` the lost lines start.

        A line the kernel took part of is finished first thing next time: the file would
        hold half of it glued to the next line otherwise, two lines that are not JSON.
        """
        rest = done
        if done < carried or (done > 0 and data[done - 1 : done] != b"\n"):
            rest = data.find(b"\n", done) + 1 or len(data)
            self._carry = data[done:rest]
        with self._cond:
            if not self.dropped:
                self._drop_cause = f"writing the log failed: {exc.strerror or exc}"
            self.dropped += data.count(b"\n", rest)
        if not self._failing:
            self._failing = True
            _note(f"log write failed, lines dropped until it works again: {exc}")
        return rest

    def _pieces(self, data: bytes) -> list[bytes]:
        """`data` as one piece, or as whole lines of at most `piece` bytes each (a line
        longer than that alone)."""
        limit = self.piece
        if not limit or len(data) <= limit:
            return [data]
        pieces: list[bytes] = []
        start = 0
        while start < len(data):
            end = start + limit
            if end >= len(data):
                end = len(data)
            else:
                cut = data.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else data.find(b"\n", end) + 1 or len(data)
            pieces.append(data[start:end])
            start = end
        return pieces


class EventLog:
    def __init__(self, level: int = INFO, fmt: str = "json", fd: int | None = None) -> None:
        self.level = level
        self._json = fmt == "json"
        self._sink = _Sink(sys.stdout.fileno() if fd is None else fd, self._json)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False  # a flush is due within FLUSH_S
        self._clock = _Clock()
        self._tails: dict[str, bytes] = {}  # message -> b'Z","message":"...","}\n'

    def share(self) -> None:
        """Forked workers will write to the same descriptor: write whole lines, at most
        PIPE_BUF bytes at once, where the kernel keeps such writes whole (a pipe, a
        socket); a regular file keeps every write whole already."""
        try:
            regular = stat.S_ISREG(os.fstat(self._sink.fd).st_mode)
        except OSError:
            regular = False
        if not regular:
            self._sink.piece = select.PIPE_BUF

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def emit(
        self, level: int, message: str, fields: dict[str, Any], *, in_order: bool = False
    ) -> None:
        """One line. `in_order`: the caller built `fields` with its keys in sorted order
        (the two lines of every request do), which spares sorting them again."""
        if level < self.level:
            return
        line = self._format(level, message, fields, in_order)
        if self._sink.piece and len(line) > self._sink.piece:
            line = self._fit(level, message, fields)
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                loop = _running_loop()
            except RuntimeError:
                # No loop (start, shutdown, the supervisor): written at once, in order
                # with what the process writes next (its error on stderr, an exit),
                # unless the reader is known not to be taking lines.
                self.flush(0.0 if self._sink.stalled else EXIT_WAIT_S)
                return
            self._scheduled = True
            loop.call_later(FLUSH_S, self.flush)

    def _format(self, level: int, message: str, fields: dict[str, Any], in_order: bool) -> bytes:
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
            return b"".join(
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
        stamp = self._clock.stamp(time.time_ns())
        name = _LEVEL_NAMES.get(level, "info")
        if not message.isprintable():  # a traceback's lines: one physical line still
            message = _dumps(message).decode()
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in sorted(fields.items()))
        return f"{stamp} {name:7} {message} {pairs}".rstrip().encode() + b"\n"

    def _fit(self, level: int, message: str, fields: dict[str, Any]) -> bytes:
        """A line for a shared stdout that is longer than the kernel keeps whole (another
        worker's write could land inside it): its longest text fields are cut short,
        ending in "...", and named in `truncated`. Rare: a URL of some KiB."""
        limit = self._sink.piece
        fitted = dict(fields)
        cut: list[str] = []
        line = self._format(level, message, fitted, False)
        while len(line) > limit:
            # Values longer than a cut one: each pass shortens one, so this ends.
            texts = [k for k, v in fitted.items() if isinstance(v, str) and len(v) > _KEPT + 3]
            if not texts:
                break  # nothing left to shorten: written as it is
            key = max(texts, key=lambda k: len(fitted[k]))
            value: str = fitted[key]
            keep = max(_KEPT, len(value) - (len(line) - limit) - 64)
            fitted[key] = value[:keep] + "..."
            if key not in cut:
                cut.append(key)
            fitted["truncated"] = cut
            line = self._format(level, message, fitted, False)
        return line

    def flush(self, wait: float = 0.0) -> bool:
        """Hand everything pending to the writer (a timer left armed only flushes again);
        with `wait`, also wait that long for it to be written (before an exit, a fork).
        False when it was not all written in time."""
        self._scheduled = False
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._sink.put(data)
        return self._sink.wait(wait) if wait > 0 else True

    def wait_written(self, timeout: float) -> bool:
        """Wait until what was handed to the writer is written; False after `timeout`."""
        return self._sink.wait(timeout)

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
