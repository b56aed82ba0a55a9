"""Body decoders for the three framings of RFC 9112 section 6: length, chunked, until close.

Each decoder consumes from a caller-owned `bytearray` (deleting from its front is O(1) in
CPython) and returns body bytes as they become available, so a body of any size streams
through a bounded buffer. `read` returns None when it needs more input or is done;
`done` tells which. `eof()` is called when the peer closed: it finishes a close-delimited
body and raises for a truncated one, so a short body never looks complete.
"""

from __future__ import annotations

import re
from typing import Final

from demux_proxy.errors import BodyCut, ProtocolError, UpstreamError
from demux_proxy.http1.headers import Headers

# A chunk-size line is hex digits, optional extensions; 16 KiB bounds extensions like
# h11 does, far above anything real (chunk extensions are essentially unused).
MAX_CHUNK_LINE: Final = 16 * 1024
MAX_TRAILER_BYTES: Final = 64 * 1024
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
# Trailer fields meet the rules head fields do (llhttp checks those).
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _take(buf: bytearray, limit: int) -> bytes:
    """Up to `limit` bytes off the front of `buf` (the whole buffer without slicing)."""
    if limit >= len(buf):
        data = bytes(buf)
        buf.clear()
        return data
    data = bytes(buf[:limit])
    del buf[:limit]
    return data


class BodyDecoder:
    done = False
    trailers: Headers = []

    def __init__(self, *, upstream: bool) -> None:
        # Which side we read from decides who is at fault: 400 to a client, 502 for a server.
        self._error: type[ProtocolError] | type[UpstreamError] = (
            UpstreamError if upstream else ProtocolError
        )

    def read(self, buf: bytearray) -> bytes | None:
        raise NotImplementedError

    def verbatim(self) -> int | None:
        """How many of the next input bytes are body bytes as they stand (-1: all of them
        until the peer closes), so a relay may pass them on without decoding; None when
        the framing must be decoded. Report what was passed with `consumed`."""
        return None

    def consumed(self, n: int) -> None:
        raise NotImplementedError

    def eof(self) -> None:
        if not self.done:
            # The client's connection ending is a BodyCut (counted as its loss).
            cut = UpstreamError if self._error is UpstreamError else BodyCut
            raise cut("connection closed before the end of the body")


class NoBody(BodyDecoder):
    done = True

    def read(self, buf: bytearray) -> bytes | None:
        return None


class LengthDecoder(BodyDecoder):
    def __init__(self, length: int, *, upstream: bool) -> None:
        super().__init__(upstream=upstream)
        self.remaining = length
        self.done = length == 0

    def read(self, buf: bytearray) -> bytes | None:
        if self.done or not buf:
            return None
        data = _take(buf, self.remaining)
        self.remaining -= len(data)
        self.done = self.remaining == 0
        return data

    def verbatim(self) -> int | None:
        return self.remaining

    def consumed(self, n: int) -> None:
        if n > self.remaining:
            raise ValueError("consumed past the end of the body")
        self.remaining -= n
        self.done = self.remaining == 0


class CloseDelimitedDecoder(BodyDecoder):
    """Everything until the peer closes (responses only, RFC 9112 6.3 rule 8)."""

    def read(self, buf: bytearray) -> bytes | None:
        if not buf:
            return None
        data = bytes(buf)
        buf.clear()
        return data

    def verbatim(self) -> int | None:
        return -1

    def consumed(self, n: int) -> None:
        pass  # no end but the peer's close

    def eof(self) -> None:
        self.done = True


# The chunked decoder's states (Final: compiled in as constants).
_SIZE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILER: Final = 3
_DONE: Final = 4


class ChunkedDecoder(BodyDecoder):
    """Strict chunked decoding (RFC 9112 7.1): hex sizes, CRLF only, trailers kept.

    A bare LF, a size that is not hex or a missing CRLF after chunk data is an error, not
    something to guess at: lenient chunk parsing is how TE.TE smuggling works.
    """

    def __init__(self, *, upstream: bool) -> None:
        super().__init__(upstream=upstream)
        self._state = _SIZE
        self._remaining = 0
        self.trailers = []
        self._trailer_bytes = 0

    def read(self, buf: bytearray) -> bytes | None:
        while True:
            state = self._state
            if state == _DATA:
                if not buf:
                    return None
                data = _take(buf, self._remaining)
                self._remaining -= len(data)
                if self._remaining == 0:
                    self._state = _DATA_END
                return data
            if state == _SIZE:
                line = self._line(buf, MAX_CHUNK_LINE, "chunk line too long")
                if line is None:
                    return None
                size, semicolon, _ = line.partition(b";")
                if semicolon:  # BWS is allowed only before chunk extensions (7.1.1)
                    size = size.rstrip(b" \t")
                # Leading zeros say nothing (RFC 9112 7.1: 1*HEXDIG): 16 digits after them
                # is the most a 64-bit size has.
                if not size or not _HEX.issuperset(size) or len(size.lstrip(b"0")) > 16:
                    raise self._error("invalid chunk size")
                self._remaining = int(size, 16)
                self._state = _DATA if self._remaining else _TRAILER
            elif state == _DATA_END:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise self._error("missing CRLF after chunk data")
                del buf[:2]
                self._state = _SIZE
            elif state == _TRAILER:
                line = self._line(buf, MAX_TRAILER_BYTES, "trailer section too large")
                if line is None:
                    return None
                if not line:
                    self._state = _DONE
                    self.done = True
                    return None
                self._trailer_bytes += len(line)
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    raise self._error("trailer section too large")
                name, sep, value = line.partition(b":")
                if (
                    not sep
                    or _TOKEN.fullmatch(name) is None  # RFC 9110 5.1, as llhttp has it
                    or _CONTROL.search(value) is not None  # 5.5: no NUL, CR, LF, CTLs
                ):
                    raise self._error("invalid trailer field")
                self.trailers.append((name, value.strip(b" \t")))
            else:
                return None

    def _line(self, buf: bytearray, limit: int, too_long: str) -> bytes | None:
        end = buf.find(b"\r\n", 0, limit + 2)
        if end < 0:
            if buf.find(b"\n", 0, limit + 2) >= 0:
                # A bare LF ends no line in chunked framing: refuse now rather than wait
                # for a CRLF that a client reading LF as a line end will never send.
                raise self._error("bare LF in chunked framing")
            if len(buf) > limit:
                raise self._error(too_long)
            return None
        line = bytes(buf[:end])
        del buf[: end + 2]
        if b"\r" in line or b"\n" in line:
            raise self._error("bare CR or LF in chunked framing")
        return line


# NoBody holds no state: one each way serves every message without a body (most requests).
_NO_REQUEST_BODY: Final = NoBody(upstream=False)
_NO_RESPONSE_BODY: Final = NoBody(upstream=True)


def request_decoder(content_length: int | None, chunked: bool) -> BodyDecoder:
    """RFC 9112 6.3: a request without Content-Length or chunked has no body."""
    if chunked:
        return ChunkedDecoder(upstream=False)
    if content_length:
        return LengthDecoder(content_length, upstream=False)
    return _NO_REQUEST_BODY


def response_decoder(has_body: bool, content_length: int | None, chunked: bool) -> BodyDecoder:
    if not has_body:
        return _NO_RESPONSE_BODY
    if chunked:
        return ChunkedDecoder(upstream=True)
    if content_length is not None:
        return LengthDecoder(content_length, upstream=True)
    return CloseDelimitedDecoder(upstream=True)
