"""Heads and body framing back to bytes (RFC 9112 sections 3, 4, 7)."""

from __future__ import annotations

from typing import Final

from demux_proxy.http1.headers import Headers

LAST_CHUNK: Final = b"0\r\n\r\n"

REASONS: Final[dict[int, bytes]] = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    411: b"Length Required",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}


def _fields(parts: list[bytes], headers: Headers) -> bytes:
    for name, value in headers:  # appends, not += of a tuple: list.append is compiled in
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """We always speak HTTP/1.1 upstream, whatever the client spoke (RFC 9110 section 6.2)."""
    return _fields([method, b" ", target, b" HTTP/1.1\r\n"], headers)


def response_head(status: int, reason: bytes, headers: Headers, version: bytes = b"1.1") -> bytes:
    return _fields([b"HTTP/", version, b" %d " % status, reason, b"\r\n"], headers)


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body, as pieces for `writelines` (no copy of `data`)."""
    return (b"%X\r\n" % len(data), data, b"\r\n")


def last_chunk(trailers: Headers) -> bytes:
    if not trailers:
        return LAST_CHUNK
    return _fields([b"0\r\n"], trailers)


def plain_response(
    status: int, text: str, *, close: bool, version: bytes = b"1.1", extra: Headers | None = None
) -> bytes:
    """A complete plain-text response: how the proxy itself answers errors."""
    body = text.encode("utf-8", "replace") + b"\n"
    headers: Headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        *(extra or ()),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    reason = REASONS.get(status, b"Error")
    return response_head(status, reason, headers, version) + body
