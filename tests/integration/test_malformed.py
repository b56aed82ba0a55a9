"""Malformed and smuggling messages against the live proxy, in both directions.

Requests: a hand-written corpus sent over raw sockets, as plain HTTP (absolute-form) and
inside an intercepted tunnel (CONNECT, TLS verified against the proxy's CA, origin-form).
For each the client must get a 4xx/5xx written by the proxy itself, then a closed
connection, and the upstream must never receive the request: every case carries a unique
marker in its target (``?case=<run>-<scheme>-<id>``) that is looked for in
``Upstream.seen_headers``. When only the chunked body is bad the head is valid and may
already have gone upstream; then the upstream must never see the request complete (its
/upload handler never answers with a length, so the proxy's "inbound response" line for
it is not a 200) and the client gets a 4xx or a reset, never a 200.

Responses: a tiny raw server that answers every request with a malformed response. A
client gets a plain-text 502 when nothing was relayed yet, and an aborted transfer
(requests raises, curl exits 18 or 56) once the body has started: never a clean short 200.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import itertools
import json
import re
import socket
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy_process import EGRESS, ProxyProcess, requests_session
from tests.rawserver import RawServer, plain_and_tls
from tests.upstream import Upstream

pytestmark = pytest.mark.timeout(90)

SCHEMES = ("http", "https")
SOCK_TIMEOUT = 10.0
# The proxy answers a malformed message in milliseconds; waiting longer means it hangs.
ANSWER_TIMEOUT = 5.0
MAX_ANSWER = 1 << 20
RUN = uuid.uuid4().hex[:8]  # markers stay unique across modules sharing the upstream
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


# --------------------------------------------------------------------------- helpers


@dataclass
class Answer:
    data: bytes  # every byte the proxy sent before the end
    end: str  # "close" (recv returned b""), "reset", or "open" (still, at a timeout)

    @property
    def status(self) -> int | None:
        m = STATUS_LINE.match(self.data)
        return int(m.group(1)) if m else None

    @property
    def head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[0]


def _read_until_head_end(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a complete head: {data!r}"
        data += chunk
        assert len(data) < 65536, "head too long"
    return data


@contextlib.contextmanager
def _client(
    proxy: ProxyProcess, port: int, scheme: str, host: str = "127.0.0.1"
) -> Iterator[tuple[socket.socket, str, str]]:
    """A client connection ready for a request to origin scheme://host:port.

    Yields (socket, target prefix, Host value): the prefix is "http://host:port" for
    absolute-form, "" inside a tunnel (CONNECT, then TLS verified with the proxy's CA).
    """
    authority = f"{host}:{port}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
        if scheme == "http":
            yield sock, f"http://{authority}", authority
            return
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        answer = _read_until_head_end(sock)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b"\r\n\r\n"), "bytes after the CONNECT answer, before TLS"
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            yield tls, "", authority


def _send(sock: socket.socket, data: bytes) -> None:
    """Send all of `data`; the proxy may answer and close before reading all of it."""
    try:
        sock.sendall(data)
    except TimeoutError:
        raise
    except OSError:  # EPIPE, ECONNRESET, or the TLS flavours of them
        pass


def _answer(sock: socket.socket, timeout: float = ANSWER_TIMEOUT) -> Answer:
    """Everything the proxy sends until it closes; fails if it neither answers nor closes."""
    sock.settimeout(timeout)
    data = bytearray()
    end = "close"
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            got = Answer(bytes(data), "open")
            what = f"answered {got.status} but" if got.status else "neither answered nor"
            raise AssertionError(
                f"the proxy {what} closed the connection within {timeout:g} s; "
                f"got {got.data[:300]!r}"
            ) from None
        except (ConnectionResetError, ssl.SSLError):
            end = "reset"
            break
        if not chunk:
            break
        data += chunk
        assert len(data) <= MAX_ANSWER, "an endless answer"
    return Answer(bytes(data), end)


def _seen(upstream: Upstream, marker: str) -> list[str]:
    return [s["path"] for s in list(upstream.seen_headers) if f"case={marker}" in s["path"]]


def _sync_request(proxy: ProxyProcess, upstream: Upstream, scheme: str) -> None:
    """A normal request through the proxy and the same kind of connection: 200.

    Also a barrier: by the time it is answered, a request the proxy had forwarded for
    the previous case would have been recorded by the upstream.
    """
    port = upstream.http_port if scheme == "http" else upstream.https_port
    with _client(proxy, port, scheme) as (sock, prefix, host):
        _send(
            sock,
            f"GET {prefix}/ip?sync={RUN} HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        answer = _answer(sock, SOCK_TIMEOUT)
    assert answer.status == 200, answer.data[:300]
    assert b'"peer"' in answer.data


# --------------------------------------------------------------------------- request corpus

REFUSED_IN_TIME: list[str] = []
"""Markers of cases the upstream had not seen when their test ended (checked again later)."""

Build = Callable[[str, str, str], bytes]  # (target prefix, Host, marker) -> request bytes


def _req(
    method: str,
    path: str,
    headers: list[str],
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> Build:
    def build(prefix: str, host: str, marker: str) -> bytes:
        target = path.replace("{case}", f"case={marker}")
        lines = [f"{method} {prefix}{target} {version}", f"Host: {host}", *headers]
        head = "".join(line + "\r\n" for line in lines) + "\r\n"
        return head.encode("latin-1") + body.replace(b"{case}", f"case={marker}".encode())

    return build


def _te_cl_smuggle(prefix: str, host: str, marker: str) -> bytes:
    # TE.CL: a proxy reading Content-Length forwards "5c\r\n" and leaves a second request
    # (GPOST ...) for the server to find on the same connection.
    inner = (
        f"GPOST {prefix}/ip?case={marker}-smuggled HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Length: 15\r\n\r\nx=1"
    ).encode()
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)
    build = _req(
        "POST", "/upload?{case}", ["Transfer-Encoding: chunked", "Content-Length: 4"], body
    )
    return build(prefix, host, marker)


def _port_zero(prefix: str, host: str, marker: str) -> bytes:
    # Absolute-form with port 0, also inside a tunnel (where the target must still be
    # valid): once read as "no port" and sent to port 80, or to the tunnel's port.
    return f"GET http://127.0.0.1:0/ip?case={marker} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def _all_bare_lf(prefix: str, host: str, marker: str) -> bytes:
    # No CRLF ever comes: it waited out --head-timeout for a 408.
    return f"GET {prefix}/ip?case={marker} HTTP/1.1\nHost: {host}\n\n".encode()


def _client_hello(prefix: str, host: str, marker: str) -> bytes:
    # A client told the proxy URL is https://: a TLS record where a request-line goes.
    return b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + marker.encode()


BAD_REQUEST = frozenset({400})

# id -> (builder, accepted statuses). Every one of these is refused from its head alone:
# the upstream must not see it at all.
HEAD_CASES: dict[str, tuple[Build, frozenset[int]]] = {
    "cl-te": (
        _req(
            "POST",
            "/upload?{case}",
            ["Content-Length: 6", "Transfer-Encoding: chunked"],
            b"0\r\n\r\nGET /ip?{case}-smuggled HTTP/1.1\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    "te-cl": (_te_cl_smuggle, BAD_REQUEST),
    "te-chunked-identity": (
        _req("POST", "/upload?{case}", ["Transfer-Encoding: chunked, identity"], b"0\r\n\r\n"),
        BAD_REQUEST,
    ),
    "te-space-before-colon": (
        _req(
            "POST",
            "/upload?{case}",
            ["Transfer-Encoding : chunked", "Content-Length: 5"],
            b"0\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    "te-xchunked": (
        _req("POST", "/upload?{case}", ["Transfer-Encoding: xchunked"], b"0\r\n\r\n"),
        BAD_REQUEST,
    ),
    "te-duplicated-chunked-then-x": (
        _req(
            "POST",
            "/upload?{case}",
            ["Transfer-Encoding: chunked", "Transfer-Encoding: x"],
            b"0\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    # Together the two fields say "x, chunked": a coding nobody here knows, under chunked.
    # Forwarding only the chunked framing would hand the server x-coded bytes as if they
    # were the content: refuse (400, or 501 for the unknown coding, RFC 9112 6.1).
    "te-duplicated-x-then-chunked": (
        _req(
            "POST",
            "/upload?{case}",
            ["Transfer-Encoding: x", "Transfer-Encoding: chunked"],
            b"0\r\n\r\n",
        ),
        frozenset({400, 501}),
    ),
    "te-duplicated-chunked-twice": (
        _req(
            "POST",
            "/upload?{case}",
            ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
            b"0\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    "te-tab-before-colon": (
        _req(
            "POST",
            "/upload?{case}",
            ["Transfer-Encoding\t: chunked", "Content-Length: 5"],
            b"0\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    "te-vertical-tab-value": (
        _req("POST", "/upload?{case}", ["Transfer-Encoding: \x0bchunked"], b"0\r\n\r\n"),
        BAD_REQUEST,
    ),
    "te-tab-value-and-cl": (
        _req(
            "POST",
            "/upload?{case}",
            ["Content-Length: 5", "Transfer-Encoding:\tchunked"],
            b"0\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    "te-folded-onto-previous-line": (
        _req(
            "POST",
            "/upload?{case}",
            ["Content-Length: 5", "X-Padding: a", " Transfer-Encoding: chunked"],
            b"0\r\n\r\n",
        ),
        BAD_REQUEST,
    ),
    "cl-two-values": (
        _req("POST", "/upload?{case}", ["Content-Length: 5", "Content-Length: 6"], b"hello!"),
        BAD_REQUEST,
    ),
    "cl-plus-sign": (
        _req("POST", "/upload?{case}", ["Content-Length: +5"], b"hello"),
        BAD_REQUEST,
    ),
    "cl-minus-sign": (
        _req("POST", "/upload?{case}", ["Content-Length: -5"], b"hello"),
        BAD_REQUEST,
    ),
    "cl-hex": (
        _req("POST", "/upload?{case}", ["Content-Length: 0x5"], b"hello"),
        BAD_REQUEST,
    ),
    "obs-fold": (_req("GET", "/ip?{case}", ["X-Folded: a", " b"]), BAD_REQUEST),
    "bare-cr-in-header": (_req("GET", "/ip?{case}", ["X-Bad: a\rb"]), BAD_REQUEST),
    "bare-lf-in-header": (_req("GET", "/ip?{case}", ["X-Bad: a\nX-Other: b"]), BAD_REQUEST),
    "non-token-method": (_req("GE@T", "/ip?{case}", []), BAD_REQUEST),
    "request-line-over-64k": (
        _req("GET", "/ip?{case}&pad=" + "a" * (70 * 1024), []),
        frozenset({414}),
    ),
    "header-block-over-64k": (
        _req("GET", "/ip?{case}", [f"X-Filler-{i}: {'a' * 1000}" for i in range(70)]),
        frozenset({431}),
    ),
    "too-many-headers": (
        _req("GET", "/ip?{case}", [f"X-Many-{i}: a" for i in range(300)]),
        frozenset({431}),
    ),
    "http-2.0": (_req("GET", "/ip?{case}", [], version="HTTP/2.0"), frozenset({505})),
    "absolute-form-port-0": (_port_zero, BAD_REQUEST),
    "all-bare-lf": (_all_bare_lf, BAD_REQUEST),
    "tls-client-hello": (_client_hello, BAD_REQUEST),
}

_CHUNKED = ["Transfer-Encoding: chunked"]

# Valid heads, bad chunked bodies: the head may already be upstream when the body fails.
BODY_CASES: dict[str, Build] = {
    "chunk-size-G": _req("POST", "/upload?{case}", _CHUNKED, b"5\r\nhello\r\nG\r\n\r\n"),
    "chunk-size-minus-1": _req("POST", "/upload?{case}", _CHUNKED, b"-1\r\nhello\r\n0\r\n\r\n"),
    "chunk-data-without-crlf": _req("POST", "/upload?{case}", _CHUNKED, b"5\r\nhelloXX0\r\n\r\n"),
    "chunk-data-then-bare-lf": _req("POST", "/upload?{case}", _CHUNKED, b"5\r\nhello\n0\r\n\r\n"),
    "chunk-last-size-bare-lf": _req("POST", "/upload?{case}", _CHUNKED, b"5\r\nhello\r\n0\n\r\n"),
    # Every line ends in a bare LF: no CRLF ever comes, the body is invalid from its
    # first line on, and nothing the client could still send would make it valid.
    "chunk-all-bare-lf": _req("POST", "/upload?{case}", _CHUNKED, b"5\nhello\n0\n\n"),
}


def _port(upstream: Upstream, scheme: str) -> int:
    return upstream.http_port if scheme == "http" else upstream.https_port


@pytest.mark.parametrize("case", list(HEAD_CASES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_malformed_request_refused_and_never_forwarded(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, case: str
) -> None:
    build, statuses = HEAD_CASES[case]
    marker = f"{RUN}-{scheme}-{case}"
    with _client(proxy, _port(upstream, scheme), scheme) as (sock, prefix, host):
        _send(sock, build(prefix, host, marker))
        answer = _answer(sock)
    assert answer.status is not None, f"no status line from the proxy: {answer}"
    assert answer.status in statuses, (answer.status, answer.data[:500])
    assert b"aiohttp" not in answer.head, "the answer came from the upstream"
    assert re.search(rb"(?im)^content-type: text/plain", answer.head), answer.head
    assert answer.end == "close", f"connection reset instead of closed after {answer.status}"
    _sync_request(proxy, upstream, scheme)
    assert _seen(upstream, marker) == [], "the upstream received the malformed request"
    REFUSED_IN_TIME.append(marker)


def _upload_answers(proxy: ProxyProcess, marker: str) -> list[int]:
    """Statuses of the proxy's "inbound response" lines for this case's request."""
    return [
        int(line["fields"].get("status_code", 0))
        for line in proxy.logs("inbound response")
        if f"case={marker}" in str(line["fields"].get("url", ""))
    ]


@pytest.mark.parametrize("case", list(BODY_CASES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bad_chunked_body_never_completes_upstream(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, case: str
) -> None:
    marker = f"{RUN}-{scheme}-{case}"
    with _client(proxy, _port(upstream, scheme), scheme) as (sock, prefix, host):
        _send(sock, BODY_CASES[case](prefix, host, marker))
        answer = _answer(sock)
    status = answer.status
    if status is None:
        assert answer.data == b"", f"not a status line: {answer.data[:300]!r}"
        assert answer.end == "reset", "closed without an answer: neither a 4xx nor a reset"
    else:
        assert 400 <= status < 500, (status, answer.data[:500])
        assert b"aiohttp" not in answer.head, "the answer came from the upstream"
        assert answer.end == "close", f"connection reset instead of closed after {status}"
    _sync_request(proxy, upstream, scheme)
    if _seen(upstream, marker):
        # The head went upstream: the exchange must have ended without the upstream's
        # answer (its /upload would have answered 200 with the length it received).
        line = proxy.wait_for_log(
            "inbound response",
            lambda ln: f"case={marker}" in str(ln["fields"].get("url", "")),
        )
        assert "error" in line["fields"], line
    assert 200 not in _upload_answers(proxy, marker), "the upstream answered a bad upload"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transfer_coding_under_chunked_is_not_silently_dropped(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """`Transfer-Encoding: gzip, chunked`: refused, or forwarded saying gzip.

    Decoding only the chunked layer and forwarding "Transfer-Encoding: chunked" would
    hand the server gzip bytes as if they were the content itself.
    """
    marker = f"{RUN}-{scheme}-te-gzip-chunked"
    data = gzip.compress(b"hello, world\n" * 10)
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    headers = ["Transfer-Encoding: gzip, chunked", "Connection: close"]
    build = _req("POST", "/upload?{case}", headers, body)
    with _client(proxy, _port(upstream, scheme), scheme) as (sock, prefix, host):
        _send(sock, build(prefix, host, marker))
        answer = _answer(sock, SOCK_TIMEOUT)
    _sync_request(proxy, upstream, scheme)
    seen = [s for s in list(upstream.seen_headers) if f"case={marker}" in s["path"]]
    if answer.status is not None and answer.status >= 400 and not seen:
        assert answer.status in (400, 501), answer.data[:300]
        return
    assert seen, f"neither refused nor forwarded: {answer.data[:300]!r}"
    codings = [
        value.lower() for name, value in seen[0]["headers"] if name.lower() == "transfer-encoding"
    ]
    assert any("gzip" in v for v in codings), (
        f"forwarded with Transfer-Encoding {codings}: the gzip coding was dropped"
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_http10_request_with_transfer_encoding_is_answered_then_closed(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing (a smuggling vector).

    The message is processed, then the connection closed, though it asked for keep-alive.
    """
    marker = f"{RUN}-{scheme}-http10-te"
    headers = ["Connection: keep-alive", "Transfer-Encoding: chunked"]
    build = _req("POST", "/upload?{case}", headers, b"5\r\nhello\r\n0\r\n\r\n", "HTTP/1.0")
    with _client(proxy, _port(upstream, scheme), scheme) as (sock, prefix, host):
        _send(sock, build(prefix, host, marker))
        answer = _answer(sock)
    assert answer.status == 200, answer.data[:300]
    assert json.loads(answer.data.partition(b"\r\n\r\n")[2])["length"] == 5
    assert re.search(rb"(?im)^connection: close(\r|$)", answer.head), answer.head
    assert answer.end == "close"


@pytest.mark.parametrize("split", [False, True], ids=["together", "split"])
@pytest.mark.parametrize(
    "blank", [b"\r\n\r\n", b"\r\n" * 5, b"\n", b"\n\r\n\n"], ids=["two", "five", "lf", "mixed"]
)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_empty_lines_before_the_request_line_are_ignored(
    proxy: ProxyProcess, upstream: Upstream, scheme: str, blank: bytes, split: bool
) -> None:
    """RFC 9112 2.2: empty lines before a request-line are ignored, even when they
    arrive on their own (once, they ended a "head" of nothing: a 505 for HTTP/0.0)."""
    build = _req("GET", "/ip?{case}", ["Connection: close"])
    marker = f"{RUN}-{scheme}-blank-{blank.hex()}-{split}"
    with _client(proxy, _port(upstream, scheme), scheme) as (sock, prefix, host):
        request = build(prefix, host, marker)
        if split:
            _send(sock, blank)
            time.sleep(0.2)  # read by the proxy on their own
            _send(sock, request)
        else:
            _send(sock, blank + request)
        answer = _answer(sock)
    assert answer.status == 200, answer.data[:300]
    assert b'"peer"' in answer.data
    assert _seen(upstream, marker), "the upstream never received the request"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_flood_of_empty_lines_is_refused(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """Ignored empty lines still count against the head size limit (64 KiB)."""
    with _client(proxy, _port(upstream, scheme), scheme) as (sock, _, _):
        _send(sock, b"\r\n" * (32 * 1024 + 1))  # all of it is read: then a FIN, no RST
        answer = _answer(sock)
    assert answer.status == 400, answer.data[:300]
    assert re.search(rb"(?im)^content-type: text/plain", answer.head), answer.head
    assert answer.end == "close"


def test_connect_to_port_0_is_refused(proxy: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
        _send(sock, b"CONNECT 127.0.0.1:0 HTTP/1.1\r\nHost: 127.0.0.1:0\r\n\r\n")
        answer = _answer(sock)
    assert answer.status == 400, answer.data[:300]
    assert b"invalid port" in answer.data
    assert answer.end == "close"


# --------------------------------------------------------------------------- fuzzing

# Pieces of HTTP syntax to splice with random bytes. Nothing here can form an
# absolute-form target or an authority (no "http://", no CONNECT): a random head can
# never make the proxy dial anything, so none can legitimately be served with a 2xx.
_PIECES = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"HEAD",
        b"OPTIONS",
        b"PRI",
        b"*",
        b" ",
        b"\t",
        b"/",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"\r\n",
        b"\r",
        b"\n",
        b"Host:",
        b"Content-Length:",
        b"Transfer-Encoding:",
        b"chunked",
        b"Connection: close",
        b"Upgrade: websocket",
        b"0",
        b"5",
        b",",
        b";",
        b"\x00",
        b"\xff",
        b"%00",
    ]
)
_HEADS = st.one_of(
    st.binary(max_size=2048),
    st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=48).map(b"".join),
)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(head=_HEADS)
def test_random_heads_get_an_error_or_a_close(proxy: ProxyProcess, head: bytes) -> None:
    blank_only = head == b"\r\n" * (len(head) // 2)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as sock:
        # The blank line ends the head: the proxy must decide now, not wait for more.
        _send(sock, head + b"\r\n\r\n")
        if blank_only:
            # Nothing but empty lines, which precede a request-line (RFC 9112 2.2): the
            # proxy waits for one, so the client says there is none.
            sock.shutdown(socket.SHUT_WR)
        answer = _answer(sock)
    if blank_only:
        assert answer.data == b"", answer.data[:300]
    if answer.data:
        status = answer.status
        assert status is not None, f"not a status line: {answer.data[:200]!r}"
        assert 400 <= status <= 599, (head, answer.data[:300])
        assert answer.end == "close", f"reset after {status} for {head!r}"
    # else: closed without a word (e.g. nothing but blank lines), which is fine.


@pytest.mark.parametrize("scheme", SCHEMES)
def test_proxy_keeps_serving_after_the_corpus(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = (upstream.http_url if scheme == "http" else upstream.https_url)("/ip?after-corpus")
    with requests_session(proxy) as s, s.get(url, timeout=SOCK_TIMEOUT) as r:
        assert r.status_code == 200
        assert r.json()["peer"] in EGRESS


def test_no_refused_request_reached_the_upstream_later(upstream: Upstream) -> None:
    """Requests refused from their head alone never show up upstream, even late."""
    assert REFUSED_IN_TIME, "run with the corpus above"
    seen = [s["path"] for s in list(upstream.seen_headers)]
    leaked = [p for p in seen for m in REFUSED_IN_TIME if f"case={m}" in p]
    assert leaked == []


# --------------------------------------------------------------------------- responses


def _filler_head() -> bytes:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    return b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\nok"


_PARTIAL = b"p" * 50_000
# path -> response bytes, sent at once. Nothing of these can be relayed: a 502.
BAD_RESPONSES: dict[str, bytes] = {
    "/cl-and-te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "/two-content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "/head-over-64k": _filler_head(),
    "/garbage-status-line": b"HTTP/1.1 2OO Fine\r\nContent-Length: 2\r\n\r\nok",
    "/not-http": b"\x16\x03\x01 this is not HTTP at all\r\n\r\n",
    "/nothing": b"",
    # The head and a bad first chunk size in one segment: the head is not relayed yet.
    "/bad-chunk-size-with-the-head": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    # chunked not last, or twice (RFC 9112 6.1): once relayed until the close, the chunk
    # framing reaching the client as content, labelled with the other codings.
    "/te-chunked-then-gzip": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "/te-chunked-twice": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    # RFC 9110 15: 100-599 only (099 was relayed as "99", 600 with its body).
    "/status-099": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
    "/status-600": b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
    # RFC 9112 4: no control bytes in the reason phrase (NUL, ESC went to the client).
    "/nul-in-reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok",
    "/esc-in-reason": b"HTTP/1.1 200 \x1b[2J\r\nContent-Length: 2\r\n\r\nok",
    # RFC 9110 15.2.2: a 101 names the protocol switched to.
    "/101-without-upgrade": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\nok",
}
# An endless run of interim responses (here 200 of them) held the request for ever and
# grew the proxy's memory by a GiB in seconds.
# The upstream keeps the connection open after these: an answer that never ends waited
# out --response-timeout (a 504 "no response" after 2 minutes).
NEVER_ENDING_HEADS: dict[str, bytes] = {
    "/bare-lf-head": b"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 2\n\nok",
    "/not-http-open": b"SSH-2.0-OpenSSH_9.2\r\n",
}
ENDLESS_INTERIM = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 200
    + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
)
# The head is relayed first, then the body goes wrong: the client sees an aborted transfer.
MID_BODY = ("/bad-chunk-size", "/cut-mid-body", "/cut-mid-chunked", "/reset-mid-body")


class BadUpstream(RawServer):
    """Answers every request with the malformed response its path names, then closes."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        path = head.split(b" ", 2)[1].decode("latin-1")
        self.seen.append(path)
        if path in BAD_RESPONSES:
            sock.sendall(BAD_RESPONSES[path])
        elif path in NEVER_ENDING_HEADS:
            sock.sendall(NEVER_ENDING_HEADS[path])
            time.sleep(ANSWER_TIMEOUT + 1)
        elif path == "/endless-interim":
            sock.sendall(ENDLESS_INTERIM)
        elif path == "/bad-chunk-size":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            time.sleep(0.3)  # the head and first chunk are relayed by now
            sock.sendall(b"zz\r\nhello\r\n0\r\n\r\n")
            time.sleep(0.3)
        elif path in ("/cut-mid-body", "/reset-mid-body"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + _PARTIAL)
            time.sleep(0.3)
            if path == "/reset-mid-body":
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif path == "/space-before-colon":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\nX-Odd\t: yes\r\n\r\nhello")
        elif path == "/zero-padded-length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 005 \r\nX: y\r\n\r\nhello")
        elif path == "/connection-names-content-length":
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
            )
        elif path in ("/close-delimited", "/close-delimited-close-notify", *CLOSED_CODINGS):
            coding = CLOSED_CODINGS.get(path)
            te = b"Transfer-Encoding: %s\r\n" % coding[0] if coding else b""
            sock.sendall(
                b"HTTP/1.1 200 OK\r\n" + te + b"\r\n" + (coding[1] if coding else _PARTIAL)
            )
            time.sleep(0.3)
            if path != "/close-delimited" and isinstance(sock, ssl.SSLSocket):
                sock.unwrap()  # a clean TLS end: close_notify, then the FIN
        elif path == "/cut-mid-chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            sock.sendall(b"%x\r\n%s\r\n" % (len(_PARTIAL), _PARTIAL))
            time.sleep(0.3)
        else:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        # Leaving: a FIN (no TLS close_notify either), or a RST when SO_LINGER 0 is set.


# Bodies delimited by the close that carry a transfer coding other than chunked.
CLOSED_CODINGS = {
    "/te-identity": (b"identity", b"hello world"),
    "/te-gzip": (b"gzip", gzip.compress(b"hello world")),
}


@pytest.fixture(scope="module")
def bad_upstreams(upstream: Upstream) -> Iterator[dict[str, BadUpstream]]:
    # The proxy trusts upstream.ca (--upstream-ca): a leaf from it makes a valid TLS server.
    with plain_and_tls(BadUpstream, upstream.ca) as servers:
        yield servers


def _bad_url(servers: dict[str, BadUpstream], scheme: str, path: str) -> str:
    return f"{scheme}://127.0.0.1:{servers[scheme].port}{path}"


@pytest.mark.parametrize("path", list(BAD_RESPONSES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_malformed_response_is_a_plain_502(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str, path: str
) -> None:
    with requests_session(proxy) as s:
        try:
            r = s.get(_bad_url(bad_upstreams, scheme, path), timeout=20)
        except requests.exceptions.ConnectionError as exc:
            raise AssertionError(
                f"no answer at all, though nothing had been relayed yet: {exc!r}"
            ) from None
    with r:
        assert r.status_code == 502, (r.status_code, r.content[:200])
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.text.strip(), "a 502 without a reason"
        assert b"hello" not in r.content
        assert r.content != b"ok"
    assert path in bad_upstreams[scheme].seen  # the 502 is about the response, not a connect


@pytest.mark.parametrize("path", list(NEVER_ENDING_HEADS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_head_that_can_never_end_is_a_502_at_once(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str, path: str
) -> None:
    with requests_session(proxy) as s:
        r = s.get(_bad_url(bad_upstreams, scheme, path), timeout=ANSWER_TIMEOUT)
    assert r.status_code == 502 and "malformed upstream response" in r.text, r.text


def test_interim_responses_are_relayed_up_to_a_bound_then_502(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream]
) -> None:
    url = _bad_url(bad_upstreams, "http", "/endless-interim")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as c:
        c.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"HTTP/1.1 502 " not in data and b"\r\n\r\nok" not in data:
            chunk = c.recv(65536)
            assert chunk, data[-300:]
            data += chunk
    statuses = [int(m) for m in STATUS_LINE.findall(data)]
    assert statuses == [103] * 32 + [502], statuses
    assert b"interim" in data.rsplit(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_close_delimited_body_is_complete_only_with_a_clean_end(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str
) -> None:
    """RFC 9112 9.8: a body delimited by the close is complete after a FIN over plain
    TCP, or a close_notify over TLS; a TLS connection that just drops is a truncation,
    and the client must see an error (the proxy re-chunks, so it can signal one)."""
    with requests_session(proxy) as s:
        for path in ("/close-delimited-close-notify", "/close-delimited"):
            url = _bad_url(bad_upstreams, scheme, path)
            if scheme == "https" and path == "/close-delimited":
                with pytest.raises(
                    (
                        requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ConnectionError,
                    )
                ):
                    s.get(url, timeout=20).content  # noqa: B018
                continue
            with s.get(url, timeout=20) as r:
                assert r.status_code == 200
                assert r.content == _PARTIAL


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_close_delimited_coding_is_not_chained_with_a_chunked_of_ours(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str
) -> None:
    """Transfer-Encoding: identity (no coding at all) went out as "identity, chunked",
    which stdlib http.client does not take for chunked: it hung to its timeout. gzip
    went out as "gzip, chunked", a framing the upstream never chose."""
    port = bad_upstreams[scheme].port
    conn: http.client.HTTPConnection
    if scheme == "https":
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, timeout=10, context=ctx)
        conn.set_tunnel("127.0.0.1", port)
        prefix = ""
    else:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        prefix = f"http://127.0.0.1:{port}"
    try:
        conn.request("GET", prefix + "/te-identity")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"hello world"
        conn.close()
        conn.request("GET", prefix + "/te-gzip")
        r = conn.getresponse()
        assert r.getheader("Transfer-Encoding") == "gzip", r.getheaders()
        assert r.getheader("Connection") == "close"
        assert r.read() == CLOSED_CODINGS["/te-gzip"][1]  # as sent: ours to relay, not decode
    finally:
        conn.close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_response_whose_connection_names_content_length_stays_framed(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str
) -> None:
    """The response keeps its Content-Length, so the client connection can go on (else
    the next response would run on from this body)."""
    url = _bad_url(bad_upstreams, scheme, "/connection-names-content-length")
    with requests_session(proxy) as s:
        for _ in range(2):  # the second on the same client connection
            with s.get(url, timeout=20) as r:
                assert r.status_code == 200
                assert r.headers["Content-Length"] == "5"
                assert r.content == b"hello"


def test_content_length_goes_on_in_plain_digits(
    proxy: ProxyProcess, upstream: Upstream, bad_upstreams: dict[str, BadUpstream]
) -> None:
    """ "005 " is a valid length, and passed on as it came, a next hop that reads it
    another way (octal, or not at all) frames the body another way: one field in plain
    digits goes on, both ways (ARCHITECTURE: framing is re-declared)."""
    asks = {
        upstream.http_url("/headers"): b"Content-Length: 000 \r\n",
        _bad_url(bad_upstreams, "http", "/zero-padded-length"): b"",
    }
    answers = []
    for url, field in asks.items():
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCK_TIMEOUT) as c:
            c.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n%sConnection: close\r\n\r\n" % (
                url.encode(), field))  # fmt: skip
            answers.append(_answer(c).data)
    assert answers[0].startswith(b"HTTP/1.1 200 "), answers[0]
    assert ["Content-Length", "0"] in json.loads(answers[0].partition(b"\r\n\r\n")[2])
    assert b"\r\nContent-Length: 5\r\nX: y\r\n" in answers[1], answers[1]
    assert answers[1].endswith(b"\r\n\r\nhello")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_whitespace_before_a_colon_is_removed_and_the_response_relayed(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str
) -> None:
    """RFC 9112 5.1: "A proxy MUST remove any such whitespace from a response message
    before forwarding": relayed, its fields as the server meant them, not a 502."""
    url = _bad_url(bad_upstreams, scheme, "/space-before-colon")
    with requests_session(proxy) as s, s.get(url, timeout=20) as r:
        assert r.status_code == 200
        assert (r.headers["Content-Length"], r.headers["X-Odd"]) == ("5", "yes")
        assert r.content == b"hello"


def test_a_101_without_upgrade_is_a_502_that_says_so(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream]
) -> None:
    with requests_session(proxy) as s:
        r = s.get(_bad_url(bad_upstreams, "http", "/101-without-upgrade"), timeout=20)
    assert r.status_code == 502
    assert "101 without an Upgrade field" in r.text, r.text


class Http10ChunkedUpstream(RawServer):
    """HTTP/1.0 answers with Transfer-Encoding and "Connection: keep-alive", on a
    connection it keeps open for more: `connections` numbers each request's connection."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(tls)
        self.connections: list[int] = []
        self._numbers = itertools.count()

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        number = next(self._numbers)
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
            data = data.partition(b"\r\n\r\n")[2]  # GETs: no body
            self.connections.append(number)
            sock.sendall(
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
                b"\r\n5\r\nhello\r\n0\r\n\r\n"
            )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_http10_upstream_with_transfer_encoding_is_never_reused(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    """RFC 9112 6.1: an HTTP/1.0 response with Transfer-Encoding has faulty framing, so
    its connection is closed after it, whatever "Connection: keep-alive" says."""
    with (
        plain_and_tls(Http10ChunkedUpstream, upstream.ca) as servers,
        requests_session(proxy) as s,
    ):
        # One more request than egress addresses: at least one address goes twice, and
        # would find the connection it used before in the pool.
        for i in range(len(EGRESS) + 1):
            with s.get(_bad_url(servers, scheme, f"/{i}"), timeout=20) as r:
                assert r.status_code == 200
                assert r.content == b"hello"
        connections = servers[scheme].connections
    assert len(connections) == len(EGRESS) + 1
    assert len(set(connections)) == len(connections), "an upstream connection was reused"


def _assert_aborted(fetch: Callable[[], requests.Response]) -> None:
    try:
        r = fetch()
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        return  # the truncation was signalled
    raise AssertionError(
        f"a truncated response looked complete: {r.status_code}, {len(r.content)} bytes"
    )


@pytest.mark.parametrize("path", MID_BODY)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_response_broken_mid_body_is_aborted_requests(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str, path: str
) -> None:
    url = _bad_url(bad_upstreams, scheme, path)
    with requests_session(proxy) as s:
        _assert_aborted(lambda: s.get(url, timeout=20))
        # The log says what the client got, a 200 cut short (it said 502).
        line = proxy.wait_for_log(
            "inbound response",
            lambda d: d["fields"]["url"].endswith(path) and "error" in d["fields"],
        )
        assert line["fields"]["status_code"] == 200, line
        # The client's next request, on a fresh connection, is served.
        with s.get(url.rsplit("/", 1)[0] + "/two-content-lengths", timeout=20) as r:
            assert r.status_code == 502


# What the 502's text (before the body) or the log's error (mid-body) says when the
# upstream drops the connection: a FIN is a close, with or without TLS (a FIN with no
# close_notify read as "upstream reset the connection"); SO_LINGER 0 is a reset.
CLOSE_REASONS = {
    ("http", "/nothing"): "upstream closed the connection without a response",
    (
        "https",
        "/nothing",
    ): "upstream closed the connection without a response (no TLS close_notify)",
    ("http", "/cut-mid-body"): "connection closed before the end of the body",
    ("https", "/cut-mid-body"): "upstream closed the connection mid-body (no TLS close_notify)",
    ("http", "/reset-mid-body"): "upstream reset the connection mid-body",
    ("https", "/reset-mid-body"): "upstream reset the connection mid-body",
}


@pytest.mark.parametrize(("scheme", "path"), list(CLOSE_REASONS))
def test_a_close_is_told_apart_from_a_reset(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str, path: str
) -> None:
    url = _bad_url(bad_upstreams, scheme, path)
    reason = CLOSE_REASONS[(scheme, path)]
    with requests_session(proxy) as s:
        if path == "/nothing":
            with s.get(url, timeout=20) as r:
                assert r.status_code == 502
                assert r.text.strip().endswith(reason), r.text
            return
        _assert_aborted(lambda: s.get(url, timeout=20))
    line = proxy.wait_for_log(
        "inbound response",
        lambda d: d["fields"]["url"] == url and "error" in d["fields"],
    )
    assert reason in line["fields"]["error"], line


@pytest.mark.parametrize("path", MID_BODY)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_response_broken_mid_body_is_aborted_curl(
    proxy: ProxyProcess, bad_upstreams: dict[str, BadUpstream], scheme: str, path: str
) -> None:
    res = subprocess.run(
        [
            "curl",
            "-q",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "20",
            "--proxy",
            proxy.url,
            "--cacert",
            str(proxy.ca_path),
            _bad_url(bad_upstreams, scheme, path),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    # 18: transfer closed with bytes remaining; 56: failure receiving (reset).
    assert res.returncode in (18, 56), (res.returncode, res.stderr)
