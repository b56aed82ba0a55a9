"""What a user of the proxy sees, end to end, over plain and intercepted (https) HTTP.

A real proxy process (tests/proxy_process.py), the real upstream (tests/upstream.py) and
real clients: curl (always ``--cacert`` with the proxy's CA, never ``-k``), requests
(``verify=`` the proxy's CA), and raw sockets where the exact bytes on the wire matter
(keep-alive after HEAD/204/304/502, pipelining, HTTP/1.0, malformed requests, header
case and order). Raw https connections do what a client does: CONNECT, then TLS
verified against the proxy's CA, then origin-form requests inside the tunnel.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.proxy_process import (
    EGRESS,
    ProxyProcess,
    requests_session,
    running_proxy,
    tls_tunnel,
)
from tests.rawserver import RawServer, plain_and_tls, read_head
from tests.upstream import Upstream, expected_bytes, expected_sha256, iter_expected_bytes

pytestmark = pytest.mark.timeout(60)

SCHEMES = ("http", "https")
MiB = 1024 * 1024
SOCK_TIMEOUT = 10.0
CURL_MAX_TIME = "30"
LOG_KEYS = ["fields", "level", "timestamp", "message"]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
CREDENTIALS = "Zm9vOmJhcg=="  # base64("foo:bar")


# --------------------------------------------------------------------------- helpers


def _url(up: Upstream, scheme: str, path: str, host: str = "127.0.0.1") -> str:
    return up.http_url(path, host) if scheme == "http" else up.https_url(path, host)


def _port(up: Upstream, scheme: str) -> int:
    return up.http_port if scheme == "http" else up.https_port


def _dead_port() -> int:
    """A port nothing listens on (bound then released: connecting to it is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _seen_paths(up: Upstream) -> list[str]:
    return [seen["path"] for seen in list(up.seen_headers)]


def _rotation(peers: Sequence[str]) -> list[str]:
    """The peers a strict round-robin over EGRESS would give, starting where `peers` does."""
    start = EGRESS.index(peers[0])
    return [EGRESS[(start + i) % len(EGRESS)] for i in range(len(peers))]


def _curl(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "curl",
            "-q",  # ignore any ~/.curlrc
            "-sS",
            "--max-time",
            CURL_MAX_TIME,
            "--proxy",
            proxy.url,
            "--cacert",
            str(proxy.ca_path),
            *args,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )


def _parse_dump(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-cased names) of the LAST head in a `curl -D` dump.

    Through a proxy, https dumps start with the CONNECT answer; interim 1xx heads too.
    """
    blocks = [b for b in raw.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
    assert blocks, f"no response head in {raw!r}"
    lines = blocks[-1].decode("latin-1").split("\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


@dataclass
class RawResponse:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def tokens(self, name: str) -> set[str]:
        found = set()
        for n, v in self.headers:
            if n.lower() == name.lower():
                found |= {t.strip().lower() for t in v.split(",") if t.strip()}
        return found


class RawConn:
    """One client connection to the proxy with our own minimal HTTP/1.1 reader."""

    def __init__(self, sock: socket.socket, authority: str, prefix: str) -> None:
        self.sock = sock
        self.authority = authority
        self.prefix = prefix  # "http://host:port" (absolute-form) or "" (in a tunnel)
        self.buf = bytearray()
        self.eof = False

    def build(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        version: str = "1.1",
        authority: str | None = None,
    ) -> bytes:
        """A request head; `authority` targets another http origin (absolute-form only)."""
        host = authority or self.authority
        prefix = f"http://{authority}" if authority else self.prefix
        lines = [f"{method} {prefix}{path} HTTP/{version}", f"Host: {host}"]
        lines += [f"{n}: {v}" for n, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(256 * 1024)
        except (ssl.SSLEOFError, ConnectionResetError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _until(self, delim: bytes, what: str) -> bytes:
        while (i := self.buf.find(delim)) < 0:
            assert self._fill(), f"connection closed before {what}; got {bytes(self.buf)!r}"
        out = bytes(self.buf[:i])
        del self.buf[: i + len(delim)]
        return out

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._fill(), f"connection closed {n - len(self.buf)} bytes short of body"
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def closed_by_peer(self) -> bool:
        """True when the proxy closed the connection (nothing more arrives)."""
        try:
            extra = self.read_to_eof()
        except TimeoutError:
            return False
        assert extra == b"", f"unexpected bytes after the response: {extra[:200]!r}"
        return True

    def read_head(self) -> RawResponse:
        head = self._until(b"\r\n\r\n", "a response head").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        m = re.fullmatch(r"HTTP/(1\.[01]) (\d{3})(?: .*)?", status_line)
        assert m, f"not a status line: {status_line[:200]!r}"
        headers = []
        for line in lines:
            name, sep, value = line.partition(":")
            assert sep, f"malformed header line {line!r}"
            headers.append((name, value.strip()))
        return RawResponse(m.group(1), int(m.group(2)), headers, b"")

    def read_response(self, method: str = "GET") -> RawResponse:
        """The next final response (1xx skipped), its body framed per RFC 9112 section 6."""
        resp = self.read_head()
        while 100 <= resp.status < 200:
            resp = self.read_head()
        if method in ("HEAD", "CONNECT") or resp.status in (204, 304):
            return resp
        if "chunked" in resp.tokens("transfer-encoding"):
            body = bytearray()
            while True:
                size_line = self._until(b"\r\n", "a chunk size").decode("latin-1")
                size = int(size_line.split(";")[0].strip(), 16)
                if size == 0:
                    while self._until(b"\r\n", "the trailers"):
                        pass
                    break
                body += self._exact(size)
                assert self._exact(2) == b"\r\n", "chunk not followed by CRLF"
            resp.body = bytes(body)
        elif (length := resp.header("content-length")) is not None:
            resp.body = self._exact(int(length))
        else:
            resp.body = self.read_to_eof()
        return resp

    def roundtrip(self, method: str, path: str, **kw: Any) -> RawResponse:
        self.send(self.build(method, path, **kw))
        return self.read_response(method)


@contextmanager
def _raw(
    proxy: ProxyProcess,
    scheme: str,
    port: int,
    host: str = "127.0.0.1",
    connect_headers: Sequence[tuple[str, str]] = (),
) -> Iterator[RawConn]:
    """A raw client connection to the proxy for origin `scheme://host:port`."""
    authority = f"{host}:{port}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
        if scheme == "http":
            yield RawConn(sock, authority, prefix=f"http://{authority}")
            return
        plain = RawConn(sock, authority, prefix="")
        extra = "".join(f"{n}: {v}\r\n" for n, v in connect_headers)
        plain.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode())
        answer = plain.read_response("CONNECT")
        assert answer.status == 200, f"CONNECT answered {answer.status}"
        assert not plain.buf, "bytes after the CONNECT answer, before TLS"
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            yield RawConn(tls, authority, prefix="")


def _wait_responses(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    """The first `count` "inbound response" lines (waiting for them)."""
    lines: list[dict[str, Any]] = []
    for _ in range(count):
        sids = {line["fields"]["session_id"] for line in lines}
        lines.append(
            proxy.wait_for_log(
                "inbound response", lambda ln, sids=sids: ln["fields"]["session_id"] not in sids
            )
        )
    return lines


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def strict_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[ProxyProcess]:
    """A proxy WITHOUT --allow-private: loopback destinations are refused."""
    with running_proxy(
        tmp_path_factory.mktemp("strict-state"),
        upstream_ca=upstream.ca_pem_path,
        allow_private=False,
    ) as p:
        yield p


@pytest.fixture
def fresh_proxy(tmp_path: Path, upstream: Upstream) -> Iterator[ProxyProcess]:
    """A proxy of its own, so that its log holds this test's requests only."""
    with running_proxy(tmp_path / "state", upstream_ca=upstream.ca_pem_path) as p:
        yield p


# ------------------------------------------------------------ 1. bodies


@pytest.mark.parametrize("size", [0, 1, 10 * MiB], ids=["0B", "1B", "10MiB"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_download_byte_exact_curl(
    proxy: ProxyProcess, upstream: Upstream, tmp_path: Path, scheme: str, size: int
) -> None:
    dump = tmp_path / "head"
    res = _curl(proxy, "-D", str(dump), _url(upstream, scheme, f"/bytes/{size}"))
    assert res.returncode == 0, res.stderr
    status, headers = _parse_dump(dump.read_bytes())
    assert status == 200
    assert len(res.stdout) == size
    assert _sha(res.stdout) == expected_sha256(size)
    assert headers["x-sha256"] == expected_sha256(size)
    assert headers["content-length"] == str(size)


@pytest.mark.parametrize("size", [0, 1, 10 * MiB], ids=["0B", "1B", "10MiB"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_download_byte_exact_requests(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, size: int
) -> None:
    digest = hashlib.sha256()
    received = 0
    with (
        requests_session(proxy) as s,
        s.get(_url(upstream, scheme, f"/bytes/{size}"), stream=True) as r,
    ):
        assert r.status_code == 200
        for data in r.iter_content(256 * 1024):
            digest.update(data)
            received += len(data)
        headers = r.headers
    assert received == size
    assert digest.hexdigest() == expected_sha256(size)
    assert headers["X-Sha256"] == expected_sha256(size)
    assert headers["Content-Length"] == str(size)


@pytest.mark.parametrize("size", [0, 1, 1_000_003])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunked_download_byte_exact(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, size: int
) -> None:
    with requests_session(proxy) as s, s.get(_url(upstream, scheme, f"/chunked/{size}")) as r:
        assert r.status_code == 200
        body = r.content
        assert r.headers["X-Sha256"] == expected_sha256(size)
    assert len(body) == size
    assert body == expected_bytes(size)


@pytest.mark.parametrize("mode", ["content-length", "chunked"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_upload_5mib_byte_exact(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, mode: str
) -> None:
    size = 5 * MiB
    # bytes -> Content-Length; a generator -> Transfer-Encoding: chunked (requests' rule).
    data: Any = (
        expected_bytes(size) if mode == "content-length" else iter_expected_bytes(size, 100_000)
    )
    with requests_session(proxy) as s, s.post(_url(upstream, scheme, "/upload"), data=data) as r:
        assert r.status_code == 200, r.text
        info = r.json()
    assert info == {
        "length": size,
        "sha256": expected_sha256(size),
        "chunked": mode == "chunked",
        "expect": None,
    }


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("listener", ["raw", "raw-https"])
def test_close_delimited_response_arrives_whole(
    proxy: ProxyProcess, upstream: Upstream, tmp_path: Path, listener: str, version: str
) -> None:
    size = MiB + 3
    path = f"/close-delimited/{size}" + ("?version=1.1" if version == "1.1" else "")
    url = upstream.raw_url(path) if listener == "raw" else upstream.raw_https_url(path)
    dump = tmp_path / "head"
    res = _curl(proxy, "-D", str(dump), url)
    assert res.returncode == 0, res.stderr
    status, headers = _parse_dump(dump.read_bytes())
    assert status == 200
    assert headers["x-sha256"] == expected_sha256(size)
    assert len(res.stdout) == size
    assert _sha(res.stdout) == expected_sha256(size)


# ------------------------------------------------------------ 2. HEAD, 204/304, Expect


@pytest.mark.parametrize("scheme", SCHEMES)
def test_head_curl(proxy: ProxyProcess, upstream: Upstream, scheme: str) -> None:
    res = _curl(proxy, "-I", _url(upstream, scheme, "/head"))
    assert res.returncode == 0, res.stderr
    status, headers = _parse_dump(res.stdout)
    assert status == 200
    assert headers["content-length"] == "1234"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_head_then_next_request_on_same_connection(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        head = c.roundtrip("HEAD", "/head")
        assert head.status == 200
        assert head.header("content-length") == "1234"
        # A body after the HEAD answer would show up as garbage in front of this response.
        nxt = c.roundtrip("GET", "/ip")
        assert nxt.status == 200
        assert json.loads(nxt.body)["peer"] in EGRESS
    with requests_session(proxy) as s:
        with s.head(_url(upstream, scheme, "/head")) as r:
            assert r.status_code == 200
            assert r.headers["Content-Length"] == "1234"
            assert r.content == b""
        with s.get(_url(upstream, scheme, "/head")) as r:
            assert r.status_code == 200
            assert r.content == b"x" * 1234


@pytest.mark.parametrize("scheme", SCHEMES)
def test_204_304_bodiless_and_connection_reusable(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        r204 = c.roundtrip("GET", "/status/204")
        assert r204.status == 204
        r304 = c.roundtrip("GET", "/status/304")
        assert r304.status == 304
        r200 = c.roundtrip("GET", "/status/200")
        assert (r200.status, r200.body) == (200, b"status 200")
        ip = c.roundtrip("GET", "/ip")
        assert ip.status == 200
        assert json.loads(ip.body)["peer"] in EGRESS


@pytest.mark.parametrize("scheme", SCHEMES)
def test_expect_100_continue_upload_curl(
    proxy: ProxyProcess, upstream: Upstream, tmp_path: Path, scheme: str
) -> None:
    size = MiB + 17
    payload = tmp_path / "payload.bin"
    payload.write_bytes(expected_bytes(size))
    res = _curl(
        proxy,
        "-v",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{payload}",
        _url(upstream, scheme, "/upload"),
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "length": size,
        "sha256": expected_sha256(size),
        "chunked": False,
        "expect": "100-continue",
    }
    # curl got the interim answer (instead of sending the body blindly after its 1 s wait).
    assert re.search(rb"< HTTP/1\.1 100 Continue", res.stderr), res.stderr.decode()[-2000:]


# ------------------------------------------------------------ 3. upstream errors


@pytest.mark.parametrize("scheme", SCHEMES)
def test_refused_upstream_is_502_plain_text(proxy: ProxyProcess, scheme: str) -> None:
    port = _dead_port()
    with requests_session(proxy) as s, s.get(f"{scheme}://127.0.0.1:{port}/") as r:
        assert r.status_code == 502
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "refused" in r.text.lower()


@pytest.mark.parametrize("host", ["a..b.test", "a" * 64 + ".test"])
def test_a_host_name_with_a_bad_label_is_502_plain_text(proxy: ProxyProcess, host: str) -> None:
    """IDNA refuses an empty or over-long label before any lookup is sent: the client
    gets the reason, not a reset (and the proxy no internal error)."""
    with _raw(proxy, "http", 80, host=host) as c:
        resp = c.roundtrip("GET", "/")
        assert resp.status == 502, (resp.status, resp.body)
        assert b"not a valid host name" in resp.body
    assert not [ln for ln in proxy.lines if ln["message"] == "internal error"]


def test_refused_upstream_curl_http(proxy: ProxyProcess) -> None:
    port = _dead_port()
    res = _curl(proxy, "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/")
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition(b"\n")
    assert code == b"502"
    assert b"refused" in body.lower()


def test_untrusted_upstream_certificate_is_502_without_upstream_data(
    proxy: ProxyProcess, untrusted_upstream: Upstream
) -> None:
    size = 4321
    path = f"/bytes/{size}"
    with requests_session(proxy) as s, s.get(untrusted_upstream.https_url(path)) as r:
        assert r.status_code == 502
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "X-Sha256" not in r.headers
        assert expected_bytes(size)[:64] not in r.content
        assert len(r.content) < size
    # The request itself never reached the impostor.
    assert path not in _seen_paths(untrusted_upstream)


def test_private_destination_refused_http(strict_proxy: ProxyProcess, upstream: Upstream) -> None:
    paths = ["/ip?probe=strict-literal", "/ip?probe=strict-localhost"]
    with requests_session(strict_proxy) as s:
        for path, host in zip(paths, ["127.0.0.1", "localhost"], strict=True):
            with s.get(upstream.http_url(path, host)) as r:
                assert r.status_code == 403, (host, r.status_code, r.text)
                assert r.headers["Content-Type"].startswith("text/plain")
    seen = _seen_paths(upstream)
    assert not [p for p in paths if p in seen]


def test_an_ipv6_literal_is_judged_before_its_family(
    strict_proxy: ProxyProcess, proxy: ProxyProcess, upstream: Upstream
) -> None:
    """With IPv4 egress only, [::1] or [fe80::1] (link-local) was a 502 "no IPv4
    address": the refusal is the answer, said as for 127.0.0.1. Allowed, the 502 says
    what is missing."""
    port = upstream.http_port
    with requests_session(strict_proxy) as s:
        for host in ("[::1]", "[fe80::1]", "[::ffff:127.0.0.1]"):
            with s.get(f"http://{host}:{port}/ip") as r:
                assert r.status_code == 403, (host, r.status_code, r.text)
                assert "--allow-private" in r.text, r.text
    with requests_session(proxy) as s, s.get(f"http://[::1]:{port}/ip") as r:
        assert r.status_code == 502
        assert r.text == "::1 is an IPv6 address, and no egress address is IPv6\n"


def test_a_mapped_ipv4_literal_with_ipv6_egress_only_is_said_to_need_ipv4(
    tmp_path: Path, upstream: Upstream
) -> None:
    """[::ffff:127.0.0.1] goes over IPv4: with IPv6 egress alone, the 502 said it was
    "an IPv6 address, and no egress address is IPv6", beside an IPv6 egress. The literal
    is known by its IPv4 (as budgets and the pool know it), and the 502 names it so."""
    port = upstream.http_port
    url = f"http://[::ffff:127.0.0.1]:{port}/ip"
    with (
        running_proxy(tmp_path / "state", "--workers", "1", egress=["::1"]) as p,
        requests_session(p) as s,
        s.get(url) as r,
    ):
        assert r.status_code == 502
        assert r.text == "127.0.0.1 is an IPv4 address, and no egress address is IPv4\n"


def test_private_destination_refused_https_at_connect(
    strict_proxy: ProxyProcess, upstream: Upstream
) -> None:
    path = "/ip?probe=strict-https"
    res = _curl(strict_proxy, "-w", "%{http_connect}", upstream.https_url(path))
    assert res.returncode != 0  # curl: CONNECT tunnel failed
    assert res.stdout.strip() == b"403"
    assert path not in _seen_paths(upstream)


# ------------------------------------------------------------ 4. keep-alive after 502


def test_connection_serves_next_request_after_502_http(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    dead = _dead_port()
    with _raw(proxy, "http", dead) as c:
        bad = c.roundtrip("GET", "/")
        assert bad.status == 502
        assert "close" not in bad.tokens("connection")
        good = c.roundtrip("GET", "/ip", authority=f"127.0.0.1:{upstream.http_port}")
        assert good.status == 200
        assert json.loads(good.body)["peer"] in EGRESS


def test_tunnel_serves_next_request_after_502_https(proxy: ProxyProcess) -> None:
    with _raw(proxy, "https", _dead_port()) as c:
        first = c.roundtrip("GET", "/")
        assert first.status == 502
        assert "close" not in first.tokens("connection")
        second = c.roundtrip("GET", "/again")
        assert second.status == 502
        assert b"refused" in second.body.lower()


def test_requests_session_after_502(proxy: ProxyProcess, upstream: Upstream) -> None:
    with requests_session(proxy) as s:
        with s.get(f"http://127.0.0.1:{_dead_port()}/") as r:
            assert r.status_code == 502
        with s.get(upstream.http_url("/ip")) as r:
            assert r.status_code == 200
            assert r.json()["peer"] in EGRESS


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_method_llhttp_does_not_know_is_relayed_as_written(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """Any token is a method, case-sensitive (RFC 9110 9.1): BAN (Varnish), one of
    IANA's registry and a lower-case get reach the server as the client wrote them."""
    for method in ("BAN", "UPDATEREDIRECTREF", "get"):
        path = f"/extension-method-{scheme}-{method}"
        url = upstream.raw_url(path) if scheme == "http" else upstream.raw_https_url(path)
        res = _curl(proxy, "-X", method, "-w", "%{http_code}", url)
        assert res.returncode == 0, res.stderr
        assert res.stdout == b"not found\n404"  # the server's answer, whole
        seen = [s["method"] for s in list(upstream.seen_headers) if s["path"] == path]
        assert seen == [method]


# ------------------------------------------------------------ 5. hop-by-hop


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hop_by_hop_headers_do_not_reach_upstream(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    sent = [
        ("X-First", "one"),
        ("Connection", "X-Custom"),
        ("X-Custom", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", f"Basic {CREDENTIALS}"),
        ("TE", "trailers"),
        ("x-KEEP-me", "Yes"),
        ("X-Last", "z"),
    ]
    port = _port(upstream, scheme)
    with _raw(proxy, scheme, port) as c:
        resp = c.roundtrip("GET", "/headers", headers=sent)
    assert resp.status == 200
    seen = [tuple(pair) for pair in json.loads(resp.body)]
    names = {name.lower() for name, _ in seen}
    hop = {"connection", "x-custom", "keep-alive", "proxy-connection", "proxy-authorization", "te"}
    assert not names & hop, seen
    assert not [v for _, v in seen if CREDENTIALS in v]
    e2e = [(n, v) for n, v in seen if n.lower() in {"x-first", "x-keep-me", "x-last"}]
    assert e2e == [("X-First", "one"), ("x-KEEP-me", "Yes"), ("X-Last", "z")]
    assert [v for n, v in seen if n.lower() == "host"] == [f"127.0.0.1:{port}"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_upgrade_to_anything_but_websocket_goes_on_as_plain_http(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """curl --http2 asks for h2c. It was forwarded (without its HTTP2-Settings), and a
    101 would have made the client connection a blind HTTP/2 relay: no rotation, no
    rules, no log for the requests after it."""
    sent = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
    ]
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        first = c.roundtrip("GET", "/headers", headers=sent)
        second = c.roundtrip("GET", "/ip")  # the same client connection, still HTTP/1.1
    assert first.status == 200
    names = {name.lower() for name, _ in json.loads(first.body)}
    assert not names & {"connection", "upgrade", "http2-settings"}, first.body
    assert second.status == 200 and json.loads(second.body)["peer"] in EGRESS


# ------------------------------------------------------------ 6. rotation


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_session_rotates_egress(proxy: ProxyProcess, upstream: Upstream, scheme: str) -> None:
    peers = []
    with requests_session(proxy) as s:
        for _ in range(8):
            with s.get(_url(upstream, scheme, "/ip")) as r:
                assert r.status_code == 200
                peers.append(r.json()["peer"])
    assert peers[0] in EGRESS
    assert peers == _rotation(peers)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_upstream_connections_reused_per_egress(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    answers = []
    with requests_session(proxy) as s:
        for _ in range(12):
            with s.get(_url(upstream, scheme, "/ip")) as r:
                assert r.status_code == 200
                answers.append(r.json())
    warm, hot = answers[:4], answers[4:]
    assert {a["peer"] for a in warm} == set(EGRESS)
    for i in range(4):
        assert hot[i]["peer"] == hot[i + 4]["peer"]
        assert hot[i]["connection_id"] == hot[i + 4]["connection_id"], hot
    # Once warm, no new upstream connection: every id was already in use during warm-up...
    warm_ids = {a["peer"]: a["connection_id"] for a in warm}
    assert {a["connection_id"] for a in hot} <= set(warm_ids.values())
    # ...and each egress address keeps its own connection.
    assert all(warm_ids[a["peer"]] == a["connection_id"] for a in hot)
    assert len(set(warm_ids.values())) == 4


# ------------------------------------------------------------ 7. pipelining, HTTP/1.0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pipelined_requests_answered_in_order(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        c.send(c.build("GET", "/ip?n=0") + c.build("GET", "/bytes/777") + c.build("GET", "/ip?n=2"))
        first = c.read_response()
        middle = c.read_response()
        last = c.read_response()
    assert [first.status, middle.status, last.status] == [200, 200, 200]
    assert middle.body == expected_bytes(777)
    peer0, peer2 = json.loads(first.body)["peer"], json.loads(last.body)["peer"]
    assert peer0 in EGRESS
    assert peer2 == EGRESS[(EGRESS.index(peer0) + 2) % len(EGRESS)]


def test_pipelined_three_ip_requests_rotate(proxy: ProxyProcess, upstream: Upstream) -> None:
    with _raw(proxy, "http", upstream.http_port) as c:
        c.send(b"".join(c.build("GET", "/ip") for _ in range(3)))
        answers = [c.read_response() for _ in range(3)]
    assert [a.status for a in answers] == [200] * 3
    peers = [json.loads(a.body)["peer"] for a in answers]
    assert peers[0] in EGRESS
    assert peers == _rotation(peers)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_http10_client_gets_body_then_close(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        resp = c.roundtrip("GET", "/ip", version="1.0")
        assert resp.status == 200
        assert json.loads(resp.body)["peer"] in EGRESS
        assert c.closed_by_peer()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_http10_keep_alive_client_connection_stays_open(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    ka = [("Connection", "keep-alive")]
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        first = c.roundtrip("GET", "/bytes/100", version="1.0", headers=ka)
        assert first.status == 200
        assert first.body == expected_bytes(100)
        # An HTTP/1.0 client only keeps the connection if the answer says keep-alive.
        assert "keep-alive" in first.tokens("connection")
        assert first.header("content-length") == "100"
        second = c.roundtrip("GET", "/ip", version="1.0", headers=ka)
        assert second.status == 200
        assert json.loads(second.body)["peer"] in EGRESS


@pytest.mark.parametrize("scheme", SCHEMES)
def test_http10_client_never_gets_chunked(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    size = 100_003
    with _raw(proxy, scheme, _port(upstream, scheme)) as c:
        resp = c.roundtrip("GET", f"/chunked/{size}", version="1.0")
        assert resp.status == 200
        assert "chunked" not in resp.tokens("transfer-encoding")
        assert resp.body == expected_bytes(size)


# ------------------------------------------------------------ 8. malformed requests


def _malformed(case: str, port: int) -> bytes:
    authority = f"127.0.0.1:{port}"
    if case == "cl-and-te":
        return (
            f"POST http://{authority}/upload?probe=smuggle HTTP/1.1\r\nHost: {authority}\r\n"
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode()
    if case == "garbage":
        return b"}{ this is not http \x01\x02\r\n\r\n"
    if case == "origin-form":
        return f"GET /ip?probe=origin-form HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    assert case == "huge-head"
    filler = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(70))  # ~70 KiB
    return f"GET http://{authority}/ip HTTP/1.1\r\nHost: {authority}\r\n{filler}\r\n".encode()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_connection_naming_content_length_keeps_the_body_framed(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """A Connection token never removes Content-Length: else the body, here itself a
    request, would reach the server as the next request on the connection (smuggling)."""
    port = _port(upstream, scheme)
    authority = f"127.0.0.1:{port}"
    inner = f"GET /ip?probe=conn-cl-smuggled-{scheme} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    body = inner.encode()
    with _raw(proxy, scheme, port) as c:
        prefix = f"http://{authority}" if scheme == "http" else ""
        c.send(
            f"POST {prefix}/upload HTTP/1.1\r\nHost: {authority}\r\n"
            f"Connection: content-length\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        resp = c.read_response("POST")
        assert resp.status == 200, (resp.status, resp.body)
        assert json.loads(resp.body)["length"] == len(body)
        # The connection still serves the next request.
        assert c.roundtrip("GET", "/ip").status == 200
    assert f"/ip?probe=conn-cl-smuggled-{scheme}" not in _seen_paths(upstream)


@pytest.mark.parametrize(
    ("case", "status"),
    [("cl-and-te", 400), ("garbage", 400), ("origin-form", 400), ("huge-head", 431)],
)
def test_malformed_request_4xx_then_close(
    proxy: ProxyProcess, upstream: Upstream, case: str, status: int
) -> None:
    with _raw(proxy, "http", upstream.http_port) as c:
        try:
            c.send(_malformed(case, upstream.http_port))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before reading everything
        resp = c.read_response()
        assert resp.status == status, (resp.status, resp.body)
        assert c.closed_by_peer()
    assert "/upload?probe=smuggle" not in _seen_paths(upstream)
    assert "/ip?probe=origin-form" not in _seen_paths(upstream)
    # The proxy keeps serving everyone else.
    with requests_session(proxy) as s, s.get(upstream.http_url("/ip")) as r:
        assert r.status_code == 200
        assert r.json()["peer"] in EGRESS


# ------------------------------------------------------------ 9. JSON logs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_json_log_lines_per_request(
    fresh_proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    peers = []
    with requests_session(fresh_proxy) as s:
        for _ in range(2):
            with s.get(_url(upstream, scheme, "/ip")) as r:
                assert r.status_code == 200
                peers.append(r.json()["peer"])
    responses = _wait_responses(fresh_proxy, 2)
    requests_ = fresh_proxy.logs("outbound request")
    assert len(requests_) == 2
    url = f"{scheme}://127.0.0.1:{_port(upstream, scheme)}/ip"
    sids = []
    for out, peer in zip(requests_, peers, strict=True):
        f = out["fields"]
        assert type(f["session_id"]) is int
        assert f["interface"] == peer  # the address the upstream saw
        assert (f["method"], f["type"], f["url"]) == ("GET", "request", url)
        sids.append(f["session_id"])
    assert len(set(sids)) == 2
    by_sid = {line["fields"]["session_id"]: line for line in responses}
    assert set(by_sid) == set(sids)
    for out in requests_:
        f = by_sid[out["fields"]["session_id"]]["fields"]
        assert f["interface"] == out["fields"]["interface"]
        assert (f["method"], f["type"], f["url"], f["status_code"]) == (
            "GET",
            "response",
            url,
            200,
        )
    for line in [*requests_, *responses]:
        assert list(line) == LOG_KEYS
        assert line["level"] == "info"
        assert TIMESTAMP.match(line["timestamp"]), line["timestamp"]


def test_every_log_line_is_json_with_the_four_keys(
    fresh_proxy: ProxyProcess, upstream: Upstream
) -> None:
    with requests_session(fresh_proxy) as s, s.get(f"http://127.0.0.1:{_dead_port()}/") as r:
        assert r.status_code == 502
    with requests_session(fresh_proxy) as s, s.get(upstream.https_url("/ip")) as r:
        assert r.status_code == 200
    _wait_responses(fresh_proxy, 2)
    assert fresh_proxy.raw_lines
    for raw in list(fresh_proxy.raw_lines):
        line = json.loads(raw)
        assert list(line) == LOG_KEYS, raw
        assert TIMESTAMP.match(line["timestamp"]), raw


def test_proxy_credentials_never_logged(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(
        tmp_path / "state", "--log-level", "debug", upstream_ca=upstream.ca_pem_path
    ) as p:
        authed = f"http://foo:bar@127.0.0.1:{p.port}"
        with requests_session(p, proxy_url=authed) as s:
            for url in (upstream.http_url("/ip"), upstream.https_url("/ip")):
                with s.get(url) as r:
                    assert r.status_code == 200
        auth = [("Proxy-Authorization", f"Basic {CREDENTIALS}")]
        with _raw(p, "http", upstream.http_port) as c:
            assert c.roundtrip("GET", "/ip", headers=auth).status == 200
        with _raw(p, "https", upstream.https_port, connect_headers=auth) as c:
            assert c.roundtrip("GET", "/ip", headers=auth).status == 200
        _wait_responses(p, 4)
    # The proxy has exited: every line it wrote is in raw_lines.
    assert len(p.logs("inbound response")) == 4
    leaks = [ln for ln in p.raw_lines if CREDENTIALS in ln or "foo:bar" in ln]
    assert not leaks


class _RequestLines(RawServer):
    """Answers 204 to each request; keeps the request-lines it received."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        while head := read_head(sock):
            self.seen.append(head.split(b"\r\n", 1)[0].decode())
            self.heads.append(head)
            sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    heads: list[bytes]

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.heads = []
        super().__init__(tls)


class _NoContentWithLength(RawServer):
    """Answers each request 204 with a Content-Length, which RFC 9110 8.6 forbids."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        while read_head(sock):
            sock.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Kept: 1\r\n\r\n")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_204_goes_on_without_a_content_length(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """A 204 never carries Content-Length (RFC 9110 8.6); the upstream's is dropped, as a
    1xx's is, and the client connection serves the next request."""
    with plain_and_tls(_NoContentWithLength, upstream.ca) as servers:
        port = servers[scheme].port
        with ExitStack() as stack:
            if scheme == "http":
                c = stack.enter_context(socket.create_connection(("127.0.0.1", proxy.port)))
                target = f"http://127.0.0.1:{port}/"
            else:
                c = stack.enter_context(tls_tunnel(proxy, port))
                target = "/"
            c.settimeout(10)
            for _ in range(2):
                c.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                head = read_head(c)
                assert head.startswith(b"HTTP/1.1 204 "), head
                assert b"x-kept: 1" in head.lower(), head
                assert b"content-length" not in head.lower(), head


def test_options_asterisk_form_both_ways(proxy: ProxyProcess, upstream: Upstream) -> None:
    """RFC 9112 3.2.4: OPTIONS http://host:port goes on as OPTIONS * (it went as
    "OPTIONS /"), and OPTIONS * inside a tunnel is passed on (it was a 400)."""
    with plain_and_tls(_RequestLines, upstream.ca) as servers:
        plain, tls = servers["http"], servers["https"]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            target = f"127.0.0.1:{plain.port}"
            c.sendall(f"OPTIONS http://{target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
            c.sendall(f"OPTIONS http://{target}/?q HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
        assert plain.seen == ["OPTIONS * HTTP/1.1", "OPTIONS /?q HTTP/1.1"]
        with tls_tunnel(proxy, tls.port) as c:
            c.sendall(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
            c.sendall(b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_head(c).startswith(b"HTTP/1.1 400 ")  # only OPTIONS has "*"
        assert tls.seen == ["OPTIONS * HTTP/1.1"]
    # Logged as the absolute form without a path, not "http://host:port*".
    for url in (f"http://127.0.0.1:{plain.port}", f"https://127.0.0.1:{tls.port}"):
        line = proxy.wait_for_log(
            "inbound response", lambda ln, url=url: ln["fields"]["url"] == url
        )
        assert line["fields"]["method"] == "OPTIONS", line


def test_tunnel_targets_lose_their_fragment_and_keep_their_scheme(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """RFC 9112 3.2.1: "/a#f" inside a tunnel went upstream with its fragment (absolute
    form lost it). An https:// target inside a tunnel without TLS would go on in clear
    text: a 400, and nothing reaches the server."""
    with plain_and_tls(_RequestLines, upstream.ca) as servers:
        plain, tls = servers["http"], servers["https"]
        with tls_tunnel(proxy, tls.port) as c:
            for target in ("/a?b#frag", f"https://127.0.0.1:{tls.port}/c#d"):
                c.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                assert read_head(c).startswith(b"HTTP/1.1 204 ")
        assert tls.seen == ["GET /a?b HTTP/1.1", "GET /c HTTP/1.1"]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            target = f"127.0.0.1:{plain.port}"
            c.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 200 ")
            c.sendall(f"GET http://{target}/e#f HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
            c.sendall(f"GET https://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            answer = c.recv(65536)
            assert answer.startswith(b"HTTP/1.1 400 ") and b"without TLS" in answer, answer
        assert plain.seen == ["GET /e HTTP/1.1"]


def _options(target: str, hops: int | str) -> bytes:
    """`hops` a number, or the Max-Forwards field lines as they go (none with "")."""
    fields = f"Max-Forwards: {hops}\r\n" if isinstance(hops, int) else hops
    return f"OPTIONS http://{target}/ HTTP/1.1\r\nHost: {target}\r\n{fields}\r\n".encode()


def test_max_forwards_on_trace_and_options(proxy: ProxyProcess, upstream: Upstream) -> None:
    """RFC 9110 7.6.2: at 0 the proxy answers itself; above, it passes one less on."""
    with plain_and_tls(_RequestLines, upstream.ca) as servers:
        plain = servers["http"]
        target = f"127.0.0.1:{plain.port}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            c.sendall(
                f"TRACE http://{target}/t HTTP/1.1\r\nHost: {target}\r\nMax-Forwards: 0\r\n"
                "Cookie: secret=1\r\nX-Mine: yes\r\n\r\n".encode()
            )
            head = read_head(c)
            assert head.startswith(b"HTTP/1.1 200 ") and b"message/http" in head, head
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += c.recv(65536)
            assert body.startswith(f"TRACE http://{target}/t HTTP/1.1\r\n".encode())
            assert b"X-Mine: yes" in body and b"secret" not in body
            c.sendall(_options(target, 0))
            head = read_head(c)
            assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nAllow: " in head, head
            assert plain.seen == []  # neither reached the server
            # Several fields or list members: the least counts, here 0.
            c.sendall(_options(target, "Max-Forwards: 5, 0\r\n"))
            assert read_head(c).startswith(b"HTTP/1.1 200 ")
            c.sendall(_options(target, "Max-Forwards: 7\r\nMax-Forwards: 0\r\n"))
            assert read_head(c).startswith(b"HTTP/1.1 200 ")
            assert plain.seen == []
            c.sendall(_options(target, 3))
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
            c.sendall(_options(target, "Max-Forwards: x\r\nMax-Forwards: 3, 9\r\n"))
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
            c.sendall(_options(target, "Max-Forwards: x\r\n"))  # no valid number
            assert read_head(c).startswith(b"HTTP/1.1 204 ")
        assert plain.seen == ["OPTIONS / HTTP/1.1"] * 3
        # One field goes on, one less than the least valid number; none for no number.
        assert [re.findall(rb"(?i)\r\nmax-forwards:[^\r]*", h) for h in plain.heads] == [
            [b"\r\nMax-Forwards: 2"],
            [b"\r\nMax-Forwards: 2"],
            [],
        ]
