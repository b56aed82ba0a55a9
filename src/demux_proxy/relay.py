"""After a 101: the switch to the new protocol, then a byte relay between the two streams
(WebSocket and the like)."""

from __future__ import annotations

import asyncio

from demux_proxy.errors import UpstreamError
from demux_proxy.http1 import writer
from demux_proxy.http1.headers import Headers, end_to_end, get
from demux_proxy.http1.parser import RequestHead, ResponseHead
from demux_proxy.outcome import Outcome
from demux_proxy.stream import Stream


async def switch(
    client: Stream,
    up: Stream,
    req: RequestHead,
    resp: ResponseHead,
    out: Outcome,
    upload: asyncio.Task[None] | None,
    linger_s: float,
) -> None:
    """101 Switching Protocols: from here on, bytes both ways until both sides close
    (`relay`; `linger_s` bounds the wait for the second once the first has).

    A server may switch before the request's body is all in: the new protocol starts
    after that body (RFC 9110 7.8), so the upload ends first (its reads and writes
    are bounded by the idle timeout) and only what follows is relayed.
    """
    if not req.upgrade:
        raise UpstreamError("upstream switched protocols without being asked")
    # No Content-Length in a 1xx (RFC 9110 8.6): the bytes after it are not a body.
    headers: Headers = end_to_end(resp.headers, resp.connection, drop_length=True)
    headers.append((b"Connection", b"upgrade"))
    headers.append((b"Upgrade", get(resp.headers, b"upgrade") or b""))
    client.write(writer.response_head(101, resp.reason, headers))
    out.response_started = True
    if upload is not None:
        await upload
    out.request_done = True
    moved = [0, 0]
    try:
        await relay(client, up, moved, linger_s)
    finally:
        out.bytes_up += moved[0]  # the log line counts the new protocol's bytes too
        out.bytes_down += moved[1]


async def _pump(src: Stream, dst: Stream, moved: list[int], i: int) -> bool:
    """Copy until `src` ends; whether its end could be passed on to `dst` as one."""
    buf = src.buffer
    while True:
        if buf:
            dst.write(bytes(buf))
            moved[i] += len(buf)
            buf.clear()
            await dst.drain()
        if not await src.fill(have=0):  # bytes that came in during the drain count
            return dst.write_eof()  # the peer's half-close, passed on where it can be


async def relay(a: Stream, b: Stream, moved: list[int], linger_s: float) -> None:
    """Copy both ways with backpressure until both sides close, or either resets; close
    both. A side that closes cleanly is a half-close (RFC 9110 9.3.6: a tunnel closes
    each side once the other has): passed on, and the other way goes on for up to
    `linger_s` (a WebSocket server's last frame after the client's close). `moved`
    counts the bytes passed on, a to b then b to a (also when this raises)."""
    tasks = [
        asyncio.create_task(_pump(a, b, moved, 0)),
        asyncio.create_task(_pump(b, a, moved, 1)),
    ]
    cut: BaseException | None = None
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # The other way goes on only where the end was passed on: a side never told
        # (a TLS upstream) would not end, and its peer would wait out `linger_s`.
        if pending and all(not t.cancelled() and not t.exception() and t.result() for t in done):
            await asyncio.wait(pending, timeout=linger_s)
    except BaseException as exc:  # cancelled: the proxy is stopping
        cut = exc
    # Not in a `finally`: compiled with mypyc, an await there lost the CancelledError
    # (the cut relay returned as if it had ended cleanly).
    for task in tasks:
        task.cancel()
    # A reset on one side ends the relay like a close does: nothing more to report.
    await asyncio.gather(*tasks, return_exceptions=True)
    a.close()
    b.close()
    if cut is not None:
        raise cut
