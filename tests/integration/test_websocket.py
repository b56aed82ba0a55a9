"""WebSocket echo through the real proxy, over ws:// and wss://.

aiohttp sends ws:// as an absolute-form GET with Upgrade to the proxy and wss:// through
CONNECT (intercepted TLS); the `websockets` library uses CONNECT for both, so its ws://
case is plain HTTP inside the tunnel.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid

import aiohttp
import pytest
import websockets.asyncio.client
import websockets.sync.client

from tests.proxy_process import AIOHTTP_CLEANUP_CLOSED, EGRESS, ProxyProcess, tls_tunnel
from tests.rawserver import RawServer, read_head
from tests.upstream import Upstream

SCHEMES = ["ws", "wss"]

MESSAGES: list[str | bytes] = [
    "hello",
    b"\x00\x01\x02binary\xff",
    "ünïcödé ✓",
    b"",
    "x" * 70_000,  # beyond the 16-bit length form of a frame
    bytes(range(256)) * 300,
    "last",
]


def _ctx(proxy: ProxyProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.ca_path))


def _ws_url(upstream: Upstream, scheme: str) -> tuple[str, str]:
    """A unique /ws URL (its query tags this test's lines in the proxy log) and the tag."""
    tag = uuid.uuid4().hex
    path = f"/ws?t={tag}"
    if scheme == "ws":
        url = upstream.http_url(path).replace("http://", "ws://", 1)
    else:
        url = upstream.https_url(path).replace("https://", "wss://", 1)
    return url, tag


def _assert_went_through_proxy(proxy: ProxyProcess, tag: str) -> None:
    line = proxy.wait_for_log(
        "outbound request", lambda line: tag in str(line["fields"].get("url", ""))
    )
    assert line["fields"]["interface"] in EGRESS


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_aiohttp_websocket_echo(proxy: ProxyProcess, upstream: Upstream, scheme: str) -> None:
    url, tag = _ws_url(upstream, scheme)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(enable_cleanup_closed=AIOHTTP_CLEANUP_CLOSED),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as session,
        session.ws_connect(url, proxy=proxy.url, ssl=_ctx(proxy)) as ws,
    ):
        for message in MESSAGES:
            if isinstance(message, str):
                await ws.send_str(message)
                reply = await ws.receive(timeout=10)
                assert reply.type is aiohttp.WSMsgType.TEXT, reply
            else:
                await ws.send_bytes(message)
                reply = await ws.receive(timeout=10)
                assert reply.type is aiohttp.WSMsgType.BINARY, reply
            assert reply.data == message
        assert await ws.close() is True
        assert ws.close_code == 1000
    _assert_went_through_proxy(proxy, tag)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_websockets_asyncio_client_echo(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url, tag = _ws_url(upstream, scheme)
    kwargs = {"ssl": _ctx(proxy)} if scheme == "wss" else {}
    async with websockets.asyncio.client.connect(
        url, proxy=proxy.url, open_timeout=10, close_timeout=10, **kwargs
    ) as ws:
        for message in MESSAGES:
            await ws.send(message)
            reply = await ws.recv()
            assert type(reply) is type(message)
            assert reply == message
        await ws.close()
    assert ws.close_code == 1000
    assert ws.close_reason == ""
    # The server's close frame came back: a clean close, not a dropped connection.
    assert ws.protocol.close_rcvd is not None
    assert ws.protocol.close_rcvd.code == 1000
    _assert_went_through_proxy(proxy, tag)
    # Its line counts the frames both ways (each message, echoed), not 0 and 0. They are
    # compressed (permessage-deflate): at least a 2-byte header each, no exact size.
    line = proxy.wait_for_log("inbound response", lambda ln: tag in ln["fields"]["url"])
    assert line["fields"]["status_code"] == 101
    assert line["fields"]["bytes_sent"] >= 2 * len(MESSAGES), line
    assert line["fields"]["bytes"] >= 2 * len(MESSAGES), line


@pytest.mark.parametrize("scheme", SCHEMES)
def test_websockets_sync_client_echo(proxy: ProxyProcess, upstream: Upstream, scheme: str) -> None:
    url, tag = _ws_url(upstream, scheme)
    kwargs: dict[str, ssl.SSLContext] = {}
    if scheme == "wss":
        ctx = _ctx(proxy)
        # The sync client reads in a background thread while the handshake request is
        # written from this one; over TLS 1.3 (session tickets right after the handshake)
        # that loses the request now and then, straight to a TLS server as much as through
        # the proxy (cf. python-websockets/websockets#1648): the handshake then times out.
        # TLS 1.2 has no such post-handshake traffic, and covers the proxy's TLS 1.2 side.
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        kwargs["ssl"] = ctx
    with websockets.sync.client.connect(
        url, proxy=proxy.url, open_timeout=10, close_timeout=10, **kwargs
    ) as ws:
        for message in MESSAGES:
            ws.send(message)
            reply = ws.recv(timeout=10)
            assert type(reply) is type(message)
            assert reply == message
        ws.close()
    assert ws.close_code == 1000
    assert ws.protocol.close_rcvd is not None
    assert ws.protocol.close_rcvd.code == 1000
    _assert_went_through_proxy(proxy, tag)


def _switch(sock: socket.socket, extra: bytes = b"") -> bytes:
    """Read a request head and answer 101 (with `extra` header lines); what came after
    the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        + extra
        + b"\r\n"
    )
    return data.partition(b"\r\n\r\n")[2]


class _EarlySwitch(RawServer):
    """Answers 101 as soon as the request head is in, then records every byte after it."""

    def __init__(self) -> None:
        super().__init__(None)
        self.after_head = b""
        self.done = threading.Event()

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        rest = _switch(sock)
        while b"CLIENT-AFTER-UPGRADE" not in rest:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
        self.after_head = rest
        sock.sendall(b"SERVER-AFTER-UPGRADE")
        self.done.set()


def test_a_101_before_the_request_body_ends_loses_no_byte(proxy: ProxyProcess) -> None:
    """The server switches before the body is all in: the rest of the body still goes
    up as body, then the client's bytes of the new protocol follow, both ways."""
    server = _EarlySwitch()
    try:
        authority = f"127.0.0.1:{server.port}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            c.sendall(
                f"POST http://{authority}/up HTTP/1.1\r\nHost: {authority}\r\n"
                "Connection: upgrade\r\nUpgrade: websocket\r\n"
                "Content-Length: 10\r\n\r\n12345".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += c.recv(4096)
            time.sleep(0.3)  # the rest of the body comes late
            c.sendall(b"67890CLIENT-AFTER-UPGRADE")
            assert answer.startswith(b"HTTP/1.1 101 "), answer
            _, _, more = answer.partition(b"\r\n\r\n")
            while b"SERVER-AFTER-UPGRADE" not in more:
                chunk = c.recv(4096)
                assert chunk, more
                more += chunk
        assert server.done.wait(10)
        assert server.after_head == b"1234567890CLIENT-AFTER-UPGRADE"
    finally:
        server.close()


def _ask_to_switch(c: socket.socket, authority: str) -> bytes:
    """Ask for WebSocket on `c` (plain HTTP through the proxy); the answer's head and
    whatever came with it."""
    c.sendall(
        f"GET http://{authority}/ws HTTP/1.1\r\nHost: {authority}\r\n"
        "Connection: upgrade\r\nUpgrade: websocket\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += c.recv(4096)
    return answer


class _LengthySwitch(RawServer):
    """Answers 101 with a Content-Length (RFC 9110 8.6: a server MUST NOT), then echoes."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        _switch(sock, b"Content-Length: 0\r\n")
        while chunk := sock.recv(4096):
            sock.sendall(chunk)


def test_a_101s_content_length_is_not_passed_on(proxy: ProxyProcess) -> None:
    """A client that believed it would read the new protocol as a 0-byte body."""
    server = _LengthySwitch(None)
    try:
        authority = f"127.0.0.1:{server.port}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            answer = _ask_to_switch(c, authority)
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            assert b"content-length" not in head.lower(), head
            c.sendall(b"ECHO-ME")
            while len(rest) < 7:
                chunk = c.recv(4096)
                assert chunk, rest
                rest += chunk
        assert rest == b"ECHO-ME"
    finally:
        server.close()


class _LastWordServer(RawServer):
    """Switches, then reads until the client's end (its FIN), and only then sends its
    last bytes and closes: a WebSocket server answering a Close the client sent before
    shutting down its side."""

    def __init__(self) -> None:
        super().__init__(None)
        self.heard = b""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        self.heard = _switch(sock)
        while chunk := sock.recv(4096):
            self.heard += chunk
        sock.sendall(b"LAST-WORD")


def test_a_half_close_after_the_switch_lets_the_other_side_finish(proxy: ProxyProcess) -> None:
    """The client ends its side (FIN) after its last bytes; the server answers once it
    has seen that end. The relay closed both sides at the first end: the server never
    learnt of it, and its answer was lost (the client read b"")."""
    server = _LastWordServer()
    try:
        authority = f"127.0.0.1:{server.port}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            answer = _ask_to_switch(c, authority)
            assert answer.startswith(b"HTTP/1.1 101 "), answer
            c.sendall(b"CLIENT-CLOSE")
            c.shutdown(socket.SHUT_WR)
            rest = answer.partition(b"\r\n\r\n")[2]
            while chunk := c.recv(4096):
                rest += chunk
        assert rest == b"LAST-WORD"
        assert server.heard == b"CLIENT-CLOSE"
    finally:
        server.close()


class _TlsLastWord(RawServer):
    """Over TLS: switches, then either ends its side at once after its last bytes
    (close_notify, `ends_first`), or reads until the client's end and notes it."""

    def __init__(self, ctx: ssl.SSLContext, *, ends_first: bool) -> None:
        self.ends_first = ends_first
        self.heard = b""
        self.client_ended = threading.Event()
        super().__init__(ctx)

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        self.heard = _switch(sock)
        if self.ends_first:
            sock.sendall(b"LAST-WORD")
            assert isinstance(sock, ssl.SSLSocket)
            sock.unwrap()  # close_notify, then waits for the proxy's
            return
        while chunk := sock.recv(4096):
            self.heard += chunk
        self.client_ended.set()


def _switched(c: ssl.SSLSocket) -> bytes:
    """Ask for WebSocket on `c` (a TLS tunnel); what followed the 101 head."""
    c.sendall(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    answer = read_head(c)
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    return answer.partition(b"\r\n\r\n")[2]


def _tls_upstream(upstream: Upstream, *, ends_first: bool) -> _TlsLastWord:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream.ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return _TlsLastWord(ctx, ends_first=ends_first)


def test_over_tls_an_upstream_that_ends_after_the_switch_ends_the_clients_side(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """wss: the server's close_notify after its last bytes reaches the client as one
    (RFC 8446 6.1); nothing was passed on over TLS, and the client waited out
    --idle-timeout (120 s here: the read below timed out)."""
    server = _tls_upstream(upstream, ends_first=True)
    try:
        with tls_tunnel(proxy, server.port) as c:
            rest = _switched(c)
            while chunk := c.recv(4096):
                rest += chunk
        assert rest == b"LAST-WORD"
    finally:
        server.close()


def test_over_tls_a_client_that_ends_after_the_switch_ends_the_upstreams_side(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """wss: the client's close_notify cannot be passed on as a half-close towards a TLS
    upstream (uvloop's TLS transport has none): both sides end, rather than the server
    waiting out --idle-timeout for an end it never hears."""
    server = _tls_upstream(upstream, ends_first=False)
    try:
        with tls_tunnel(proxy, server.port) as c:
            _switched(c)
            c.sendall(b"CLIENT-CLOSE")
            with contextlib.suppress(OSError):
                c.unwrap()  # close_notify; the proxy's answers it, or the socket closes
        assert server.client_ended.wait(10), "the server never heard the client's end"
        assert server.heard == b"CLIENT-CLOSE"
    finally:
        server.close()
