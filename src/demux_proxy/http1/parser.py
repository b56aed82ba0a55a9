"""Request and response heads: httptools (llhttp, strict) for syntax, our rules for framing.

The connection code finds the end of a head in its buffer (`find_head_end`) and hands the
head alone to `parse_request_head` / `parse_response_head`. llhttp never sees body bytes:
body framing is ours (`framing.py`), so that HEAD responses, CONNECT, upgrades and
streaming with backpressure follow the RFC 9112 rules below rather than a parser's
buffering. A fresh llhttp parser per head costs about a microsecond.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import httptools

from demux_proxy.errors import ProtocolError, UpstreamError
from demux_proxy.http1.headers import (
    Headers,
    connection_tokens,
    replace,
    response_connection,
    websocket_upgrade,
)

# Like h11 (16 KiB) we bound the head; 64 KiB matches what the hardening issue names and
# sits between nginx's default (8 KiB x 4 buffers) and Node's 16 KiB per field.
DEFAULT_MAX_HEAD_BYTES: Final = 64 * 1024
MAX_HEADER_COUNT: Final = 256

_CRLF2: Final = b"\r\n\r\n"
_TOKEN: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RFC 9112 4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ); llhttp takes any byte
# but CR and LF there, NUL included, and the phrase is relayed to the client as it came.
_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_CONTENT_LENGTH_LEN: Final = 14
_TRANSFER_ENCODING_LEN: Final = 17
assert (
    len(b"content-length"),
    len(b"transfer-encoding"),
) == (_CONTENT_LENGTH_LEN, _TRANSFER_ENCODING_LEN)


# Heads are values, but not frozen dataclasses: frozen pays an object.__setattr__ per
# field (1.2 us for ten fields), twice per request. Nothing changes a head once parsed.
@dataclass(slots=True, init=False)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"1.0" or b"1.1"
    headers: Headers
    content_length: int | None  # None when chunked or no body
    chunked: bool
    keep_alive: bool
    upgrade: bool  # carries Upgrade and Connection: upgrade
    expect_continue: bool
    connection: frozenset[bytes]  # Connection tokens: fields the forwarder must drop
    host: bytes | None  # the Host field's value (there is at most one)

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        upgrade: bool,
        expect_continue: bool,
        connection: frozenset[bytes],
        host: bytes | None,
    ) -> None:
        # Written out (init=False): the compiled module runs this __init__ natively,
        # the dataclass-generated one is interpreted (per request).
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        self.connection = connection
        self.host = host


@dataclass(slots=True, init=False)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    content_length: int | None
    chunked: bool
    keep_alive: bool
    codings: list[bytes]  # transfer codings other than chunked (gzip...), passed on
    connection: frozenset[bytes]  # Connection tokens: fields the forwarder must drop
    idle_s: float | None  # Keep-Alive: timeout=N, how long the server keeps it idle

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        codings: list[bytes],
        connection: frozenset[bytes],
        idle_s: float | None,
    ) -> None:
        # Written out: see RequestHead.
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.codings = codings
        self.connection = connection
        self.idle_s = idle_s


class _Collector:
    """httptools callbacks: keep what llhttp found, nothing else."""

    __slots__ = ("headers", "reason", "url")

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.headers: Headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def find_head_end(
    buf: bytes | bytearray, max_bytes: int, *, request: bool, checked: int = 0
) -> int:
    """Index just past the blank line ending a head in `buf`, or -1 when more data is needed.

    Raises when the head outgrows `max_bytes`: 431 for a request (RFC 6585), 502 for a
    response, since the upstream is then the one misbehaving; and when the head can never
    end (`_check_partial_head`). `checked`: how much of `buf` an earlier call already
    looked at, for a caller that calls again as more arrives (only the rest is scanned).
    """
    end = buf.find(_CRLF2)  # one argument: bounds would be boxed ints, per call
    if 0 <= end <= max_bytes:
        return end + 4
    if len(buf) > max_bytes:
        if request:
            first_line_end = buf.find(b"\r\n", 0, max_bytes)
            if first_line_end < 0:
                raise ProtocolError("request line too long", status=414)
            raise ProtocolError("request header block too large", status=431)
        raise UpstreamError("upstream response head too large")
    if buf:
        _check_partial_head(buf, request, checked)
    return -1


# A request-line starts with a method (a token); a status-line with "HTTP/".
_TCHAR: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
_BLANK_LINE_BYTES: Final = frozenset(b"\r\n")


def _check_partial_head(buf: bytes | bytearray, request: bool, checked: int) -> None:
    """Refuse at once a head that can never end: it would wait out a timeout (408, 504)
    for a blank line that never comes. A TLS ClientHello (a client told to speak https
    to the proxy itself), bare-LF line ends (strict: RFC 9112 2.2 allows refusing them)."""
    start = 0
    while start < len(buf) and buf[start] in _BLANK_LINE_BYTES:
        start += 1  # empty lines before the start line (RFC 9112 2.2), CRLF or a lone LF
    if start == len(buf):
        return
    first = buf[start]
    if first not in _TCHAR if request else first != 0x48:
        if request:
            hint = " (TLS? the proxy URL is http://, not https://)" if first == 0x16 else ""
            raise ProtocolError(f"not an HTTP request{hint}")
        raise UpstreamError("malformed upstream response: not HTTP")
    # Only what came since the last look: a head trickled in small pieces must not cost
    # a scan of all of it per piece (the lookbehind still sees the byte before `checked`).
    if _BARE_LF.search(buf, max(start, checked)) is not None:
        if request:
            raise ProtocolError("bare LF in the request head: lines end with CRLF")
        raise UpstreamError("malformed upstream response: bare LF in the head")


def _length(headers: Headers, *, upstream: bool) -> tuple[int | None, bool, list[bytes], bool]:
    """(content_length, chunked, other transfer codings, any Transfer-Encoding) per RFC
    9112 section 6.

    Transfer-Encoding lines form one list (RFC 9110 5.3): "x" then "chunked" on two lines
    is "x, chunked", never just "chunked".
    """
    length: int | None = None
    codings: list[bytes] = []
    has_te = False
    # Content-Length "005", "5 " or "5" twice is valid; passed on as it came, the next
    # recipient could frame it otherwise. It goes on once, in plain digits, in the
    # first one's place and with its name (RFC 9110 8.6).
    first = b""  # the first Content-Length field's name
    recast = False
    for name, value in headers:
        size = len(name)
        if size != _CONTENT_LENGTH_LEN and size != _TRANSFER_ENCODING_LEN:
            continue  # spares a lower() (an allocation) for nearly every field
        lname = name.lower()
        if lname == b"content-length":
            digits = value.strip()
            # 1 to 18 ASCII digits (bytes.isdigit is ASCII only): no sign, no space, no "_".
            if not digits.isdigit() or len(digits) > 18:
                _fail(upstream, "invalid Content-Length")
            n = int(digits)
            if length is not None:
                if length != n:
                    _fail(upstream, "conflicting Content-Length values")
                recast = True
            else:
                first = name
                recast = len(digits) != len(value) or (len(digits) > 1 and digits[0] == 0x30)
            length = n
        elif lname == b"transfer-encoding":
            has_te = True
            codings += [c.strip().lower() for c in value.split(b",")]
    if recast and length is not None:
        headers[:] = replace(headers, b"content-length", first, b"%d" % length)  # in place
    if not has_te:
        return length, False, [], False  # the common case, without the checks below
    if length is not None:
        # Both present is the classic smuggling vector: refuse rather than pick one (6.1).
        _fail(upstream, "both Transfer-Encoding and Content-Length")
    # chunked must be the final coding, and only once (RFC 9112 6.1). Anywhere else its
    # framing would pass as content (a response) or leave the body undelimited: refuse.
    n_chunked = codings.count(b"chunked")
    chunked = n_chunked == 1 and codings[len(codings) - 1] == b"chunked"
    if n_chunked and not chunked:
        _fail(upstream, "chunked is not the final transfer coding, or not the only one")
    if chunked:
        codings.pop()  # the others, in order: passed on (a response) or refused (a request)
    if not all(codings) or any(not _TOKEN.match(c) for c in codings):
        _fail(upstream, "invalid Transfer-Encoding")
    return length, chunked, codings, has_te


def _keep_alive(version: bytes, tokens: frozenset[bytes]) -> bool:
    """RFC 9112 9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive"."""
    if version == b"1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def _fail(upstream: bool, reason: str) -> None:
    if upstream:
        raise UpstreamError(f"malformed upstream response: {reason}")
    raise ProtocolError(reason)


def _version(raw: str, *, upstream: bool) -> bytes:
    if raw == "1.1":
        return b"1.1"
    if raw == "1.0":
        return b"1.0"
    if upstream:
        raise UpstreamError(f"upstream speaks unsupported HTTP/{raw}")
    raise ProtocolError(f"unsupported HTTP version {raw}", status=505)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (ending in CRLFCRLF). Raises only ProtocolError."""
    while head.startswith(b"\r\n"):  # RFC 9112 2.2: ignore at least one empty line first
        head = head[2:]
    c = _Collector()
    parser = httptools.HttpRequestParser(c)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT or Upgrade: llhttp stops after the head, which is all we gave it.
    except httptools.HttpParserInvalidMethodError:
        method = head.split(b" ", 1)[0]
        if not _TOKEN.match(method):
            raise ProtocolError("invalid request method") from None
        # llhttp knows a fixed list; any token is a method, case-sensitive (RFC 9110 9.1),
        # and a proxy relays the ones it does not know (BAN, a lower-case get...): the
        # rest of the head is parsed as a GET's, and the method put back.
        parsed = parse_request_head(b"GET" + head[len(method) :])
        parsed.method = method
        return parsed
    except httptools.HttpParserError as exc:
        line_end = head.find(b"\r\n")
        newer = _as_http11(head, line_end - 8, upstream=False) if line_end >= 8 else None
        if newer is not None:
            return parse_request_head(newer)
        raise ProtocolError(f"malformed request: {exc}") from None
    if len(c.headers) > MAX_HEADER_COUNT:
        raise ProtocolError("too many header fields", status=431)
    # llhttp accepted the line, so it ends in "HTTP/d.d": read the digits there rather
    # than have get_http_version() format a string (anything else: the general path).
    line_end = head.find(b"\r\n")
    # (No negative index: the compiled slice of a bytes object does not take one.)
    version = head[line_end - 3 : line_end] if line_end >= 3 else b""
    if version != b"1.1" and version != b"1.0":
        version = _version(parser.get_http_version(), upstream=False)
    method = parser.get_method()
    length, chunked, codings, has_te = _length(c.headers, upstream=False)
    if codings and chunked:
        # We re-frame bodies and would drop a coding we do not implement (9112 6.1: 501).
        raise ProtocolError(
            f"transfer coding {codings[0].decode('latin-1')!r} not implemented", status=501
        )
    if has_te and not chunked:
        # A request body we cannot delimit (RFC 9112 6.3 rule 4): 400 and close.
        raise ProtocolError("Transfer-Encoding without chunked as the final coding")
    tokens = connection_tokens(c.headers)
    keep_alive = _keep_alive(version, tokens)
    if has_te and version == b"1.0":
        # RFC 9112 6.1: Transfer-Encoding in 1.0 is faulty framing (a smuggling vector):
        # process this message, then close.
        keep_alive = False
    # RFC 9110 7.8: a server ignores Upgrade in a 1.0 request; and only WebSocket is
    # relayed (see websocket_upgrade). Not upgraded, the Connection-listed Upgrade (and
    # HTTP2-Settings...) are dropped, and the request goes on as plain HTTP/1.1.
    upgrade = (
        version == b"1.1" and b"upgrade" in tokens and websocket_upgrade(c.headers) is not None
    )
    expect = False
    host: bytes | None = None
    for n, v in c.headers:  # a loop, not any(genexpr): no generator per request
        size = len(n)
        if size == 4:
            if n.lower() == b"host":
                if host is not None:  # RFC 9112 3.2: which one would the server take?
                    raise ProtocolError("more than one Host field")
                host = v.strip()
        elif size == 6 and n.lower() == b"expect" and v.strip().lower() == b"100-continue":
            expect = True
    # Positional, in field order: keywords cost about as much again as the construction.
    return RequestHead(
        method,
        c.url,
        version,
        c.headers,
        None if chunked else length,
        chunked,
        keep_alive,
        upgrade,
        expect,
        tokens,
        host,
    )


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a complete response head. Raises only UpstreamError (a 502 for our client)."""
    c = _Collector()
    parser = httptools.HttpResponseParser(c)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        repaired = (
            _as_http11(head, 0, upstream=True) or _no_space_before_colon(head) or _one_length(head)
        )
        if repaired is not None:
            return parse_response_head(repaired)
        if head[9:13] == b"101 " and not _UPGRADE_LINE.search(head):
            # llhttp's own words here ("Pause on CONNECT/Upgrade") would tell a user nothing.
            raise UpstreamError(
                "malformed upstream response: 101 without an Upgrade field (RFC 9110 15.2.2)"
            ) from None
        raise UpstreamError(f"malformed upstream response: {exc}") from None
    if len(c.headers) > MAX_HEADER_COUNT:
        raise UpstreamError("malformed upstream response: too many header fields")
    version = head[5:8]  # accepted by llhttp: "HTTP/d.d " (see parse_request_head)
    if version != b"1.1" and version != b"1.0":
        version = _version(parser.get_http_version(), upstream=True)
    status = parser.get_status_code()
    if not 100 <= status <= 599:
        # llhttp takes any three digits; RFC 9110 15 defines 100-599 only.
        raise UpstreamError(f"malformed upstream response: status {status:03d}")
    if c.reason != b"OK" and _BAD_REASON.search(c.reason):  # as a field value would be
        raise UpstreamError("malformed upstream response: control character in reason phrase")
    length, chunked, codings, has_te = _length(c.headers, upstream=True)
    if codings and b"identity" in codings:  # no coding at all (dropped since RFC 7230)
        codings = [coding for coding in codings if coding != b"identity"]
    tokens, idle_s = response_connection(c.headers)
    keep_alive = _keep_alive(version, tokens)
    if has_te and version == b"1.0":
        keep_alive = False  # RFC 9112 6.1, as for a request: never reuse this connection
    return ResponseHead(  # positional, in field order (see parse_request_head)
        status,
        c.reason,
        version,
        c.headers,
        None if chunked else length,
        chunked,
        keep_alive,
        codings,
        tokens,
        idle_s,
    )


_UPGRADE_LINE: Final = re.compile(rb"(?im)^upgrade[ \t]*:")
# A field name (a token) with spaces or tabs before its colon, at a line's start.
_SPACE_BEFORE_COLON: Final = re.compile(rb"(?m)^([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]+:")


_VERSION: Final = re.compile(rb"HTTP/([0-9])\.([0-9])")


def _as_http11(head: bytes, at: int, *, upstream: bool) -> bytes | None:
    """The head with HTTP/1.1 in place of the "HTTP/d.d" at `at`, when it names a newer
    minor version of 1: RFC 9110 2.5 has a recipient process it as the highest minor
    version it implements (llhttp refuses any it does not know). None when it is not
    there; an unsupported major version raises (505 for a client, 502 for an upstream)."""
    match = _VERSION.match(head, at)
    if match is None:
        return None
    major, minor = match.group(1), match.group(2)
    if major != b"1":
        _version(f"{major.decode()}.{minor.decode()}", upstream=upstream)  # raises
    if minor in (b"0", b"1"):
        return None  # llhttp refused the message for another reason
    return head[:at] + b"HTTP/1.1" + head[at + 8 :]


def _no_space_before_colon(head: bytes) -> bytes | None:
    """The head without whitespace between field names and colons: RFC 9112 5.1 has a
    proxy remove it from a response (a request with it is a 400). None when none."""
    repaired, n = _SPACE_BEFORE_COLON.subn(rb"\1:", head)
    return repaired if n else None


_LENGTH_LINE: Final = re.compile(rb"(?im)^content-length:[ \t]*([^\r\n]*?)[ \t]*\r\n")


def _one_length(head: bytes) -> bytes | None:
    """The head with one Content-Length line, when its several lines or list members
    all say the same number (RFC 9110 8.6 lets a recipient take that one value; llhttp
    refuses any repeat). None for anything else: differing values stay a 502."""
    found: list[bytes] = _LENGTH_LINE.findall(head)
    values = [v.strip() for line in found for v in line.split(b",")]
    if len(values) < 2 or len(set(values)) != 1 or not values[0].isdigit():
        return None
    rest: bytes = _LENGTH_LINE.sub(b"", head)
    line_end = rest.find(b"\r\n") + 2
    return rest[:line_end] + b"Content-Length: " + values[0] + b"\r\n" + rest[line_end:]


def response_has_body(request_method: bytes, status: int) -> bool:
    """RFC 9112 6.3 rules 1 and 2: HEAD, 1xx, 204, 304 and a 2xx to CONNECT carry none."""
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return False
    return not (request_method == b"CONNECT" and 200 <= status < 300)
