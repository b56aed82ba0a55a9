"""Every wait is bounded: slow heads get 408, idle clients are let go, others keep going."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.proxy_process import EGRESS, ProxyProcess, running_proxy, tls_tunnel
from tests.rawserver import RawServer, plain_and_tls, read_head
from tests.upstream import Upstream


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_slow_head_gets_408_and_idle_client_is_closed(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(
        tmp_path / "state",
        "--head-timeout",
        "1",
        "--client-idle-timeout",
        "1",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        slow = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        idle = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        try:
            started = time.monotonic()
            slow.sendall(b"GET " + upstream.http_url("/ip").encode() + b" HTTP/1.1\r\n")
            for _ in range(3):  # trickling bytes does not extend the deadline
                time.sleep(0.3)
                slow.sendall(b"X-Slow: 1\r\n")
            # Meanwhile everyone else is served.
            with requests.Session() as s:
                r = s.get(upstream.http_url("/ip"), proxies={"http": p.url}, timeout=10)
                assert r.status_code == 200
            answer = _read_all(slow, 10)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 5
            assert _read_all(idle, 10) == b""  # closed without a word: it asked nothing
        finally:
            slow.close()
            idle.close()


def test_a_tls_handshake_never_finished_is_closed_and_said(
    tmp_path: Path, upstream: Upstream
) -> None:
    """A ClientHello begun and never finished: the tunnel closed after
    --handshake-timeout with a debug line only, which named no host."""
    with running_proxy(tmp_path / "state", "--handshake-timeout", "0.5") as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            c.sendall(b"CONNECT half.test:443 HTTP/1.1\r\nHost: half.test:443\r\n\r\n")
            assert read_head(c).startswith(b"HTTP/1.1 200 ")
            c.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a hello, cut
            assert _read_all(c, 10) == b""  # the close, after the timeout
        said = p.wait_for_log("TLS handshake with client failed")
        assert said["level"] == "warning"
        assert said["fields"]["host"] == "half.test", said
        assert "0.5 s (--handshake-timeout)" in said["fields"]["error"], said


def test_a_tunnel_the_client_sends_nothing_into_is_closed_and_said(
    tmp_path: Path, upstream: Upstream
) -> None:
    """CONNECT to a server-speaks-first service (SMTP, SSH): the proxy relays requests,
    so nothing comes; the tunnel closes after --handshake-timeout and the log says why."""
    with running_proxy(tmp_path / "state", "--handshake-timeout", "0.5") as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            c.sendall(b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n")
            assert _read_all(c, 10).startswith(b"HTTP/1.1 200 ")  # then the close
        said = p.wait_for_log("tunnel closed: the client sent nothing")
        assert said["level"] == "warning"
        fields = said["fields"]
        assert (fields["host"], fields["port"], fields["waited_s"]) == ("127.0.0.1", 25, 0.5)
        assert "server speaks first" in fields["reason"]


def test_max_connections_queues_in_the_backlog(tmp_path: Path, upstream: Upstream) -> None:
    request = (
        f"GET {upstream.http_url('/ip')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    with running_proxy(
        tmp_path / "state",
        "--max-connections",
        "1",
        "--workers",
        "1",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        first = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        second = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        try:
            first.sendall(b"GET " + upstream.http_url("/ip").encode() + b" HTTP/1.1\r\n\r\n")
            first.settimeout(10)
            assert first.recv(100).startswith(b"HTTP/1.1 200")
            second.sendall(request)
            second.settimeout(0.5)
            with pytest.raises(TimeoutError):
                second.recv(100)  # waiting in the backlog, not dropped
            first.close()
            answer = _read_all(second, 10)
            assert answer.startswith(b"HTTP/1.1 200")
        finally:
            first.close()
            second.close()


class _Listener:
    """A TCP listener on loopback whose connections a test drives by hand."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.held.append(conn)
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        """Default: hold the connection and say nothing (a TLS server that never answers)."""

    def __enter__(self) -> _Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for conn in self.held:
            conn.close()
        self.sock.close()


class _Dribbler(_Listener):
    """Reads a request, then sends a valid response head one byte every 0.2 s."""

    def serve(self, conn: socket.socket) -> None:
        threading.Thread(target=self._dribble, args=(conn,), daemon=True).start()

    def _dribble(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: " + b"p" * 60 + b"\r\n\r\nok"
        try:
            conn.settimeout(10)
            conn.recv(65536)
            for i in range(len(head)):
                if self._stop.is_set():
                    return
                conn.sendall(head[i : i + 1])
                time.sleep(0.2)
        except OSError:
            return  # the proxy gave up on us: what the test wants


def test_a_response_head_sent_a_byte_at_a_time_gets_504(tmp_path: Path, upstream: Upstream) -> None:
    """--response-timeout bounds the whole head once it has begun, not each read."""
    with (
        _Dribbler() as slow,
        running_proxy(
            tmp_path / "state", "--response-timeout", "1", upstream_ca=upstream.ca_pem_path
        ) as p,
        requests.Session() as s,
    ):
        started = time.monotonic()
        r = s.get(f"http://127.0.0.1:{slow.port}/", proxies={"http": p.url}, timeout=30)
        assert r.status_code == 504, (r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("text/plain")
        # 90 bytes at 0.2 s would take 18 s; a per-read timeout would never fire.
        assert time.monotonic() - started < 10


def test_a_destination_that_never_answers_tls_costs_other_hosts_nothing(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Connect timeouts cool the (address, host) pair, not the address: requests to
    other hosts keep every address, and the client is told of the timeout (504)."""
    with (
        _Listener() as blackhole,
        running_proxy(
            tmp_path / "state",
            "--workers",
            "1",
            "--connect-timeout",
            "0.5",
            upstream_ca=upstream.ca_pem_path,
        ) as p,
        requests.Session() as s,
    ):
        proxies = {"http": p.url, "https": p.url}
        r = s.get(
            f"https://127.0.0.1:{blackhole.port}/",
            proxies=proxies,
            timeout=30,
            verify=str(p.ca_path),
        )
        assert r.status_code == 504, (r.status_code, r.text)
        assert "timed out" in r.text, r.text
        # Every address tried for the blackhole; none is kept from the healthy upstream.
        for _ in range(6):
            ok = s.get(upstream.http_url("/ip"), proxies=proxies, timeout=30)
            assert ok.status_code == 200
        deadline = time.monotonic() + 10  # log lines are written up to 50 ms late
        while time.monotonic() < deadline:
            lines = [ln for ln in p.lines if ln["message"] == "outbound request"]
            healthy = [ln for ln in lines if f":{upstream.http_port}/" in ln["fields"]["url"]]
            if len(healthy) == 6:
                break
            time.sleep(0.05)
        assert len(healthy) == 6, healthy
        assert not [ln for ln in healthy if ln["fields"].get("queued_ms")], healthy
        assert not [ln for ln in p.lines if ln["message"] == "egress address resting"]


def _read_response(c: socket.socket) -> bytes:
    """One response with a Content-Length or chunked body, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = [ln for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
    while (
        (int(length[0].split(b":")[1]) > len(body)) if length else not body.endswith(b"0\r\n\r\n")
    ):
        chunk = c.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def _cap_descriptors(pid: int) -> None:
    """Not one descriptor more for the proxy: its next socket() or accept() is EMFILE."""
    time.sleep(0.2)  # closes of upstream sockets that ended land in the next loop turns
    held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(held) + 1)) - held)  # a descriptor gets the lowest
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={lowest_free}:{lowest_free}"], check=True)


def _get(c: socket.socket, url: str) -> bytes:
    c.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return _read_response(c)


def test_out_of_descriptors_is_a_503_and_rests_no_address(
    tmp_path: Path, upstream: Upstream
) -> None:
    """EMFILE opening an upstream socket, with no idle connection to give back, is the
    proxy's shortage, not the egress address's: the client gets a 503 with Retry-After,
    and no address is rested."""
    with running_proxy(tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            c.settimeout(10)
            # Accepted, and nothing pooled: the upstream closes after its response.
            assert _get(c, upstream.close_delimited_url(10)).startswith(b"HTTP/1.1 200")
            _cap_descriptors(p.proc.pid)
            # A new socket for an IP literal, then a name lookup (getaddrinfo needs a
            # descriptor too).
            answers = [
                _get(c, upstream.http_url("/ip")),
                _get(c, upstream.http_url("/ip", "localhost")),
            ]
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"Retry-After: 1" in answer
            assert b"Too many open files" in answer
        time.sleep(0.2)  # log lines are written up to 50 ms late
        assert not p.logs("egress address resting")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_out_of_descriptors_idle_upstreams_give_theirs_back(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    """A descriptor table full of idle upstream connections (a crawl over many hosts
    and addresses) neither stops the accept loop nor turns new requests into 503s: the
    least recently used idle connections are closed to make room, at once (a TLS one
    too: a close_notify would hold its descriptor until the server answered)."""
    url = upstream.http_url("/ip") if scheme == "http" else upstream.https_url("/ip")
    egress = [f"127.0.0.{i}" for i in range(2, 10)]
    with running_proxy(
        tmp_path / "state", "--workers", "1", egress=egress, upstream_ca=upstream.ca_pem_path
    ) as p:
        pid = p.proc.pid
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            c.settimeout(10)
            peers = [json.loads(_get(c, url).partition(b"\r\n\r\n")[2]) for _ in egress]
            assert sorted(x["peer"] for x in peers) == egress  # one idle connection each
            time.sleep(0.2)
            held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
            assert held == set(range(len(held))), sorted(held)  # no gap a socket could take
            # Not one descriptor more.
            n = len(held)
            subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={n}:{n}"], check=True)
            # A new client: its accept needs a descriptor, and so does its request (the
            # rotation's next address, 127.0.0.2, had the least recently used one).
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c2:
                c2.settimeout(10)
                answer = _get(c2, url)
                assert answer.startswith(b"HTTP/1.1 200 "), answer
                assert json.loads(answer.partition(b"\r\n\r\n")[2])["peer"] == egress[0]
                # Another upstream (a new pool key) on the first client: a new socket.
                answer = _get(c, upstream.close_delimited_url(10))
                assert answer.startswith(b"HTTP/1.1 200 "), answer
        failed = p.wait_for_log("accept failed")
        assert failed["fields"]["error"] == "Too many open files", failed
        assert failed["fields"]["idle_upstream_closed"] == 4, failed  # at least 4 of 8
        assert len(p.logs("accept failed")) == 1
        assert not p.logs("egress address resting")


class _Silent(RawServer):
    """Reads a request head and never answers; notes when the proxy lets go. A request
    for /first is answered, and the connection kept: the next one on it is not."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(tls)
        self.let_go = threading.Event()

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        head = read_head(sock)
        if head.startswith(b"GET /first "):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            head = read_head(sock)
        if not head:
            return
        sock.settimeout(30)
        try:
            sock.recv(1)  # b"" or a reset: the proxy closed its side
        except OSError:
            pass
        self.let_go.set()


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_client_that_resets_while_waiting_releases_its_upstream(
    tmp_path: Path, upstream: Upstream, scheme: str, pooled: bool
) -> None:
    """The upstream connection was held until --response-timeout (120 s) and the
    request logged as a 504; the client's reset now ends the wait. On a pooled
    connection too, where the wait is the check that the connection is not stale."""
    with (
        plain_and_tls(_Silent, upstream.ca) as servers,
        running_proxy(
            tmp_path / "state", "--workers", "1", egress=["127.0.0.2"],
            upstream_ca=upstream.ca_pem_path,
        ) as p,
    ):  # fmt: skip
        server = servers[scheme]
        c = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        target = f"127.0.0.1:{server.port}"
        paths = ["/first", "/wait"] if pooled else ["/wait"]
        if scheme == "https":
            c.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 200 ")
            ctx = ssl.create_default_context(cafile=str(p.ca_path))
            c = ctx.wrap_socket(c, server_hostname="127.0.0.1")
            heads = [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" for path in paths]
        else:
            heads = [
                f"GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n" for path in paths
            ]
        for head in heads:
            c.sendall(head.encode())
            if "/first " in head:
                got = read_head(c)
                while not got.endswith(b"\r\n\r\nok"):
                    got += c.recv(2)
                assert got.startswith(b"HTTP/1.1 200 "), got
                assert p.wait_for_log("inbound response")["fields"]["status_code"] == 200
        p.wait_for_log("outbound request", lambda ln: "/wait" in ln["fields"]["url"])
        time.sleep(0.2)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset
        assert server.let_go.wait(5), "the upstream connection was kept for the gone client"
        line = p.wait_for_log("inbound response", lambda ln: "/wait" in ln["fields"]["url"])
        error = line["fields"]["error"]
        assert error.startswith("client connection lost"), line
        assert error.count("client connection lost") == 1, line  # said once


@pytest.mark.parametrize("pooled", [False, True])
def test_out_of_descriptors_for_a_certificate(
    tmp_path: Path, upstream: Upstream, pooled: bool
) -> None:
    """A leaf certificate is loaded from a memory file, which takes a descriptor. With
    idle upstream connections, some are closed to make room and the handshake goes on;
    with none, the tunnel closes and the log says why (no "internal error" traceback)."""
    with running_proxy(tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            c.settimeout(10)
            if pooled:  # one idle connection per egress address
                for _ in EGRESS:
                    assert _get(c, upstream.http_url("/ip")).startswith(b"HTTP/1.1 200 ")
            _cap_descriptors(p.proc.pid)
            c.sendall(b"CONNECT new.test:443 HTTP/1.1\r\nHost: new.test:443\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
            client = ssl.create_default_context(cafile=str(p.state_dir / "ca.pem"))
            if pooled:
                tls = client.wrap_socket(c, server_hostname="new.test")  # takes over c
                try:
                    assert tls.getpeercert()["subjectAltName"] == (("DNS", "new.test"),)
                finally:
                    tls.close()
            else:
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    client.wrap_socket(c, server_hostname="new.test").close()
        if pooled:
            assert not p.logs("cannot make a certificate")
        else:
            failed = p.wait_for_log("cannot make a certificate")
            assert failed["fields"] == {"error": "Too many open files", "host": "new.test"}
        assert not p.logs("internal error")


@contextmanager
def _upload_client(
    p: ProxyProcess, upstream: Upstream, scheme: str
) -> Iterator[tuple[socket.socket, str]]:
    """A connection through `p` to the upstream's /upload (a TLS tunnel for https), and
    the request target to use on it."""
    if scheme == "https":
        with tls_tunnel(p, upstream.https_port) as c:
            yield c, "/upload"
        return
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
        yield c, f"http://127.0.0.1:{upstream.http_port}/upload"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_slow_steady_upload_is_not_held_to_the_response_timeout(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    """The wait for the answer begins once the request is all sent: an upload taking
    longer than --response-timeout, never idle, was a 504 "no response from upstream"
    while its bytes still flowed. A client that stops mid-body is said to have."""
    with running_proxy(
        tmp_path / "state",
        "--response-timeout",
        "1",
        "--idle-timeout",
        "2",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        with _upload_client(p, upstream, scheme) as (c, target):
            c.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            c.sendall(b"Content-Length: 6000\r\n\r\n")
            for _ in range(6):  # 2.4 s in all, a piece every 0.4 s
                time.sleep(0.4)
                c.sendall(b"x" * 1000)
            head = read_head(c)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b'"length": 6000' in head, head
        with _upload_client(p, upstream, scheme) as (c, target):
            c.sendall(f"POST {target}?stalled HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            c.sendall(b"Content-Length: 6000\r\n\r\n" + b"x" * 1000)
            line = p.wait_for_log(
                "inbound response",
                lambda ln: "stalled" in str(ln["fields"].get("url", "")),
            )
        assert line["fields"]["error"] == "client sent nothing for 2 s mid-body", line
        with _Mute() as mute:
            with _upload_client(p, upstream, "http") as (c, _):
                target = f"http://127.0.0.1:{mute.port}/"
                c.sendall(
                    f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n".encode()
                )
                for _ in range(3):
                    time.sleep(0.4)
                    c.sendall(b"x" * 1000)
                sent = time.monotonic()
                head = read_head(c)
                waited = time.monotonic() - sent
            assert head.startswith(b"HTTP/1.1 504 "), head
            # The timeout counts from the upload's end; it had fired 1 s after the head.
            assert waited >= 0.9, waited


class _Mute(RawServer):
    """Reads a request with its Content-Length body, then never answers."""

    def __init__(self) -> None:
        super().__init__(None)

    def __enter__(self) -> _Mute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        data = read_head(sock)
        found = re.search(rb"(?i)content-length: *(\d+)", data)
        assert found is not None, data
        length = int(found[1])
        got = len(data.partition(b"\r\n\r\n")[2])
        while got < length and (chunk := sock.recv(65536)):
            got += len(chunk)
        while sock.recv(65536):
            pass  # silent until the proxy gives up
