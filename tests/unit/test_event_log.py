"""log.EventLog batching: lines reach the file in order, at most FLUSH_S late, and at
once when FLUSH_BYTES are pending or no event loop runs; a reader that stops reading
never blocks the loop, and what it misses is counted. A real pipe, a real loop."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import resource
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import uvloop

from demux_proxy import log


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    # Room for more than one full batch: nothing reads while a test writes.
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4 * log.FLUSH_BYTES)
    os.set_blocking(r, False)
    os.set_blocking(w, True)
    yield r, w
    os.close(r)
    os.close(w)


def _read(fd: int) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in _read_bytes(fd).splitlines()]


def _read_bytes(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_lines_wait_for_the_batch_then_arrive_in_order(pipe: tuple[int, int]) -> None:
    r, w = pipe
    events = log.EventLog(fd=w)

    async def main() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        for i in range(3):
            events.emit(log.INFO, "inbound response", {"session_id": i}, in_order=True)
        events.warning("a warning", n=1)
        for _ in range(3):
            await asyncio.sleep(0)  # loop iterations pass: the lines are still held
        at_once = _read(r)
        await asyncio.sleep(log.FLUSH_S * 3)
        return at_once, _read(r)

    at_once, later = uvloop.run(main())
    assert at_once == []
    assert [line["message"] for line in later] == ["inbound response"] * 3 + ["a warning"]
    assert [line["fields"] for line in later] == [
        {"session_id": 0},
        {"session_id": 1},
        {"session_id": 2},
        {"n": 1},
    ]
    assert later[3]["level"] == "warning"


def test_a_full_batch_is_written_without_waiting(pipe: tuple[int, int]) -> None:
    r, w = pipe
    events = log.EventLog(fd=w)
    url = "https://example.test/" + "x" * 1000
    count = 2 * log.FLUSH_BYTES // 1000

    async def main() -> tuple[bytes, bytes]:
        for i in range(count):
            events.emit(log.INFO, "outbound request", {"session_id": i, "url": url}, in_order=True)
        assert events.wait_written(5)  # the writer's thread: no await, the timer not run
        at_once = _read_bytes(r)
        await asyncio.sleep(log.FLUSH_S * 3)
        return at_once, _read_bytes(r)

    at_once, later = uvloop.run(main())
    # Each time the pending lines reached FLUSH_BYTES they were written; only the
    # lines after the last such batch waited for the timer.
    assert len(at_once) >= log.FLUSH_BYTES
    assert 0 < len(later) < log.FLUSH_BYTES
    ids = [orjson.loads(line)["fields"]["session_id"] for line in (at_once + later).splitlines()]
    assert ids == list(range(count))


def test_without_a_loop_each_line_is_written_at_once(pipe: tuple[int, int]) -> None:
    r, w = pipe
    events = log.EventLog(fd=w)
    events.info("Starting Proxy", workers=1)
    assert [line["message"] for line in _read(r)] == ["Starting Proxy"]


def test_flush_writes_what_is_pending_before_the_timer(pipe: tuple[int, int]) -> None:
    """Shutdown's flush: nothing pending is left for a timer that will never run."""
    r, w = pipe
    events = log.EventLog(fd=w)

    async def main() -> None:
        events.info("Proxy stopped", worker=0)
        assert events.flush(log.EXIT_WAIT_S)

    uvloop.run(main())  # the loop is gone: its timer never fires
    assert [line["message"] for line in _read(r)] == ["Proxy stopped"]
    events.info("after the loop")
    assert [line["message"] for line in _read(r)] == ["after the loop"]


def test_text_lines_split_back_into_their_fields(pipe: tuple[int, int]) -> None:
    """--log-format text: a value with spaces, quotes or '=' is quoted (logfmt's rule),
    so every line splits back into exactly the fields it was given."""
    import json
    import os
    import re

    r, w = pipe
    events = log.EventLog(fmt="text", fd=w)
    fields = {
        "error": 'connection reset by 10.0.0.1:80 "peer"',
        "method": "GET",
        "url": "http://a.test/?x=1&y=two words",
        "status_code": 502,
        "empty": "",
        "backslash": "a\\b",
    }
    events.warning("inbound response", **fields)
    line = os.read(r, 65536).decode().rstrip("\n")
    pairs = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
    back = {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}
    assert back == {k: str(v) for k, v in fields.items()}, line
    assert "method=GET" in line and "status_code=502" in line  # plain words stay bare
    # A message of several lines (asyncio's "Task exception was never retrieved" and
    # its traceback) stays one physical line: quoted.
    events.error("first\nsecond", n=1)
    line = os.read(r, 65536).decode()
    assert line.count("\n") == 1 and ' error   "first\\nsecond" n=1' in line, line


def test_text_lines_show_lists_and_mappings_as_a_user_writes_them(
    pipe: tuple[int, int],
) -> None:
    """They read "['127.0.0.2', '127.0.0.3']", Python's repr."""
    import os

    r, w = pipe
    events = log.EventLog(fmt="text", fd=w)
    events.info("Starting Proxy", egress=["127.0.0.2", "::1"], limits={"burst": 2})
    line = os.read(r, 65536).decode().rstrip("\n")
    assert line.endswith(' egress=127.0.0.2,::1 limits="{\\"burst\\":2}"'), line


def _small_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # the kernel's least
    os.set_blocking(r, False)
    return r, w


def test_a_reader_that_stops_reading_never_blocks_the_loop() -> None:
    """Nobody reads the pipe (`start | less`, a stalled journald): the loop went on
    writing into it and froze, every client with it, and SIGTERM too. Now the loop runs
    on; the lines past BACKLOG_BYTES are dropped, and said so once the reader is back."""
    r, w = _small_pipe()
    events = log.EventLog(fd=w)
    line_fields = {"session_id": 0, "url": "https://example.test/" + "x" * 200}
    count = 2 * log.BACKLOG_BYTES // 250

    async def main() -> float:
        loop = asyncio.get_running_loop()
        worst = 0.0
        for i in range(count):
            events.emit(log.INFO, "outbound request", {"i": i, **line_fields})
            if not i % 2000:
                started = loop.time()
                await asyncio.sleep(0)
                worst = max(worst, loop.time() - started)
        events.flush()
        return worst

    try:
        worst = uvloop.run(main())
        assert worst < 0.5, f"the loop waited {worst:.2f} s on the log"
        assert not events.wait_written(0.2)  # still stuck: nobody reads
        data = b""
        deadline = time.monotonic() + 30
        while not events.wait_written(0.01) and time.monotonic() < deadline:
            data += _read_bytes(r)  # the reader is back
        events.info("after")  # the next batch says what was dropped
        data += _read_bytes(r)
    finally:
        os.close(r)
        os.close(w)
    lines = [orjson.loads(line) for line in data.splitlines()]  # all whole
    delivered = sum(1 for line in lines if line["message"] == "outbound request")
    (notice,) = [line for line in lines if line["message"].startswith("log lines dropped")]
    assert notice["level"] == "warning"
    assert 0 < delivered < count
    assert delivered + notice["fields"]["dropped"] == count
    # Said where the lines went missing: every line before it was emitted before the
    # first one dropped, the first after it after (it came first, before some of those).
    ids = [line["fields"]["i"] for line in lines if line["message"] == "outbound request"]
    at = lines.index(notice)
    assert ids == sorted(ids) and ids[:at] == list(range(at))
    assert at == len(ids) or ids[at] > at  # the gap is there
    assert lines[-1]["message"] == "after"


def test_an_exit_waits_for_a_stalled_reader_once() -> None:
    """Each exit path flushes with a wait: with nobody reading, a stop took one wait
    per path (4 s for EXIT_WAIT_S of 2) instead of one."""
    r, w = _small_pipe()
    events = log.EventLog(fd=w)

    async def fill() -> None:
        for _ in range(200):
            events.emit(log.INFO, "outbound request", {"url": "x" * 200})
        events.flush()

    try:
        uvloop.run(fill())
        started = time.monotonic()
        assert not events.flush(0.3)
        assert 0.25 < time.monotonic() - started < 2
        started = time.monotonic()
        assert not events.flush(0.3)  # the reader is known not to be taking lines
        assert time.monotonic() - started < 0.1
        _read_bytes(r)  # back: the next wait waits again, and succeeds
        while not events.wait_written(0.05):
            _read_bytes(r)
        assert events.flush(0.3)
    finally:
        os.close(r)
        os.close(w)


def test_a_failed_write_drops_that_batch_only(capfd: pytest.CaptureFixture[str]) -> None:
    """A full disk (here /dev/full) turned logging off for good: the lines after the
    space came back were lost too. Now the batch is dropped and counted."""
    r, w = _small_pipe()
    fd = os.open("/dev/full", os.O_WRONLY)
    events = log.EventLog(fd=fd)
    try:
        events.info("lost")
        events.info("lost too")
        os.dup2(w, fd)  # space again
        events.info("written")
        data = _read_bytes(r)
    finally:
        for f in (r, w, fd):
            os.close(f)
    lines = [orjson.loads(line) for line in data.splitlines()]
    assert [line["message"].split(":")[0] for line in lines] == ["log lines dropped", "written"]
    assert lines[0]["fields"] == {"dropped": 2}
    err = capfd.readouterr().err
    assert err.count("log write failed") == 1, err  # said once, not per batch
    assert "No space left on device" in err


def _log_past_a_file_size_limit(path: str, limit: int) -> None:
    """In a child: log to `path` while the file may not grow past `limit` bytes (a full
    disk, as the kernel says it: a short write, then EFBIG), then with room again."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death by signal
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    events = log.EventLog(fd=fd)
    for i in range(40):
        events.emit(log.INFO, "before", {"i": i, "pad": "p" * 50}, in_order=True)
    assert events.flush(2.0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    events.info("after")
    assert events.flush(2.0)
    os._exit(0)


def test_a_write_cut_short_by_a_full_disk_leaves_whole_lines(tmp_path: Path) -> None:
    """The kernel took part of a line, then refused the rest: the file held that half
    line glued to the next batch's first (neither was JSON), and the notice blamed the
    reader. Now the cut line is finished first, and the notice names the write error."""
    path = str(tmp_path / "log")
    limit = 3000  # lines of about 130 bytes: the limit falls inside the 23rd or so
    proc = multiprocessing.get_context("fork").Process(
        target=_log_past_a_file_size_limit, args=(path, limit)
    )
    proc.start()
    proc.join(10)
    assert proc.exitcode == 0
    with open(path, "rb") as f:
        data = f.read()
    lines = [orjson.loads(line) for line in data.splitlines()]  # every one is JSON
    befores = [line["fields"]["i"] for line in lines if line["message"] == "before"]
    assert befores == list(range(len(befores))), befores
    assert 0 < len(befores) < 40
    notice, after = lines[len(befores) :]
    assert notice["message"] == "log lines dropped: writing the log failed: File too large"
    assert notice["fields"] == {"dropped": 40 - len(befores)}
    assert after["message"] == "after"
    assert sum(len(line) + 1 for line in data.splitlines()[: len(befores)]) > limit


def test_a_reader_gone_stops_logging_with_one_word_on_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    r, w = os.pipe()
    os.close(r)
    events = log.EventLog(fd=w)
    try:
        for _ in range(3):
            events.info("nobody reads this")
    finally:
        os.close(w)
    err = capfd.readouterr().err
    assert err.count("logging stopped") == 1 and "Broken pipe" in err, err


def test_shared_writes_are_whole_lines_of_at_most_pipe_buf() -> None:
    """Workers share stdout: a write over PIPE_BUF bytes to a pipe may be split, and
    another worker's bytes land mid-line (one in 40 lines was torn with two workers
    and a slow reader)."""
    r, w = os.pipe()
    ctx = multiprocessing.get_context("fork")
    events = log.EventLog(fd=w)
    events.share()
    fields = {"url": "https://example.test/" + "y" * 300}
    # Longer than PIPE_BUF: cut to fit (torn by the other worker's lines before).
    long = {"url": "https://example.test/" + "z" * 6000}

    def child(n: int) -> None:
        async def burst() -> None:
            for i in range(3000):
                extra = long if i % 50 == 0 else fields
                events.emit(log.INFO, "outbound request", {"i": i, "w": n, **extra})
            events.flush(log.EXIT_WAIT_S)

        uvloop.run(burst())
        events.flush(log.EXIT_WAIT_S)

    workers = [ctx.Process(target=child, args=(n,)) for n in range(2)]
    for p in workers:
        p.start()
    os.close(w)
    data = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            chunk = os.read(r, 8192)
            if not chunk:
                break
            data += chunk
            time.sleep(0.002)  # slower than they write: the pipe stays full
    finally:
        for p in workers:
            p.join(10)
        os.close(r)
    raw = data.splitlines()
    lines = [orjson.loads(line) for line in raw]  # raises on a torn line
    assert sorted((line["fields"]["w"], line["fields"]["i"]) for line in lines) == [
        (n, i) for n in range(2) for i in range(3000)
    ]
    assert max(len(line) + 1 for line in raw) <= select.PIPE_BUF
    cut = [line["fields"] for line in lines if line["fields"]["i"] % 50 == 0]
    assert all(f["truncated"] == ["url"] and f["url"].endswith("z...") for f in cut)
    assert all("truncated" not in line["fields"] for line in lines if line["fields"]["i"] % 50)


def test_pieces_split_at_line_ends() -> None:
    sink = log._Sink(-1, json=True)
    sink.piece = 10
    data = b"aaaa\nbbbb\ncccccccccccccc\nd\n"
    assert sink._pieces(data) == [b"aaaa\nbbbb\n", b"cccccccccccccc\n", b"d\n"]
    assert b"".join(sink._pieces(data + b"tail")) == data + b"tail"
