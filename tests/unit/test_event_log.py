"""log.EventLog batching: lines reach the file in order, at most FLUSH_S late, and at
once when FLUSH_BYTES are pending or no event loop runs. A real pipe, a real loop."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator

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
        at_once = _read_bytes(r)  # before any await: the timer has not run
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
        events.flush()

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
