"""The bodies of an exchange: the request's upload and the response's relay.

Both are copied with flow control (a slow reader stops the reading of the other side)
or, where the framing needs no decoding and neither side runs TLS, spliced by the
kernel (`Stream.splice`). Failures are said as the exchange reports them: the
upstream's as UpstreamError (502/504), a client gone as StreamClosed.
"""

from __future__ import annotations

import asyncio

from demux_proxy import log
from demux_proxy.errors import (
    SinkClosed,
    SinkStalled,
    SpliceUnavailable,
    StreamClosed,
    TLSTruncated,
    UpstreamError,
    UpstreamTimeout,
)
from demux_proxy.http1 import writer
from demux_proxy.http1.framing import BodyDecoder
from demux_proxy.http1.headers import forwarded_trailers
from demux_proxy.outcome import Outcome
from demux_proxy.stream import Stream


async def upload_body(
    client: Stream,
    up: Stream,
    body: BodyDecoder,
    chunked: bool,
    out: Outcome,
    idle: float,
    events: log.EventLog,
) -> None:
    """Stream the request body upstream; a slow upstream stops us reading the client."""
    buf = client.buffer
    try:
        while True:
            data = body.read(buf)
            if data:
                decoded = [data]  # all this buffer holds: one chunk and one send
                while more := body.read(buf):
                    decoded.append(more)
                out.bytes_up += sum(map(len, decoded))
                try:
                    up.writelines(_framed([], decoded, chunked))
                    await up.drain(idle)
                except StreamClosed as exc:  # every one here is the upstream's
                    raise _upload_refused(exc, idle) from exc
            elif body.done:
                break
            else:
                try:  # Content-Length, and no TLS: the kernel moves the rest
                    moved = await _splice(client, up, body, idle, events)
                except SinkClosed as exc:  # the upstream's; the rest are the client's
                    raise _upload_refused(exc, idle) from exc
                finally:
                    out.bytes_up += client.spliced  # counted also on failure
                if not moved and not await client.fill(idle):
                    body.eof()
        if chunked:
            up.write(writer.last_chunk(forwarded_trailers(body.trailers)))
        out.request_done = True
    except BaseException:
        up.abort()  # an incomplete request must never reach a server as complete
        raise


async def relay_body(
    client: Stream,
    up: Stream,
    decoder: BodyDecoder,
    to_chunked: bool,
    out: Outcome,
    head: bytes,
    idle: float,
    events: log.EventLog,
) -> None:
    """Relay the body; what is already buffered goes out with the head in one write.

    Writes are gathered and flushed only before waiting (for the upstream or for the
    client to drain): a small response costs one send() however it was framed.
    """
    buf = up.buffer
    parts: list[bytes] = [head]
    decoded: list[bytes] = []  # what one pass over the buffer gave: one chunk, one write
    while True:
        data = decoder.read(buf)
        if data:
            out.bytes_down += len(data)
            decoded.append(data)
            continue
        if decoder.done:
            break
        # From the first write on, a failure can only be signalled by an abort; before
        # it, the client still gets a clean 502 (out.response_started decides).
        out.response_started = True
        client.writelines(_framed(parts, decoded, to_chunked))
        parts = []
        decoded = []
        if not to_chunked:
            # Nothing to decode, no TLS either side: the kernel moves the rest.
            try:
                moved = await _splice(up, client, decoder, idle, events)
            except SinkClosed:
                raise  # the client went away: not the upstream's fault
            except StreamClosed as exc:
                raise upstream_lost(exc, mid_body=True) from exc
            except TimeoutError as exc:
                raise UpstreamTimeout(f"upstream sent nothing for {idle:g} s mid-body") from exc
            finally:
                out.bytes_down += up.spliced  # the log counts what went, also on failure
            if moved:
                continue
        looked = len(buf)  # what the decoder saw: bytes arriving during the drain count
        await client.drain(idle)
        try:
            more = await up.fill(idle, have=looked)
        except StreamClosed as exc:
            raise upstream_lost(exc, mid_body=True) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream sent nothing for {idle:g} s mid-body") from exc
        if not more:
            decoder.eof()
    _framed(parts, decoded, to_chunked)
    if to_chunked:
        parts.append(writer.last_chunk(forwarded_trailers(decoder.trailers)))
    out.response_started = True
    client.writelines(parts)
    if client.must_drain:
        await client.drain(idle)


def _framed(parts: list[bytes], decoded: list[bytes], chunked: bool) -> list[bytes]:
    """`parts` with what was `decoded` appended: as one chunk when `chunked`.

    Many small chunks in, one out: a body framed in 1-byte chunks costs one join per read,
    not three objects per byte held until a slow reader takes them (it was 37 MB).
    """
    if decoded:
        data = decoded[0] if len(decoded) == 1 else b"".join(decoded)
        if chunked:
            parts += writer.chunk(data)
        else:
            parts.append(data)
    return parts


async def _splice(
    source: Stream, target: Stream, body: BodyDecoder, idle_s: float, events: log.EventLog
) -> bool:
    """Splice the rest of `body` from `source` to `target` where its framing needs no
    decoding and both are plain sockets, and tell `body` what passed: False, with
    nothing moved, where the bytes must be copied instead. A body the peer cut short
    raises as `body.eof()` does; `source.spliced` counts the bytes moved either way."""
    source.spliced = 0
    length = body.verbatim()
    if length is None or not source.can_splice_to(target):
        return False
    try:
        await source.splice(target, length, idle_s)
    except SpliceUnavailable as exc:
        events.warning("splice unavailable, copying instead", error=str(exc))
        return False
    body.consumed(source.spliced)
    if not body.done:
        body.eof()  # the peer closed: complete only for a body delimited by the close
    return True


async def reap(task: asyncio.Task[None]) -> None:
    """Cancel and wait: no task outlives the exchange, no exception goes unretrieved."""
    if not task.done():
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        pass  # already surfaced through the exchange's own error path


def raise_upload_error(upload: asyncio.Task[None] | None) -> None:
    """If the upstream went away because our upload failed, report the upload's error."""
    if upload is not None and upload.done() and not upload.cancelled():
        exc = upload.exception()
        if exc is not None:
            raise exc


def _upload_refused(exc: StreamClosed, idle_s: float) -> UpstreamError:
    """What the client is told when the upstream stopped taking the request's body: it
    went away (a server refusing the upload by a reset), or took nothing for `idle_s`."""
    if isinstance(exc, SinkStalled):
        return UpstreamTimeout(f"upstream took nothing for {idle_s:g} s")
    return UpstreamError(f"upstream ended the connection during the upload: {exc}")


def upstream_lost(exc: StreamClosed, *, mid_body: bool) -> UpstreamError:
    """What the client is told when the upstream connection ended under a read."""
    where = "mid-body" if mid_body else "without a response"
    if isinstance(exc, TLSTruncated):  # a FIN with no close_notify: a close, not a reset
        return UpstreamError(f"upstream closed the connection {where} (no TLS close_notify)")
    return UpstreamError(f"upstream reset the connection{' mid-body' if mid_body else ''}: {exc}")
