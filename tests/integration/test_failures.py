"""One side fails mid-exchange: that exchange ends with the right signal and a log line,
and the proxy keeps serving everyone else.

- a TLS client that does not trust the proxy's CA: its handshake fails, the proxy logs
  "TLS handshake with client failed";
- SNI naming another host than CONNECT: the leaf is for the SNI name;
- a client that resets mid-upload (chunked or Content-Length), or closes mid-upload: the
  upstream never sees the body complete, the closing client gets its 400;
- an upstream that resets mid-download: the client sees the truncation as an error;
- a client that resets mid-download: logged, nothing else disturbed;
- a client that stops reading a large download: the proxy stops reading the upstream,
  its memory stays flat, and the body arrives byte-exact when the client reads again;
- an upstream that goes silent mid-body: cut after --idle-timeout, logged as such.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import re
import socket
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.proxy_process import EGRESS, ProxyProcess, requests_session, running_proxy
from tests.rawserver import RawServer, plain_and_tls, read_head
from tests.upstream import Upstream, expected_sha256

pytestmark = pytest.mark.timeout(60)

SCHEMES = ("http", "https")
SOCK_TIMEOUT = 10.0
RUN = uuid.uuid4().hex[:8]
LINGER_0 = struct.pack("ii", 1, 0)  # close() then sends a RST


# --------------------------------------------------------------------------- helpers


def _assert_serving(proxy: ProxyProcess, upstream: Upstream) -> None:
    with requests_session(proxy) as s:
        for url in (upstream.http_url("/ip"), upstream.https_url("/ip")):
            with s.get(url, timeout=SOCK_TIMEOUT) as r:
                assert r.status_code == 200, (url, r.status_code, r.text)
                assert r.json()["peer"] in EGRESS


def _connect_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the CONNECT answer: {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert data.endswith(b"\r\n\r\n"), "bytes after the CONNECT answer, before TLS"
    return data


def _tunnel(proxy: ProxyProcess, authority: str) -> socket.socket:
    """A connection to the proxy on which CONNECT `authority` was answered 200."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT)
    try:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        _connect_answer(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _client(
    stack: contextlib.ExitStack, proxy: ProxyProcess, scheme: str, authority: str
) -> tuple[socket.socket, str]:
    """A client socket whose requests reach `authority` through the proxy, and the prefix
    its request targets take: plain HTTP in absolute form, HTTPS inside an intercepted
    CONNECT tunnel in origin form. Closed with `stack`."""
    if scheme == "http":
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT)
        return stack.enter_context(sock), f"http://{authority}"
    raw = stack.enter_context(_tunnel(proxy, authority))
    ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
    return stack.enter_context(ctx.wrap_socket(raw, server_hostname="127.0.0.1")), ""


def _response_line(proxy: ProxyProcess, marker: str, timeout: float = 10.0) -> dict[str, Any]:
    return proxy.wait_for_log(
        "inbound response",
        lambda ln: marker in str(ln["fields"].get("url", "")),
        timeout=timeout,
    )


# --------------------------------------------------------------------------- TLS


def test_client_not_trusting_the_ca_fails_its_handshake(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    host = f"untrusted-{RUN}.test"
    with _tunnel(proxy, f"{host}:443") as sock:
        # A client that trusts some other CA only (here: the upstream's).
        ctx = ssl.create_default_context(cafile=str(upstream.ca_pem_path))
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(sock, server_hostname=host)
    line = proxy.wait_for_log(
        "TLS handshake with client failed", lambda ln: ln["fields"].get("host") == host
    )
    assert line["level"] == "warning"
    assert line["fields"]["client"] == "127.0.0.1"
    assert line["fields"].get("error"), line
    _assert_serving(proxy, upstream)


def test_a_client_offering_only_h2_is_told_so_in_the_handshake(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """RFC 7301 3.2: no protocol in common is a fatal no_application_protocol alert. The
    handshake succeeded without one, and the h2 client read our HTTP/1.1 as garbage."""
    host = f"h2only-{RUN}.test"
    with _tunnel(proxy, f"{host}:443") as sock:
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        ctx.set_alpn_protocols(["h2"])
        with pytest.raises(ssl.SSLError, match="no application protocol"):
            ctx.wrap_socket(sock, server_hostname=host)
    line = proxy.wait_for_log(
        "TLS handshake with client failed", lambda ln: ln["fields"].get("host") == host
    )
    assert "'h2' only (ALPN)" in line["fields"]["error"], line
    with _tunnel(proxy, f"127.0.0.1:{upstream.https_port}") as sock:  # h2 or http/1.1
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
    _assert_serving(proxy, upstream)


def test_a_client_hello_in_pieces_is_judged_whole(proxy: ProxyProcess, upstream: Upstream) -> None:
    """A ClientHello that arrives over several reads (a post-quantum key share makes it
    larger than a TCP segment) is still checked for ALPN: an h2-only client gets the
    alert, not a handshake with no protocol. One offering http/1.1 is served as usual."""
    for alpn in (["h2"], ["h2", "http/1.1"]):
        host = f"pieces-{len(alpn)}-{RUN}.test"
        with _tunnel(proxy, f"{host}:443") as sock:
            ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
            ctx.set_alpn_protocols(alpn)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            hello = outgoing.read()
            for i in range(0, len(hello), 40):  # 40-byte pieces, the first without the length
                sock.sendall(hello[i : i + 40])
                time.sleep(0.01)
            outcome: str | None = "unfinished"
            for _ in range(100):  # a handshake takes two or three reads
                data = sock.recv(65536)
                if data:
                    incoming.write(data)
                else:
                    incoming.write_eof()
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    continue
                except ssl.SSLError as exc:
                    outcome = str(exc)
                    break
                outcome = tls.selected_alpn_protocol()  # None: done with no protocol
                break
        if alpn == ["h2"]:
            assert outcome is not None and "no application protocol" in outcome
        else:
            assert outcome == "http/1.1"
    _assert_serving(proxy, upstream)


def test_leaf_is_for_the_sni_name_not_the_connect_host(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    sni = "upstream.test"  # also a name on the upstream's certificate
    with _tunnel(proxy, f"127.0.0.1:{upstream.https_port}") as sock:
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        # Verification (chain and name) against the SNI name succeeds.
        with ctx.wrap_socket(sock, server_hostname=sni) as tls:
            san = tls.getpeercert()["subjectAltName"]
            assert ("DNS", sni) in san, san
            assert ("IP Address", "127.0.0.1") not in san, san
            tls.sendall(
                f"GET /ip HTTP/1.1\r\nHost: {sni}:{upstream.https_port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    # The upstream was verified as the SNI name too, and answered.
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b'"peer"' in answer


@pytest.mark.parametrize("host", ["foo!bar", "ex~ample.test", "a..b", "x" * 300])
def test_a_connect_to_a_name_no_certificate_can_hold_is_400_before_the_tunnel(
    proxy: ProxyProcess, host: str
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
        sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"not a host name" in answer
    time.sleep(0.2)  # log lines are written up to 50 ms late
    assert not proxy.logs("internal error")


def _get_statuses(proxy: ProxyProcess, authority: str, sni: str, count: int) -> list[int]:
    """`count` GETs on one keep-alive tunnel to `authority` whose TLS names `sni`."""
    statuses = []
    with _tunnel(proxy, authority) as sock:
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        with ctx.wrap_socket(sock, server_hostname=sni) as tls:
            for _ in range(count):
                tls.sendall(f"GET /ip HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
                answer = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
                answer.begin()
                answer.read()
                statuses.append(answer.status)
    return statuses


def test_a_pooled_connection_serves_only_the_name_it_was_verified_for(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """A tunnel whose SNI names a host the upstream's certificate does not cover gets
    502 on every request, even when connections to the same host and port, verified for
    another name, sit idle in the pool for every egress address."""
    authority = f"127.0.0.1:{upstream.https_port}"
    rounds = 2 * len(EGRESS)  # round-robin: every egress address twice
    assert _get_statuses(proxy, authority, "upstream.test", rounds) == [200] * rounds
    assert _get_statuses(proxy, authority, f"elsewhere-{RUN}.test", rounds) == [502] * rounds
    _assert_serving(proxy, upstream)


# --------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("framing", ["chunked", "length"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_client_reset_mid_upload_never_completes_upstream(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, framing: str
) -> None:
    marker = f"case={RUN}-reset-upload-{scheme}-{framing}"
    port = upstream.http_port if scheme == "http" else upstream.https_port
    authority = f"127.0.0.1:{port}"
    piece = b"u" * 65536
    if framing == "chunked":
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        framing_field = "Transfer-Encoding: chunked"
    else:  # announced 4 MiB, of which 1.25 MiB come before the reset
        chunk = piece
        framing_field = f"Content-Length: {64 * len(piece)}"
    with contextlib.ExitStack() as stack:
        sock, prefix = _client(stack, proxy, scheme, authority)
        target = f"{prefix}/upload?{marker}"
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nHost: {authority}\r\n{framing_field}\r\n\r\n".encode()
        )
        for _ in range(16):  # 1 MiB
            sock.sendall(chunk)
        deadline = time.monotonic() + 10
        while not [s for s in list(upstream.seen_headers) if marker in s["path"]]:
            assert time.monotonic() < deadline, "the upload never reached the upstream"
            time.sleep(0.02)
        for _ in range(4):  # the upload is under way upstream
            sock.sendall(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    # The exchange ended with an error, not with the upstream's answer (which would be a
    # 200 carrying the length it received).
    line = _response_line(proxy, marker)
    assert line["level"] == "warning", line
    assert line["fields"].get("error"), line
    assert line["fields"]["status_code"] != 200, line
    time.sleep(0.2)
    statuses = [
        ln["fields"]["status_code"]
        for ln in proxy.logs("inbound response")
        if marker in str(ln["fields"].get("url", ""))
    ]
    assert statuses == [line["fields"]["status_code"]], statuses
    _assert_serving(proxy, upstream)


def test_client_closing_mid_upload_gets_400_and_never_completes_upstream(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    # A FIN, not a reset, after 1 MiB of an announced 4 MiB: the end of the client's
    # bytes is not the end of the body (plain HTTP: the body moves by splice).
    marker = f"case={RUN}-close-upload"
    authority = f"127.0.0.1:{upstream.http_port}"
    size = 4 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
        sock.sendall(
            f"POST http://{authority}/upload?{marker} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        sock.sendall(b"u" * (1024 * 1024))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"closed before the end of the body" in answer, answer[:400]
    line = _response_line(proxy, marker)
    assert line["fields"]["status_code"] == 400, line
    assert line["fields"]["bytes_sent"] <= 1024 * 1024, line
    _assert_serving(proxy, upstream)


def test_client_closing_its_upload_during_an_early_answer_is_told_as_the_clients(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The upload fails (the client's FIN ends the body short) while the answer is being
    spliced: the upstream connection is aborted under the splice. The log says what
    happened, the client's short body, not an upstream reset; the client's connection
    is cut, since its answer is incomplete."""
    marker = f"case={RUN}-early-answer"
    server = EarlyAnswerUpstream(None)
    authority = f"127.0.0.1:{server.port}"
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
            sock.sendall(
                f"POST http://{authority}/upload?{marker} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Content-Length: {4 << 20}\r\n\r\n".encode()
                + b"u" * 1024
            )
            got = b""
            while len(got) < 128 * 1024:
                chunk = sock.recv(65536)
                assert chunk, got[:200]
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    got += chunk
        assert len(got) < EarlyAnswerUpstream.SIZE  # cut, not passed off as complete
        line = _response_line(proxy, marker)
    finally:
        server.close()
    assert line["level"] == "warning", line
    assert "closed before the end of the body" in line["fields"]["error"], line
    _assert_serving(proxy, upstream)


class UploadResetUpstream(RawServer):
    """Reads a request head and 100 KiB of its body, then resets: a server refusing an
    upload the way a body-size limit or a crash does."""

    READ = 100 * 1024

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if not read_head(sock):
            return
        got = 0
        while got < self.READ and (chunk := sock.recv(65536)):
            got += len(chunk)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)


class UploadStallUpstream(RawServer):
    """Reads a request head, then nothing more, and never answers."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if read_head(sock):
            self._stop.wait(5)


def _curl_upload(proxy: ProxyProcess, url: str, framing: str, body: Path) -> tuple[int, str, str]:
    """POST `body` (8 MiB) to `url` with curl: its exit code, the status and the text."""
    body.write_bytes(b"u" * (8 << 20))
    extra = ["-H", "Transfer-Encoding: chunked"] if framing == "chunked" else []
    done = subprocess.run(
        ["curl", "-q", "-sS", "--max-time", "30", "--proxy", proxy.url,
         "--cacert", str(proxy.ca_path), "-H", "Expect:", *extra,
         "--data-binary", f"@{body}", "-w", "\n%{http_code}", url],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    text, _, status = done.stdout.decode().rpartition("\n")
    return done.returncode, status, text


UPLOADS = pytest.mark.parametrize(
    ("scheme", "framing"),
    # plain with a length: spliced; chunked, or over TLS: written and drained
    [("http", "content-length"), ("http", "chunked"), ("https", "content-length")],
)


@UPLOADS
def test_an_upstream_reset_during_the_upload_is_a_502_for_the_client(
    proxy: ProxyProcess, upstream: Upstream, tmp_path: Path, scheme: str, framing: str
) -> None:
    """The upstream's failure, not the client's: the client (curl) got a bare reset, and
    the log and metrics said "client connection lost"."""
    marker = f"case={RUN}-upload-reset-{scheme}-{framing}"
    with plain_and_tls(UploadResetUpstream, upstream.ca) as servers:
        url = f"{scheme}://127.0.0.1:{servers[scheme].port}/upload?{marker}"
        code, status, text = _curl_upload(proxy, url, framing, tmp_path / "body")
    line = _response_line(proxy, marker)
    assert line["fields"]["status_code"] == 502, line
    assert "upstream" in line["fields"]["error"] and "client" not in line["fields"]["error"]
    assert (code, status) == (0, "502"), text
    assert text.startswith("upstream "), text
    _assert_serving(proxy, upstream)


@UPLOADS
def test_an_upstream_that_takes_none_of_the_upload_is_a_504(
    tmp_path: Path, upstream: Upstream, scheme: str, framing: str
) -> None:
    marker = f"case={RUN}-upload-stall-{scheme}-{framing}"
    with (
        plain_and_tls(UploadStallUpstream, upstream.ca) as servers,
        running_proxy(
            tmp_path / "state", "--idle-timeout", "1", upstream_ca=upstream.ca_pem_path
        ) as p,
    ):
        url = f"{scheme}://127.0.0.1:{servers[scheme].port}/upload?{marker}"
        code, status, text = _curl_upload(p, url, framing, tmp_path / "body")
        line = _response_line(p, marker)
    assert (code, status, text) == (0, "504", "upstream took nothing for 1 s\n")
    assert line["fields"]["status_code"] == 504, line


class RefusingUpstream(RawServer):
    """Answers a request's head at once with a 413 and closes, its body unread (which
    makes the close a reset, and may discard the answer before it left)."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if read_head(sock):
            sock.sendall(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n"
                b"Connection: close\r\n\r\nbig\n"
            )


def test_an_upload_refused_by_an_early_answer_leaves_no_error_unread(
    proxy: ProxyProcess, upstream: Upstream, tmp_path: Path
) -> None:
    """The client gets the server's 413 (or, where the server's reset overtook it, a 502
    that says so); the upload, failed when the server closed, was not reaped when it had
    ended first, and asyncio logged "Task exception was never retrieved" with its
    traceback (in about one try in seven)."""
    first = len(proxy.lines)
    with plain_and_tls(RefusingUpstream, upstream.ca) as servers:
        for i in range(12):
            scheme = SCHEMES[i % 2]
            url = f"{scheme}://127.0.0.1:{servers[scheme].port}/upload?case={RUN}-refused-{i}"
            code, status, text = _curl_upload(proxy, url, "content-length", tmp_path / "b")
            # Not a failed send (curl's 55) either: the proxy closed the client while the
            # body still came, a reset; it now closes lingering (Stream.linger_close).
            assert (code, status, text) == (0, "413", "big\n") or (
                (code, status) == (0, "502") and text.startswith("upstream ")
            ), (code, status, text)
    _assert_serving(proxy, upstream)
    errors = [ln for ln in proxy.lines[first:] if ln["level"] == "error"]
    assert errors == [], errors[0]


# --------------------------------------------------------------------------- downloads


class PartialUpstream(RawServer):
    """Answers each request with a 1 MiB Content-Length head and 256 KiB of the body,
    then does what `_after` says."""

    SIZE = 1 << 20
    SENT = 256 * 1024

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        head = read_head(sock)
        if not head:
            return
        self.seen.append(head.split(b" ", 2)[1].decode("latin-1"))
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE)
        sock.sendall(b"d" * self.SENT)
        self._after(raw)

    def _after(self, raw: socket.socket) -> None:
        raise NotImplementedError


class EarlyAnswerUpstream(PartialUpstream):
    """... at once, before the request's body (a POST's), then after a second the rest
    (the proxy splices it as it comes)."""

    def _after(self, raw: socket.socket) -> None:
        time.sleep(1.0)
        raw.sendall(b"d" * (self.SIZE - self.SENT))


class ResettingUpstream(PartialUpstream):
    """... then a RST."""

    def _after(self, raw: socket.socket) -> None:
        time.sleep(0.3)  # relayed to the client by now
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)


@pytest.fixture(scope="module")
def resetting_upstreams(upstream: Upstream) -> Iterator[dict[str, ResettingUpstream]]:
    # The proxy trusts upstream.ca (--upstream-ca): a leaf from it makes a valid TLS server.
    with plain_and_tls(ResettingUpstream, upstream.ca) as servers:
        yield servers


@pytest.mark.parametrize("scheme", SCHEMES)
def test_upstream_reset_mid_download_is_an_error_for_the_client(
    proxy: ProxyProcess,
    upstream: Upstream,
    resetting_upstreams: dict[str, ResettingUpstream],
    scheme: str,
) -> None:
    server = resetting_upstreams[scheme]
    path = f"/download?case={RUN}-upstream-reset-{scheme}"
    received = 0
    with requests_session(proxy) as s:
        with (
            pytest.raises(
                (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
            ),
            s.get(f"{scheme}://127.0.0.1:{server.port}{path}", stream=True, timeout=20) as r,
        ):
            assert r.status_code == 200
            assert r.headers["Content-Length"] == str(ResettingUpstream.SIZE)
            for data in r.iter_content(65536):
                received += len(data)
        assert received < ResettingUpstream.SIZE
    assert path in server.seen
    line = _response_line(proxy, path)
    assert line["level"] == "warning", line
    # In the same words both ways (over TLS it read "...: [Errno 104] Connection reset...").
    assert (
        line["fields"]["error"]
        == "upstream reset the connection mid-body: Connection reset by peer"
    ), line
    assert line["fields"]["bytes"] < ResettingUpstream.SIZE, line
    _assert_serving(proxy, upstream)


def _download_then_reset(proxy: ProxyProcess, scheme: str, authority: str, path: str) -> None:
    """GET `path` from `authority`, read 512 KiB of the answer, then reset the connection
    (SO_LINGER 0)."""
    with contextlib.ExitStack() as stack:
        sock, prefix = _client(stack, proxy, scheme, authority)
        target = f"{prefix}{path}"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        got = b""
        while len(got) < 512 * 1024:
            chunk = sock.recv(65536)
            assert chunk, "closed early"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 ")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_client_reset_mid_download_is_logged_and_contained(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    size = 20 * 1024 * 1024
    first_line = len(proxy.lines)
    for attempt in range(3):  # the race between our write and the reset varies
        path = f"/bytes/{size}?case={RUN}-client-reset-{scheme}-{attempt}"
        port = upstream.http_port if scheme == "http" else upstream.https_port
        _download_then_reset(proxy, scheme, f"127.0.0.1:{port}", path)
        line = _response_line(proxy, path)
        # A cut transfer is logged as one: a warning with the reason, not a plain 200.
        assert line["level"] == "warning", line
        assert line["fields"].get("error"), line
        assert line["fields"]["bytes"] < size, line
    internal = [ln for ln in proxy.lines[first_line:] if ln.get("message") == "internal error"]
    assert internal == [], internal[0]["fields"].get("error")
    # Everyone else is served, byte-exact.
    with requests_session(proxy) as s, s.get(upstream.https_url("/bytes/100000"), timeout=10) as r:
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == expected_sha256(100000)
    _assert_serving(proxy, upstream)


class CountingUpstream(RawServer):
    """Answers with a 400 MB body, sent as fast as it is taken; records how much of it
    went before the connection failed."""

    SIZE = 400 * 1024 * 1024

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(tls)
        self.sent: list[int] = []

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if not read_head(sock):
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE)
        piece = b"d" * (256 * 1024)
        sent = 0
        try:
            while sent < self.SIZE:
                sock.sendall(piece)
                sent += len(piece)
        finally:
            self.sent.append(sent)


def test_a_client_gone_mid_download_stops_the_tls_upstream_at_once(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The upstream connection is cut, not shut down with TLS's close_notify: that
    shutdown read on and discarded the rest of the body for up to 30 s, so the site sent
    all 400 MB that nobody wanted."""
    with plain_and_tls(CountingUpstream, upstream.ca) as servers:
        server = servers["https"]
        _download_then_reset(proxy, "https", f"127.0.0.1:{server.port}", "/big")
        deadline = time.monotonic() + 20
        while not server.sent:
            assert time.monotonic() < deadline, "the upstream is still sending"
            time.sleep(0.05)
    assert server.sent[0] < CountingUpstream.SIZE // 4, server.sent


class ClosingUpstream(RawServer):
    """A whole Content-Length body, then a TCP close without TLS close_notify, as
    Python's http.server and many others do."""

    SIZE = 8 * 1024 * 1024

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if not read_head(sock):
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE)
        sock.sendall(b"d" * self.SIZE)
        # Leaving the `with` in _serve closes the socket: no unwrap, no close_notify.


def test_a_whole_body_then_a_bare_close_reaches_a_slow_client_whole(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The client reads slower than the upstream sends, so the proxy pauses reading the
    upstream; uvloop then saw the FIN and dropped the TLS records it had not decrypted
    yet: the body arrived short, the proxy logged a truncation and reset the client."""
    with plain_and_tls(ClosingUpstream, upstream.ca) as servers:
        authority = f"127.0.0.1:{servers['https'].port}"
        for attempt in range(5):
            with contextlib.ExitStack() as stack:
                sock, _ = _client(stack, proxy, "https", authority)
                sock.sendall(
                    f"GET /whole?{RUN}-{attempt} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
                )
                head = read_head(sock)
                assert head.startswith(b"HTTP/1.1 200 "), head[:200]
                got = len(head) - head.index(b"\r\n\r\n") - 4
                while got < ClosingUpstream.SIZE:
                    chunk = sock.recv(256 * 1024)
                    assert chunk, f"attempt {attempt}: {got} of {ClosingUpstream.SIZE} bytes"
                    got += len(chunk)
                    time.sleep(0.002)  # a TLS record (16 KiB) each: slower than the upstream
            assert got == ClosingUpstream.SIZE
            line = _response_line(proxy, f"{RUN}-{attempt}")
            assert "error" not in line["fields"], line


def _rss(pid: int) -> int:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_client_that_stops_reading_holds_proxy_memory_flat(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    size = 64 * 1024 * 1024
    port = upstream.http_port if scheme == "http" else upstream.https_port
    authority = f"127.0.0.1:{port}"
    path = f"/bytes/{size}?case={RUN}-stalled-{scheme}"
    with contextlib.ExitStack() as stack:
        sock, prefix = _client(stack, proxy, scheme, authority)
        sock.sendall(f"GET {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            assert chunk, "closed before the head"
            got += chunk
        head, _, first = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        digest = hashlib.sha256(first)
        received = len(first)
        while received < 1024 * 1024:
            chunk = sock.recv(65536)
            assert chunk, "closed early"
            digest.update(chunk)
            received += len(chunk)
        before = _rss(proxy.proc.pid)
        # The client stops reading: with nothing pausing the upstream the proxy would
        # take in the whole body (the upstream sends it in well under a second).
        peak = before
        for _ in range(15):
            time.sleep(0.1)
            peak = max(peak, _rss(proxy.proc.pid))
        assert peak - before < 16 * 1024 * 1024, (
            f"proxy memory grew {(peak - before) / 2**20:.1f} MiB for a stalled client"
        )
        while received < size:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {received} of {size} bytes"
            digest.update(chunk)
            received += len(chunk)
        assert received == size
        assert digest.hexdigest() == expected_sha256(size)
    line = _response_line(proxy, path)
    assert line["fields"]["status_code"] == 200, line
    assert line["fields"]["bytes"] == size, line
    assert "error" not in line["fields"], line


class TinyChunksUpstream(RawServer):
    """A chunked body in 1-byte chunks, sent as fast as it is taken: six bytes on the wire
    for each byte of body, the framing a client can make the proxy pay for."""

    CHUNKS = 2 * 1024 * 1024

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if not read_head(sock):
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"1\r\nt\r\n" * 65536
        for _ in range(self.CHUNKS // 65536):
            sock.sendall(piece)
        sock.sendall(b"0\r\n\r\n")


def _dechunked(data: bytes) -> bytes | None:
    """The body of a complete chunked `data`, or None while the last chunk is missing."""
    body = bytearray()
    at = 0
    while (end := data.find(b"\r\n", at)) >= 0:
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        if len(data) < end + 2 + size + 2:
            return None
        body += data[end + 2 : end + 2 + size]
        assert data[end + 2 + size : end + 4 + size] == b"\r\n", "chunk without its CRLF"
        at = end + 4 + size
    return None


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_chunks_to_a_stalled_client_hold_proxy_memory_flat(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, version: str
) -> None:
    """A chunk of one byte per chunk line: the proxy re-frames what one read decoded as one
    chunk (HTTP/1.1) or one write (HTTP/1.0, close-delimited), so a client that stops
    reading holds one read's worth of bytes, not a Python object per chunk (it held
    37 MB)."""
    with plain_and_tls(TinyChunksUpstream, upstream.ca) as servers:
        authority = f"127.0.0.1:{servers[scheme].port}"
        path = f"/tiny?case={RUN}-tiny-{scheme}-{version}"
        with contextlib.ExitStack() as stack:
            sock, prefix = _client(stack, proxy, scheme, authority)
            sock.sendall(f"GET {prefix}{path} HTTP/{version}\r\nHost: {authority}\r\n\r\n".encode())
            got = read_head(sock)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            before = _rss(proxy.proc.pid)
            peak = before
            for _ in range(15):  # the upstream sends its 12 MiB in well under a second
                time.sleep(0.1)
                peak = max(peak, _rss(proxy.proc.pid))
            assert peak - before < 16 * 1024 * 1024, (
                f"proxy memory grew {(peak - before) / 2**20:.1f} MiB for a stalled client"
            )
            head, _, rest = got.partition(b"\r\n\r\n")
            data = bytearray(rest)
            body = None
            while body is None and (chunk := sock.recv(1 << 20)):
                data += chunk
                if version == "1.1" and data.endswith(b"0\r\n\r\n"):
                    body = _dechunked(bytes(data))
            if version == "1.0":
                body = bytes(data)  # close-delimited: the end of the body is the close
        if version == "1.1":
            assert b"transfer-encoding: chunked" in head.lower(), head
        else:
            assert b"transfer-encoding" not in head.lower(), head
        assert body == b"t" * TinyChunksUpstream.CHUNKS
    line = _response_line(proxy, path)
    assert line["fields"]["status_code"] == 200, line
    assert line["fields"]["bytes"] == TinyChunksUpstream.CHUNKS, line
    assert "error" not in line["fields"], line


class FirehoseUpstream(RawServer):
    """Answers with a 1 GiB Content-Length body and sends it as fast as it is taken,
    until the proxy lets go (a raw server: resets are what this test causes)."""

    SIZE = 1 << 30

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if not read_head(sock):
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE)
        piece = b"f" * 65536
        for _ in range(self.SIZE // len(piece)):
            sock.sendall(piece)  # raises once the proxy has closed: the end of it


@pytest.mark.parametrize("scheme", SCHEMES)
def test_client_that_stops_reading_past_the_idle_timeout_is_let_go(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    """No byte taken for --idle-timeout: both connections go (the upstream one too), and
    the log line says why. Over plain HTTP the body moves by splice(2), over TLS by
    writes: both ways are bounded."""
    path = f"/big?case={RUN}-stops-reading-{scheme}"
    with (
        plain_and_tls(FirehoseUpstream, upstream.ca) as servers,
        running_proxy(
            tmp_path / "state", "--idle-timeout", "1", upstream_ca=upstream.ca_pem_path
        ) as p,
        contextlib.ExitStack() as stack,
    ):
        port = servers[scheme].port
        authority = f"127.0.0.1:{port}"
        sock, prefix = _client(stack, p, scheme, authority)
        sock.sendall(f"GET {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        line = p.wait_for_log("inbound response", lambda ln: path in ln["fields"]["url"])
        assert "took nothing for 1 s" in line["fields"]["error"], line
        assert line["level"] == "warning"
        assert line["fields"]["bytes"] < FirehoseUpstream.SIZE
        deadline = time.monotonic() + 10
        while _upstream_connections(p, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _upstream_connections(p, port) == 0


def _upstream_connections(proxy: ProxyProcess, port: int) -> int:
    root = psutil.Process(proxy.proc.pid)
    conns = [c for pr in (root, *root.children()) for c in pr.net_connections(kind="tcp")]
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


class StallingUpstream(PartialUpstream):
    """... then says nothing for SILENCE_S seconds."""

    SILENCE_S = 4.0

    def _after(self, raw: socket.socket) -> None:
        time.sleep(self.SILENCE_S)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_upstream_silent_mid_body_is_cut_after_the_idle_timeout(
    tmp_path: Any, upstream: Upstream, scheme: str
) -> None:
    with (
        plain_and_tls(StallingUpstream, upstream.ca) as servers,
        running_proxy(
            tmp_path / "state", "--idle-timeout", "1", upstream_ca=upstream.ca_pem_path
        ) as p,
    ):
        server = servers[scheme]
        path = f"/silent?case={RUN}-silent-{scheme}"
        received = 0
        started = time.monotonic()
        with (
            requests_session(p) as s,
            pytest.raises(
                (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
            ),
            s.get(f"{scheme}://127.0.0.1:{server.port}{path}", stream=True, timeout=20) as r,
        ):
            assert r.status_code == 200
            for data in r.iter_content(65536):
                received += len(data)
        elapsed = time.monotonic() - started
        assert received == StallingUpstream.SENT
        # Cut by the proxy's idle timeout (1 s), not by the upstream closing (4 s).
        assert elapsed < StallingUpstream.SILENCE_S - 1, elapsed
        line = _response_line(p, path)
        assert line["level"] == "warning", line
        assert "mid-body" in line["fields"]["error"], line
        assert line["fields"]["bytes"] == StallingUpstream.SENT, line
        _assert_serving(p, upstream)


BANNED = EGRESS[1]


class BanByReset(RawServer):
    """Resets every connection from BANNED, as sites do to an address they banned:
    `when` "request" after its head (after TLS, under TLS), "handshake" before TLS."""

    when = "request"

    def _serve(self, conn: socket.socket) -> None:
        if self.when == "handshake" and conn.getpeername()[0] == BANNED:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            conn.close()
            return
        super()._serve(conn)

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        head = read_head(sock)
        if not head:
            return
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = head.partition(b"\r\n\r\n")[2]
        while length and len(body) < int(length.group(1)):  # all read: a close, not a reset
            body += sock.recv(4096)
        peer = raw.getpeername()[0]
        if peer == BANNED:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            return
        self.seen.append(peer)
        # Closed after each answer: every request meets a fresh connection, where a ban
        # shows (and no pooled connection holds this server's thread at the end).
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(peer), peer.encode())
        )


@pytest.mark.parametrize(
    ("scheme", "when"), [("http", "request"), ("https", "request"), ("https", "handshake")]
)
def test_an_address_refused_by_reset_cools_and_its_requests_go_elsewhere(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, when: str
) -> None:
    """Every request the round robin gave the banned address was a 502, for good: a reset
    on a fresh connection was neither retried nor cooled."""
    with plain_and_tls(BanByReset, upstream.ca) as servers:
        server = servers[scheme]
        server.when = when
        url = f"{scheme}://127.0.0.1:{server.port}/"
        with requests_session(proxy) as s:
            answers = [s.get(url, timeout=SOCK_TIMEOUT) for _ in range(2 * len(EGRESS))]
            assert [r.status_code for r in answers] == [200] * len(answers)
            assert BANNED not in {r.text for r in answers}
            assert set(server.seen) == set(EGRESS) - {BANNED}
            if when == "handshake":  # no byte of the request was sent: any may go again
                posts = [s.post(url, data=b"x", timeout=SOCK_TIMEOUT) for _ in range(8)]
                assert [r.status_code for r in posts] == [200] * len(posts)
    # The retry's socket took the failed one's descriptor number, which was closed a
    # second time under it (EBADF, an internal error and a reset client).
    assert not proxy.logs("internal error")
    cooling = [
        ln for ln in proxy.logs("egress address cooling") if ln["fields"]["interface"] == BANNED
    ]
    assert cooling and "reset" in cooling[-1]["fields"]["error"], cooling


def test_a_port_that_refuses_an_address_leaves_the_hosts_other_ports_to_it(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """A reset on one port (a firewalled 8443, a ban by one service) cooled the address
    for the whole host: every other port of that host lost it as well. A network fault
    speaks for its port alone (a cooling status, for the site, cools every port)."""
    with plain_and_tls(BanByReset, upstream.ca) as servers:
        server = servers["http"]
        server.when = "request"
        with requests_session(proxy) as s:
            refusing = f"http://127.0.0.1:{server.port}/"
            answers = [s.get(refusing, timeout=SOCK_TIMEOUT) for _ in range(2 * len(EGRESS))]
            assert [r.status_code for r in answers] == [200] * len(answers)
            # The same host, another port, within the cooldown (0.5 s at least): the
            # banned address is in the rotation there.
            peers = [
                s.get(upstream.http_url("/ip"), timeout=SOCK_TIMEOUT).json()["peer"]
                for _ in range(2 * len(EGRESS))
            ]
            assert set(peers) == set(EGRESS), peers
            again = [s.get(refusing, timeout=SOCK_TIMEOUT) for _ in range(len(EGRESS))]
            assert BANNED not in {r.text for r in again}  # still cooling on its own port
    cooling = [
        ln for ln in proxy.logs("egress address cooling") if ln["fields"]["interface"] == BANNED
    ]
    assert cooling and cooling[-1]["fields"]["port"] == server.port, cooling
