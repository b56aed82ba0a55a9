"""Stream over real sockets, on uvloop: fill deadlines (one re-armed timer per stream) and
splice(2) between two TCP connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from demux_proxy.errors import SinkClosed, SpliceUnavailable, StreamClosed
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

    return _test_running(main, test)


def _test_running(
    main: Callable[[], Coroutine[Any, Any, None]], test: Callable[..., object]
) -> Callable[[], None]:
    """A plain test function that runs `main()` on uvloop, named after `test`."""

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
async def test_fill_counts_bytes_that_came_before_it_was_called(pair: Pair) -> None:
    """`have`: what a caller looked at before awaiting something else (a drain)."""
    stream, peer = pair
    peer.send(b"tail")  # the last bytes of a body, and then nothing more
    assert await stream.fill(1.0)  # they are in the buffer now
    assert await stream.fill(1.0, have=0) is True  # at once: they are beyond what it saw
    assert await _timed_out_after(stream, 0.2) >= 0.15  # without `have`, it waits past them
    assert bytes(stream.buffer) == b"tail"


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


# --------------------------------------------------------------------------- splice


async def _tcp_stream() -> tuple[Stream, socket.socket]:
    """A Stream over one end of a real loopback TCP connection, and the other end."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    peer.setblocking(False)
    _, stream = await loop.connect_accepted_socket(Stream, ours)
    return stream, peer


def on_two_streams(
    test: Callable[[Stream, socket.socket, Stream, socket.socket], Coroutine[Any, Any, None]],
) -> Callable[[], None]:
    """Run `test(source, source_peer, target, target_peer)` on uvloop over two TCP pairs."""

    async def main() -> None:
        source, source_peer = await _tcp_stream()
        target, target_peer = await _tcp_stream()
        try:
            await test(source, source_peer, target, target_peer)
        finally:
            for stream in (source, target):
                stream.abort()
            source_peer.close()
            target_peer.close()

    return _test_running(main, test)


async def _receive(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


BODY = bytes(range(256)) * 12289  # 3 MiB and 256 bytes: not a multiple of the pipe


@on_two_streams
async def test_splice_moves_exactly_the_length_and_leaves_what_follows(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    loop = asyncio.get_running_loop()
    assert source.can_splice_to(target)
    sending = loop.create_task(loop.sock_sendall(source_peer, BODY + b"NEXT"))
    receiving = loop.create_task(_receive(target_peer, len(BODY)))
    assert await source.splice(target, len(BODY), 5.0) == len(BODY)
    assert source.spliced == len(BODY)
    assert await receiving == BODY
    await sending
    # What came after the body was left in the socket: the stream reads it as usual.
    while bytes(source.buffer) != b"NEXT":
        assert await source.fill(5.0)
    assert not source.eof


@on_two_streams
async def test_splice_until_the_peer_closes(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    loop = asyncio.get_running_loop()

    async def send_then_close() -> None:
        await loop.sock_sendall(source_peer, BODY)
        source_peer.shutdown(socket.SHUT_WR)

    sending = loop.create_task(send_then_close())
    receiving = loop.create_task(_receive(target_peer, len(BODY)))
    assert await source.splice(target, -1, 5.0) == len(BODY)
    assert source.eof
    assert await receiving == BODY
    await sending


@on_two_streams
async def test_splice_ends_with_sink_closed_when_the_target_goes(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    loop = asyncio.get_running_loop()
    target_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    target_peer.close()  # a reset: the target stream learns it at once or at its write
    sending = loop.create_task(loop.sock_sendall(source_peer, BODY))
    with pytest.raises(SinkClosed):
        await source.splice(target, len(BODY), 5.0)
    assert source.spliced < len(BODY)
    sending.cancel()


@on_two_streams
async def test_splice_times_out_when_the_peer_says_nothing(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await source.splice(target, 100, 0.2)
    assert 0.15 <= time.monotonic() - started < 2.0
    # Reading resumed: the stream still works once the splice is over.
    source_peer.send(b"late")
    assert await source.fill(5.0)
    assert bytes(source.buffer) == b"late"


@on_two_streams
async def test_a_source_closed_mid_splice_is_never_read_through_its_old_number(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    """Another task aborts the source while the splice waits (exchange._upload does, when
    a client's upload ends short during an early response). Its descriptor number is then
    free, and the next socket the process opens takes it: the splice ends, and never
    reads that socket, which belongs to someone else."""
    loop = asyncio.get_running_loop()
    number = source.transport.get_extra_info("socket").fileno()
    someone, someone_peer = socket.socketpair()
    someone_peer.send(b"GET /someone-elses HTTP/1.1\r\nCookie: secret\r\n\r\n")
    reused: list[bool] = []

    def next_socket_takes_the_number() -> None:
        # Runs after the transport's close and before the splice resumes (queued
        # behind the connection_lost call that wakes it).
        try:
            os.fstat(number)
        except OSError:
            os.dup2(someone.fileno(), number)  # what the next accept() would get
            reused.append(True)

    splicing = loop.create_task(source.splice(target, 1000, 1.0))
    await asyncio.sleep(0.05)  # waiting for the upstream's next bytes
    source.abort()
    loop.call_soon(next_socket_takes_the_number)
    try:
        with pytest.raises(StreamClosed):
            await splicing
        assert reused == [True]
        target_peer.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing reached this client
            target_peer.recv(4096)
        assert source.spliced == 0
        assert someone.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT).startswith(b"GET")
    finally:
        if reused:
            os.close(number)
        someone.close()
        someone_peer.close()


@on_two_streams
async def test_no_splice_while_the_target_has_bytes_waiting(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    # Fill the target's socket buffers (nobody reads them): the rest waits in its
    # transport, which spliced bytes would overtake.
    target.write(b"x" * (32 * 1024 * 1024))
    assert target.transport.get_write_buffer_size() > 0
    assert not source.can_splice_to(target)


@on_two_streams
async def test_splice_without_descriptors_to_spare_moves_nothing(
    source: Stream, source_peer: socket.socket, target: Stream, target_peer: socket.socket
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        # Every descriptor number below the limit taken: the pipe cannot be made.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(SpliceUnavailable):
            await source.splice(target, 100, 5.0)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert source.spliced == 0
    source_peer.send(b"still read")  # reading was never paused: the stream reads on
    assert await source.fill(5.0)
    assert bytes(source.buffer) == b"still read"
