"""`Stream`: one asyncio Protocol per TCP connection, with explicit flow control both ways.

Why our own and not asyncio streams: a Protocol with a caller-visible `bytearray` lets the
HTTP framing decoders consume in place (no copy per read), and it can switch to TLS
*after* bytes were already read. That matters after CONNECT: we look at the client's first
byte to tell a TLS ClientHello (intercept) from plain HTTP in the tunnel (ws:// through
CONNECT), which `loop.start_tls` cannot do since it ignores bytes already read. Towards
clients, TLS is therefore done here with `ssl.SSLObject` over memory BIOs; towards
upstreams, uvloop's native TLS transport is used (`native_tls=True`).

Flow control (uvicorn's FlowControl, in both directions): reading pauses when `buffer`
holds more than `READ_HIGH` bytes and resumes when the consumer asks for more with
`fill()`; `drain()` waits while the transport's write buffer is above its high mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import ssl
import struct
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from demux_proxy.errors import (
    PeerGone,
    SinkClosed,
    SinkStalled,
    SpliceUnavailable,
    StreamClosed,
    TLSTruncated,
)

READ_HIGH: Final = 256 * 1024
WRITE_HIGH: Final = 512 * 1024
# One TLS record carries at most 16 KiB of plaintext (RFC 8446 5.1): decrypt into one
# preallocated buffer (shared: decryption is synchronous) instead of allocating per read.
_RECORD: Final = 16 * 1024 + 256
_RECORD_BUF: Final = bytearray(_RECORD)
_RECORD_VIEW: Final = memoryview(_RECORD_BUF)


# splice(2) between plain sockets (Linux): through a pipe of 1 MiB where allowed.
_SPLICE: Final = hasattr(os, "splice")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_SIZE: Final = 1024 * 1024


def _splice_chunk(src: int, dst: int, size: int, gone: type[StreamClosed]) -> int:
    """One splice(2): the bytes moved, -1 when it would block; a failure raises `gone`.

    (A function that returns rather than an except block the caller waits in: awaiting
    inside one kept the exception, and what its traceback holds, alive when compiled.)
    """
    try:
        return os.splice(src, dst, size, flags=_SPLICE_FLAGS)
    except BlockingIOError:
        return -1
    except OSError as exc:
        raise gone(exc.strerror or str(exc)) from exc


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _no_tls(*args: object) -> Any:
    raise AssertionError("TLS method called before start_tls_server")


_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets

_NEVER: Final = float("inf")
_TIMER_SLACK_S: Final = 0.001


class Stream(asyncio.Protocol):
    def __init__(
        self,
        *,
        native_tls: bool = False,
        on_connect: Callable[[Stream], None] | None = None,
    ) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.eof = False
        self.closed = False
        self.peer: tuple[str, int] = ("", 0)
        self._native_tls = native_tls
        self._on_connect = on_connect
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        # The loop this stream lives on (public: callers read its clock without
        # asyncio.get_running_loop(), which on Python 3.11 is a getpid() syscall).
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # connection_made
        self._deadline = _NEVER  # of the wait in progress
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        # Memory-BIO TLS (towards clients); `_tls_ready` False while the handshake runs.
        self._sslobj: ssl.SSLObject | None = None  # also public as `ssl_object`
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._tls_ready = False
        # The SSLObject's methods, fetched once: with tls.DirectSSLObject, the C ones.
        self._tls_read: Callable[[int, bytearray], int] = _no_tls
        self._tls_write: Callable[[bytes], int] = _no_tls
        self._tls_pending: Callable[[], int] = _no_tls
        # Splicing (see `splice`): bytes the last (or current) splice passed on, why the
        # target ended it; on the target's side, the stream splicing into it.
        self.spliced = 0
        self._sink_error: StreamClosed | None = None
        self._source: Stream | None = None
        # While an upstream wait serves this (client) stream: its loss ends that wait.
        self.watcher: Stream | None = None
        # Called once when the peer closes or is lost, for a wait that reads nothing from
        # it (a request queued for budget): the wait learns of it then, not at its end.
        self.on_end: Callable[[], None] | None = None
        self._peer_lost: PeerGone | None = None

    # --- asyncio.Protocol callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        if self._native_tls:
            # uvloop's TLS drops the records it has not decrypted yet when the TCP FIN
            # comes while we pause reading (uvloop#661): a whole body from a server that
            # closes without close_notify arrived short. With no encrypted bytes let
            # wait, TCP reading pauses with ours, and the FIN is read only after them.
            cast(Any, transport).set_read_buffer_limits(high=1, low=0)  # uvloop's own
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        if peer:
            host = peer[0]
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]  # an IPv4 client of a [::] listener is known by its IPv4
            self.peer = (host, peer[1])
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self._incoming is not None:
            self._incoming.write(data)
            if self._tls_ready:
                self._decrypt()
        else:
            self.buffer += data
        if len(self.buffer) > READ_HIGH and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        # Keep the transport open so a half-closed peer still gets its answer; uvloop's
        # TLS transport ignores (and warns about) True, so say nothing there.
        return None if self._native_tls else True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if exc is None and self._native_tls and not self.eof:
            # uvloop's TLS calls eof_received only for a close_notify: a bare TCP close
            # comes here alone. What the close delimits is then truncated, not complete
            # (RFC 9112 9.8): an error for the reader, never a clean end.
            exc = TLSTruncated("TLS connection closed without close_notify")
        self.closed = True
        self.eof = True
        if exc is not None and self._exc is None:
            self._exc = exc
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._source is not None:
            self._source._sink_gone(StreamClosed(_said(exc) if exc else "connection closed"))
        watcher = self.watcher
        if watcher is not None:
            watcher._peer_lost = PeerGone(
                f"client connection lost: {_said(exc) if exc else 'closed'}"
            )
            watcher._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # --- reading --------------------------------------------------------------------

    @property
    def gone(self) -> bool:
        """The peer closed its side or was lost (its `on_end` was called or is due)."""
        return self.eof or self._peer_lost is not None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.on_end is not None and self.gone:
            on_end, self.on_end = self.on_end, None
            on_end()

    async def fill(self, timeout: float | None = None, have: int = -1) -> bool:
        """Wait until `buffer` holds more than `have` bytes (by default, as many as it holds
        now). False when the peer closed and nothing more will come.

        A caller that looked at the buffer and then awaited something else passes the
        length it looked at: bytes that came in meanwhile count, rather than being waited
        past (the last bytes of a body may be all there is).

        Raises TimeoutError after `timeout` seconds without a byte, StreamClosed on a reset.
        """
        before = len(self.buffer) if have < 0 else have
        while len(self.buffer) <= before:
            if self._peer_lost is not None:
                raise self._peer_lost
            if self._exc is not None:
                if isinstance(self._exc, TLSTruncated):
                    raise TLSTruncated(str(self._exc))
                raise StreamClosed(_said(self._exc)) from self._exc
            if self.eof:
                return False
            waiter = self._arm_waiter()
            if timeout is not None:
                self._set_deadline(self.loop.time() + timeout)
            try:
                await waiter
            finally:
                self._waiter = None
                self._deadline = _NEVER
        return True

    def _arm_waiter(self) -> asyncio.Future[None]:
        """Read again if we had paused, and return the future the next event resolves."""
        self.resume()
        waiter = self._waiter = self.loop.create_future()
        return waiter

    # A timer per wait would cost a uvloop timer start and cancel (~2 us) on every read
    # of every request. Instead each stream keeps at most one timer and a deadline: a
    # wait moves the deadline (a float store); the timer, when it fires, either expires
    # the wait or re-arms itself for the deadline now in force.

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._deadline == _NEVER:
            return  # not waiting now: the next wait arms a timer again
        # libuv counts timers in whole milliseconds: one may fire a hair early.
        if self.loop.time() + _TIMER_SLACK_S >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    # --- splicing: received bytes straight to another stream ------------------------

    def resume(self) -> None:
        """Read again if a full buffer had paused reading: an idle connection must see
        what its peer sends (bytes nobody asked for, its close) as it comes."""
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    @property
    def may_hold_unread(self) -> bool:
        """Whether bytes may wait in the kernel that the loop is not reading: after a
        splice (it moved exactly a body's length), or while reading is paused (a large
        body left the buffer full at its last read)."""
        return bool(self.spliced) or self._read_paused

    def unread_in_kernel(self) -> bool:
        """Whether the socket holds bytes (or an end) the loop has not read yet: see
        `may_hold_unread`; the loop may not look before the connection is used again."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return bool(poller.poll(0))

    def can_splice_to(self, target: Stream) -> bool:
        """Whether `splice` may move bytes from here to `target` now: both plain TCP (no
        TLS on either: splice(2) moves bytes as they stand) and nothing waiting in
        `target`'s write buffer that spliced bytes would overtake."""
        return (
            _SPLICE
            and not self._native_tls
            and self._incoming is None
            and target._sslobj is None
            and not self.closed
            and not self.transport.is_closing()
            and not target.closed
            and not target.transport.is_closing()
            and not target.transport.get_write_buffer_size()
        )

    async def splice(self, target: Stream, length: int, idle_timeout: float) -> int:
        """Move the next `length` bytes this peer sends (-1: all until it closes) to
        `target` with splice(2) through a pipe; return how many arrived there (also in
        `spliced`, which stays true when the splice ends with an exception).

        For a body that needs no decoding (Content-Length, or until close) between plain
        sockets: the bytes never enter this process, no copy to user space and back, no
        Python per chunk. Flow control is the kernel's: we read from here only what the
        pipe holds and write it on before reading again, so a slow `target` stops the
        reading and memory stays flat whatever the body size. Returns early when the
        peer closes (the caller decides whether the body was complete); raises
        StreamClosed on a reset, SinkClosed when `target` went away, TimeoutError after
        `idle_timeout` seconds without a byte from the peer, SpliceUnavailable (before
        anything moved) when there are no descriptors for the pipe. Call only when
        `can_splice_to(target)` and `buffer` is empty (bytes already read are the
        caller's to pass on first).

        The transports stay ours: reading from this one pauses for the duration, and the
        splice reads, writes and waits on duplicates of the two descriptors, since the
        loop refuses to watch a descriptor a transport owns.
        """
        assert not self.buffer and length != 0
        loop = self.loop
        self.spliced = 0
        self._sink_error = None
        # A transport that closes hands out no socket: checked here, since a reset can
        # land between can_splice_to and now.
        src_sock = self.transport.get_extra_info("socket")
        if src_sock is None:
            raise StreamClosed("connection closed")
        dst_sock = target.transport.get_extra_info("socket")
        if dst_sock is None:
            raise SinkClosed("connection closed")
        fds: list[int] = []
        try:
            pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fds += (pipe_r, pipe_w)
            with contextlib.suppress(OSError):  # the default 64 KiB works, only slower
                fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, _PIPE_SIZE)
            fds.append(os.dup(src_sock.fileno()))
            fds.append(os.dup(dst_sock.fileno()))
        except OSError as exc:  # EMFILE, ENFILE
            for fd in fds:
                os.close(fd)
            raise SpliceUnavailable(exc.strerror or str(exc)) from exc
        # Every splice goes through our own duplicates, never the transports' numbers:
        # another task may close a transport while we wait (an upload that failed aborts
        # the upstream), and the next socket the process opens takes the freed number.
        # Splicing from it would hand one client's bytes to another.
        src, dst = fds[2], fds[3]
        self.transport.pause_reading()
        self._read_paused = False  # ours now; resumed at the end whatever it was
        target._source = self  # its connection_lost ends the splice (`_sink_gone`)
        try:
            left = length
            while left != 0:
                size = _PIPE_SIZE if left < 0 else min(left, _PIPE_SIZE)
                n = _splice_chunk(src, pipe_w, size, StreamClosed)
                if n < 0:
                    await self._ready(loop.add_reader, loop.remove_reader, src, idle_timeout)
                    continue
                if n == 0:
                    self.eof = True
                    break
                while n:
                    m = _splice_chunk(pipe_r, dst, n, SinkClosed)
                    if m < 0:
                        try:
                            await self._ready(
                                loop.add_writer, loop.remove_writer, dst, idle_timeout
                            )
                        except TimeoutError:
                            raise SinkStalled(f"peer took nothing for {idle_timeout:g} s") from None
                        continue
                    n -= m
                    self.spliced += m
                    if left > 0:
                        left -= m
            return self.spliced
        finally:
            target._source = None
            for fd in fds:
                os.close(fd)
            if not self.closed and not self.transport.is_closing():
                self.transport.resume_reading()

    async def _ready(
        self,
        watch: Callable[..., object],
        unwatch: Callable[[int], object],
        fd: int,
        timeout: float | None,
    ) -> None:
        """Wait until `fd` is ready (`watch` is the loop's add_reader or add_writer)."""
        self._raise_if_gone()
        waiter = self._waiter = self.loop.create_future()
        watch(fd, _resolve, waiter)
        if timeout is not None:
            self._set_deadline(self.loop.time() + timeout)
        try:
            await waiter
        finally:
            unwatch(fd)
            self._waiter = None
            self._deadline = _NEVER
        # A method, not the test inline: the test before the await would narrow the
        # attribute to None here, and the compiled module would trust that.
        self._raise_if_gone()

    def _raise_if_gone(self) -> None:
        if self._sink_error is not None:
            raise self._sink_error
        if self.closed or self.transport.is_closing():  # our own transport, closed by
            raise StreamClosed("connection closed")  # another task while we waited

    def _sink_gone(self, exc: StreamClosed) -> None:
        """The target of our splice closed: the splice ends with SinkClosed."""
        self._sink_error = SinkClosed(str(exc) or "connection closed")
        self._wake()

    # --- writing --------------------------------------------------------------------

    def _check_open(self) -> None:
        # uvloop raises RuntimeError on a write to a closed transport: ours is a
        # StreamClosed, which the exchange reports as the client (or upstream) gone.
        if self.closed or self.transport.is_closing():
            raise StreamClosed("connection closed")

    def write(self, data: bytes) -> None:
        self._check_open()
        if self._sslobj is not None:
            self._tls_write(data)
            self._flush_tls()
        else:
            self.transport.write(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        self._check_open()
        if self._sslobj is not None:
            self._tls_write(b"".join(parts))
            self._flush_tls()
        else:
            self.transport.writelines(parts)

    @property
    def must_drain(self) -> bool:
        """Whether `drain` would do anything (wait, or raise): checked first, it spares a
        coroutine call per response, most of which find nothing to wait for."""
        return self.closed or self._write_paused

    async def drain(self, timeout: float | None = None) -> None:
        """Wait while the write buffer is above its high mark.

        Raises SinkStalled when the peer took nothing for `timeout` seconds: a peer that
        stops reading must not hold its connection (and ours upstream) forever.
        """
        if self.closed:
            raise StreamClosed("connection closed by peer")
        if not self._write_paused:
            return
        try:
            async with asyncio.timeout(timeout):  # a timer only when writes are paused
                while self._write_paused:
                    self._drain_waiter = self.loop.create_future()
                    try:
                        await self._drain_waiter
                    finally:
                        self._drain_waiter = None
                    if self.closed:
                        raise StreamClosed("connection closed by peer")
        except TimeoutError:
            raise SinkStalled(f"peer took nothing for {timeout:g} s") from None

    def write_eof(self) -> bool:
        """Half-close, reading goes on: a FIN once writes drain, or where we run TLS
        towards the peer, its close_notify (RFC 8446 6.1 lets the peer still send after
        it). False where it cannot be said: closed, or uvloop's TLS transport (towards
        upstreams), which has no half-close."""
        transport = self.transport
        if self.closed or transport.is_closing():
            return False
        if self._sslobj is not None:
            return self._close_notify(still_reading=True)
        if not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

    async def linger_close(self, timeout: float) -> None:
        """Close as RFC 9112 9.6 asks of a server that ends a connection the client may
        still be sending on (an answer before the whole body, a refusal): our side first
        (close_notify where we run TLS, then a FIN once the answer is out), then what
        the client still sends is read and dropped until it closes, for at most
        `timeout` s. Closed at once with bytes unread, the socket would send a reset,
        which can destroy the answer before the client has read it."""
        if self.closed or self.eof or self.transport.is_closing():
            self.close()
            return
        self._close_notify()
        self._incoming = None  # what still comes is dropped undecrypted
        transport = self.transport
        if not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        deadline = self.loop.time() + timeout
        try:
            while True:
                self.buffer.clear()
                left = deadline - self.loop.time()
                if left <= 0 or not await self.fill(left):
                    break
        except (StreamClosed, TimeoutError):
            pass  # reset, or still sending: closed below either way
        self.close()

    def close(self) -> None:
        """Close cleanly: TLS close_notify where we run TLS, then FIN once writes drain."""
        if self.closed:
            return
        self._close_notify()
        self.transport.close()

    def _close_notify(self, *, still_reading: bool = False) -> bool:
        """Send TLS's close_notify where we run TLS towards the peer (OpenSSL sends it
        once); whether it was sent. `still_reading`: a half-close, after which what the
        peer sends is still decrypted; otherwise no record is read any more."""
        if self._sslobj is None or not self._tls_ready:
            return False
        try:
            self._sslobj.unwrap()
        except ssl.SSLError:
            pass  # close_notify is queued in the BIO whether or not the peer answered
        self._flush_tls()
        self._tls_ready = still_reading
        return True

    def abort(self) -> None:
        """Reset: the signal a client gets for a response we cannot finish.

        An RST, not a FIN: closing a socket is a FIN whatever the transport's abort()
        means by it, and a FIN ends a close-delimited body as if it were complete.
        """
        if not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()

    # --- TLS towards the client (memory BIOs) ------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._sslobj

    async def start_tls_server(self, context: ssl.SSLContext) -> ssl.SSLObject:
        """Run the server side of a TLS handshake over this connection.

        Bytes already in `buffer` (the ClientHello we peeked at) are handed to TLS first.
        """
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._sslobj = sslobj
        self._tls_read = cast(Any, sslobj).read  # with a buffer, it returns a count
        self._tls_write = sslobj.write
        self._tls_pending = sslobj.pending
        if self.buffer:
            self._incoming.write(bytes(self.buffer))
            self.buffer.clear()
        while True:
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass  # wait below, outside the except block (see `_splice_chunk`)
            except ssl.SSLError:
                self._flush_tls()  # the alert tells the client why
                raise
            self._flush_tls()
            if self._exc is not None:
                raise StreamClosed("connection lost during TLS handshake") from self._exc
            if self.eof:
                raise StreamClosed("client closed during TLS handshake") from None
            waiter = self._arm_waiter()
            try:
                await waiter
            finally:
                self._waiter = None
        self._flush_tls()
        self._tls_ready = True
        self._decrypt()  # application data that came in with the last handshake flight
        return sslobj

    def _flush_tls(self) -> None:
        assert self._outgoing is not None
        if self._outgoing.pending and not self.closed:
            self.transport.write(self._outgoing.read())

    def _decrypt(self) -> None:
        assert self._sslobj is not None and self._incoming is not None
        incoming = self._incoming
        read, pending = self._tls_read, self._tls_pending
        try:
            # Stop when nothing is left to decrypt rather than on SSLWantReadError: an
            # exception per received chunk is a measurable cost on the hot path.
            while incoming.pending or pending():
                n = read(_RECORD, _RECORD_BUF)
                if not n:  # TLS closed (close_notify already seen)
                    self.eof = True
                    break
                self.buffer += _RECORD_VIEW[:n]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # a partial record: the rest comes with the next data_received
        except ssl.SSLZeroReturnError:
            self.eof = True  # close_notify: a clean end of the TLS stream
        except ssl.SSLError as exc:
            self._exc = exc
            self.transport.abort()
        self._flush_tls()


def _said(exc: BaseException) -> str:
    """An error as a log line says it: an OSError by its words alone ("Connection reset
    by peer", as the splice path says it too, not "[Errno 104] Connection reset...")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
