"""Trailer fields pass on both ways, except those a trailer must not carry (RFC 9110
6.5.1) and the hop-by-hop ones: a Proxy-Authorization in a request's trailer section
never reaches the server, framing fields in a response's never reach the client."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy_process import ProxyProcess, running_proxy
from tests.rawserver import RawServer
from tests.upstream import Upstream

pytestmark = pytest.mark.timeout(60)


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(1)  # byte by byte: never read past the message
        if not chunk:
            break
        data += chunk
    return data


class ChunkedBothWays(RawServer):
    """Records each chunked request (head, body and trailers: it ends in an empty line
    after the last chunk); answers chunked, with trailers of every kind."""

    def __init__(self) -> None:
        super().__init__(None)
        self.received: list[bytes] = []
        self.lock = threading.Lock()

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        message = _read_until(sock, b"\r\n\r\n")
        message += _read_until(sock, b"\r\n0\r\n")  # this test's body: one chunk
        while (line := _read_until(sock, b"\r\n")) not in (b"\r\n", b""):
            message += line  # the trailer section, up to its empty line
        with self.lock:
            self.received.append(message)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-Sum: 42\r\nContent-Length: 999\r\n"
            b"Proxy-Authenticate: Basic\r\nConnection: close\r\nHost: evil.test\r\n\r\n"
        )


@pytest.fixture
def server() -> Iterator[ChunkedBothWays]:
    s = ChunkedBothWays()
    try:
        yield s
    finally:
        s.close()


def _exchange(proxy: ProxyProcess, port: int) -> bytes:
    authority = f"127.0.0.1:{port}"
    request = (
        f"POST http://{authority}/up HTTP/1.1\r\nHost: {authority}\r\n"
        "Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nConnection: close\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-Checksum: abc\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
        "Host: evil.test\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(request)
        data = b""
        while chunk := c.recv(65536):  # Connection: close: the proxy closes after it
            data += chunk
        return data


def test_trailers_pass_on_without_credentials_or_framing(
    tmp_path: Path, upstream: Upstream, server: ChunkedBothWays
) -> None:
    with running_proxy(tmp_path / "state", upstream_ca=upstream.ca_pem_path) as proxy:
        answer = _exchange(proxy, server.port)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nTrailer: X-Sum\r\n" in head  # end-to-end (RFC 9110 6.6.2): it was dropped
    assert b"2\r\nok\r\n0\r\n" in body
    response_trailers = body.split(b"\r\n0\r\n", 1)[1]
    assert b"X-Sum: 42\r\n" in response_trailers
    for gone in (b"Content-Length", b"Proxy-Authenticate", b"Connection", b"Host"):
        assert gone not in response_trailers, response_trailers
    (seen,) = server.received
    assert b"\r\nTrailer: X-Checksum\r\n" in seen
    request_trailers = seen.split(b"\r\n0\r\n", 1)[1]
    assert b"X-Checksum: abc\r\n" in request_trailers
    assert b"Proxy-Authorization" not in request_trailers, seen
    assert b"c2VjcmV0" not in seen
    assert b"evil.test" not in request_trailers
