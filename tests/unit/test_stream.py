"""Stream.fill deadlines over a real socket pair, on uvloop: one re-armed timer per stream."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from demux_proxy.stream import Stream

Pair = tuple[Stream, socket.socket]


def on_uvloop(
    test: Callable[[Pair], Coroutine[Any, Any, None]],
) -> Callable[[], None]:
    """Run `test(pair)` on uvloop (the proxy's loop), with a Stream over a socket pair."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        _, stream = await asyncio.get_running_loop().connect_accepted_socket(Stream, ours)
        theirs.setblocking(False)
        try:
            await test((stream, theirs))
        finally:
            stream.abort()
            theirs.close()

    def run() -> None:
        uvloop.run(main())

    # Not functools.wraps: pytest would read the wrapped signature and look for a fixture.
    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


async def _timed_out_after(stream: Stream, timeout: float) -> float:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await stream.fill(timeout)
    return time.monotonic() - started


@on_uvloop
async def test_fill_returns_when_bytes_arrive(pair: Pair) -> None:
    stream, peer = pair
    asyncio.get_running_loop().call_later(0.05, peer.send, b"hello")
    assert await stream.fill(5.0)
    assert bytes(stream.buffer) == b"hello"


@on_uvloop
async def test_fill_times_out(pair: Pair) -> None:
    stream, _ = pair
    assert 0.15 <= await _timed_out_after(stream, 0.2) < 2.0


async def _answered_then_timed_out(pair: Pair, first: float, then: float) -> float:
    """A wait of `first` seconds that data ends, then one of `then` seconds that expires."""
    stream, peer = pair
    asyncio.get_running_loop().call_later(0.05, peer.send, b"x")
    assert await stream.fill(first)  # leaves the stream's timer armed `first` s out
    return await _timed_out_after(stream, then)


@on_uvloop
async def test_a_shorter_wait_after_a_longer_one_keeps_its_own_deadline(pair: Pair) -> None:
    assert 0.15 <= await _answered_then_timed_out(pair, 30.0, 0.2) < 2.0


@on_uvloop
async def test_a_longer_wait_after_a_shorter_one_is_not_cut_at_the_old_deadline(
    pair: Pair,
) -> None:
    # The first wait's timer fires mid-wait: it must re-arm for this wait's deadline.
    assert 0.65 <= await _answered_then_timed_out(pair, 0.3, 0.7) < 3.0


@on_uvloop
async def test_no_timeout_waits_past_an_armed_timer(pair: Pair) -> None:
    stream, peer = pair
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, peer.send, b"x")
    assert await stream.fill(0.1)
    loop.call_later(0.4, peer.send, b"y")  # after the 0.1 s timer has fired
    assert await stream.fill(None)
    assert bytes(stream.buffer) == b"xy"


@on_uvloop
async def test_eof_and_reset(pair: Pair) -> None:
    stream, peer = pair
    peer.shutdown(socket.SHUT_WR)
    assert not await stream.fill(5.0)
