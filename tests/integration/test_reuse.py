"""What a reused (pooled) upstream connection may and may not do when its server lets
it down: a request is sent twice only when RFC 9110 allows it, and a connection that
failed is closed, never leaked.

The upstream is a raw server that answers the first request on each connection and
then misbehaves on the second: it closes without answering ("close") or says nothing
at all ("silent"). Requests carry X-Demux-Egress so that both go out from one address,
the second on the connection the first left in the pool (one worker: one pool).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.proxy_process import EGRESS, ProxyProcess, requests_session, running_proxy
from tests.rawserver import RawServer, plain_and_tls, read_head
from tests.upstream import Upstream

pytestmark = pytest.mark.timeout(60)

PIN = EGRESS[0]


class SecondRequestFails(RawServer):
    """200 to the first request on a connection; the second is read, then `mode`."""

    mode = "close"

    def __init__(self) -> None:
        super().__init__(None)
        self.lock = threading.Lock()
        self.requests: list[str] = []  # request lines, in arrival order
        self.closed_by_proxy = threading.Event()

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        first = read_head(sock)
        if not first:
            return
        with self.lock:
            self.requests.append(first.split(b"\r\n", 1)[0].decode())
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        second = read_head(sock)
        if not second:
            return
        with self.lock:
            self.requests.append(second.split(b"\r\n", 1)[0].decode())
        if self.mode == "silent":
            sock.settimeout(30)
            try:
                if sock.recv(1) == b"":
                    self.closed_by_proxy.set()  # the proxy let the connection go
            except OSError:
                self.closed_by_proxy.set()
        # "close": return without a word; the with-block closes the socket.

    def count(self, request_line: str) -> int:
        with self.lock:
            return self.requests.count(request_line)


@pytest.fixture
def server() -> Iterator[SecondRequestFails]:
    s = SecondRequestFails()
    try:
        yield s
    finally:
        s.close()


def _ask(proxy: ProxyProcess, request: bytes) -> bytes:
    """One request on a fresh client connection; everything the proxy answered."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as c:
        c.sendall(request)
        return read_head(c)


def _request(method: str, port: int, path: str) -> bytes:
    authority = f"127.0.0.1:{port}"
    body = "Content-Length: 0\r\n" if method == "POST" else ""
    return (
        f"{method} http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n"
        f"X-Demux-Egress: {PIN}\r\n{body}\r\n"
    ).encode()


def test_a_post_is_never_sent_twice_when_a_reused_connection_closes(
    tmp_path: Path, upstream: Upstream, server: SecondRequestFails
) -> None:
    with running_proxy(
        tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path
    ) as proxy:  # one worker: one pool
        assert _ask(proxy, _request("GET", server.port, "/warm")).startswith(b"HTTP/1.1 200")
        answer = _ask(proxy, _request("POST", server.port, "/order"))
        assert answer.startswith(b"HTTP/1.1 502"), (answer, server.requests)
        assert server.count("POST /order HTTP/1.1") == 1  # RFC 9110 9.2.2
        # A GET in the same spot is idempotent: sent again on a fresh connection.
        assert _ask(proxy, _request("GET", server.port, "/warm2")).startswith(b"HTTP/1.1 200")
        answer = _ask(proxy, _request("GET", server.port, "/again"))
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert server.count("GET /again HTTP/1.1") == 2


def _upstream_sockets(proxy: ProxyProcess, port: int) -> int:
    conns = psutil.Process(proxy.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def test_a_reused_connection_that_times_out_is_closed(
    tmp_path: Path, upstream: Upstream, server: SecondRequestFails
) -> None:
    server.mode = "silent"
    with running_proxy(
        tmp_path / "state",
        "--workers",
        "1",
        "--response-timeout",
        "1",
        upstream_ca=upstream.ca_pem_path,
    ) as proxy:
        assert _ask(proxy, _request("GET", server.port, "/warm")).startswith(b"HTTP/1.1 200")
        answer = _ask(proxy, _request("GET", server.port, "/silent"))
        assert answer.startswith(b"HTTP/1.1 504"), answer
        assert server.closed_by_proxy.wait(10), "the timed-out connection was never closed"
        deadline = time.monotonic() + 10
        while _upstream_sockets(proxy, server.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _upstream_sockets(proxy, server.port) == 0


BIG = 1 << 20
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"


class PoisonAfterBody(RawServer):
    """/big: a 1 MiB body with an answer nobody asked for right behind it, in the same
    write; any other request: its own answer. Keeps each connection for more."""

    def __init__(self) -> None:
        super().__init__(None)
        self.connections = 0

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        self.connections += 1
        while head := read_head(sock):
            if head.split(b" ", 2)[1].endswith(b"/big"):
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG + POISON
                )
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")


def test_bytes_left_behind_a_spliced_body_are_never_anothers_answer(tmp_path: Path) -> None:
    """A plain body is spliced to exactly its length: what the server sent after it was
    still in the kernel when the connection went back to the pool, and the next request
    on it (pipelined, or another client's) got those bytes as its answer."""
    server = PoisonAfterBody()
    try:
        with running_proxy(tmp_path / "state", "--workers", "1") as proxy:
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as c:
                    c.sendall(
                        _request("GET", server.port, "/big") + _request("GET", server.port, "/next")
                    )
                    data = b""
                    while not data.endswith((b"\r\n\r\nmine", b"POISON")):
                        chunk = c.recv(1 << 16)
                        assert chunk, data[-200:]
                        data += chunk
                assert b"POISON" not in data
                assert len(data) > BIG
        assert server.connections >= 4  # each /next on a fresh connection, not the poisoned one
    finally:
        server.close()


class JunkAfterBody(RawServer):
    """/big: a 1 MiB body (chunked over plain TCP, so that it is copied, not spliced),
    then 50 ms later an answer nobody asked for; any other request: its own answer."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        while head := read_head(sock):
            if head.split(b" ", 2)[1].endswith(b"/big"):
                if self.tls is None:
                    sock.sendall(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % BIG
                        + b"x" * BIG
                        + b"\r\n0\r\n\r\n"
                    )
                else:
                    sock.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG
                    )
                time.sleep(0.05)
                sock.sendall(POISON)
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_bytes_that_come_after_a_large_copied_body_are_never_anothers_answer(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    """A large body left reading paused on the pooled connection: what the server sent
    a moment later stayed in the kernel, unseen, and a later client's request (on its
    own connection, a second on) got it as its answer."""
    with (
        plain_and_tls(JunkAfterBody, upstream.ca) as servers,
        running_proxy(  # one address: one pool key for both clients
            tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path, egress=[PIN]
        ) as proxy,
        requests_session(proxy) as s,
    ):
        base = f"{scheme}://127.0.0.1:{servers[scheme].port}"
        for _ in range(2):
            with s.get(base + "/big", timeout=20, stream=True) as big:
                got = 0
                for piece in big.iter_content(16384):  # slowly: the proxy's buffer fills
                    got += len(piece)
                    time.sleep(0.002)
            assert got == BIG
            time.sleep(0.5)
            with requests_session(proxy) as other:
                r = other.get(base + "/next", timeout=20)
            assert r.content == b"mine", r.content


class KeepAliveFor(RawServer):
    """Says `Keep-Alive: timeout=3` and closes a connection idle that long, as Apache
    does (5 s by default); records which connection each request came on."""

    def __init__(self) -> None:
        super().__init__(None)
        self.lock = threading.Lock()
        self.connections: list[int] = []  # one entry per request: its connection's number
        self._next = 0

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        with self.lock:
            self._next += 1
            number = self._next
        sock.settimeout(3)
        try:
            while read_head(sock):
                with self.lock:
                    self.connections.append(number)
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=3, max=100\r\n"
                    b"Content-Length: 2\r\n\r\nok"
                )
        except TimeoutError:
            pass  # idle for the timeout it announced: closed


def test_a_connection_is_not_reused_past_the_servers_keep_alive_timeout(
    tmp_path: Path,
) -> None:
    """Kept for the pool's 30 s, a connection was reused at the moment its server closed
    it: a POST then met the close, a 502 (never replayed). Retired a second early."""
    server = KeepAliveFor()
    try:
        with running_proxy(tmp_path / "state", "--workers", "1") as proxy:
            for wait in (0.0, 1.0, 2.5):  # 1.0 s idle: reused; 2.5 s: past 3 - 1 s
                time.sleep(wait)
                answer = _ask(proxy, _request("POST", server.port, "/order"))
                assert answer.startswith(b"HTTP/1.1 200"), answer
        assert server.connections == [1, 1, 2], server.connections
    finally:
        server.close()


class ResetAfterAnswer(RawServer):
    """A whole keep-alive 200, then a reset: the connection dies idle in the pool."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if read_head(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# Plain only: over TLS this server's answer is lost to its reset (curl straight to it
# reads nothing either, even with the reset 20 ms later).
@pytest.mark.parametrize("scheme", ["http"])
def test_a_pooled_connection_reset_while_idle_is_not_the_clients_loss(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    """Checked out between the reset and its connection_lost, the connection failed the
    next request's write: logged "client connection lost", the client reset (a reviewer:
    80 in 300 over https, with 15 clients at once)."""
    with (
        plain_and_tls(ResetAfterAnswer, upstream.ca) as servers,
        running_proxy(
            tmp_path / "state", "--workers", "1", egress=[PIN], upstream_ca=upstream.ca_pem_path
        ) as proxy,
    ):
        url = f"{scheme}://127.0.0.1:{servers[scheme].port}/"

        def client(_: int) -> list[int]:
            with requests_session(proxy) as s:
                return [s.get(url, timeout=20).status_code for _ in range(4)]

        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = [code for codes in pool.map(client, range(24)) for code in codes]
        assert statuses == [200] * len(statuses), statuses.count(200)
        assert not [ln for ln in proxy.logs("inbound response") if ln["fields"].get("error")]
