"""The HTTP/1 layer without sockets: heads, framing decoders, writers, hop-by-hop rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demux_proxy.errors import BodyCut, ProtocolError, ProxyError, UpstreamError
from demux_proxy.http1 import writer
from demux_proxy.http1.framing import (
    ChunkedDecoder,
    CloseDelimitedDecoder,
    LengthDecoder,
    request_decoder,
    response_decoder,
)
from demux_proxy.http1.headers import (
    connection_tokens,
    end_to_end,
    replace,
)
from demux_proxy.http1.parser import (
    find_head_end,
    parse_request_head,
    parse_response_head,
    response_has_body,
)


def _decode_all(decoder, data: bytes, *, step: int | None = None) -> bytes:  # type: ignore[no-untyped-def]
    """Feed `data` whole or `step` bytes at a time; return the body the decoder produced."""
    buf = bytearray()
    out = bytearray()
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        buf += piece
        while (chunk := decoder.read(buf)) is not None:
            out += chunk
        if decoder.done:
            break
    return bytes(out)


# --- request heads ----------------------------------------------------------------


def test_request_head_fields_keep_order_and_case() -> None:
    req = parse_request_head(
        b"POST http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\nX-Odd-CASE: v\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    assert req.method == b"POST"
    assert req.target == b"http://a.test/x?y=1"
    assert req.version == b"1.1"
    assert req.headers == [(b"Host", b"a.test"), (b"X-Odd-CASE", b"v"), (b"Content-Length", b"5")]
    assert req.content_length == 5 and not req.chunked and req.keep_alive


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET http://a/ HTTP/1.1\r\n\r\n", True),
        (b"GET http://a/ HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.0\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
        (b"GET http://a/ HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n", True),
    ],
)
def test_keep_alive_rules(head: bytes, keep_alive: bool) -> None:
    assert parse_request_head(head).keep_alive is keep_alive


def test_upgrade_and_expect_are_recognised() -> None:
    req = parse_request_head(
        b"GET http://a/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert req.upgrade and req.expect_continue
    assert not parse_request_head(b"GET http://a/ HTTP/1.1\r\nUpgrade: x\r\n\r\n").upgrade


def test_an_http10_request_asking_to_upgrade_is_not_upgraded() -> None:
    """RFC 9110 7.8: a server ignores Upgrade in a 1.0 request (it was forwarded as 1.1
    with Connection: upgrade, and the 101 relayed to the 1.0 client)."""
    req = parse_request_head(
        b"GET http://a/ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert not req.upgrade
    assert end_to_end(req.headers, req.connection, drop_length=False) == []  # both dropped


def test_host_is_kept_and_more_than_one_is_refused() -> None:
    req = parse_request_head(b"GET / HTTP/1.1\r\nX-A: 1\r\nHOST:  a.test:8080 \r\n\r\n")
    assert req.host == b"a.test:8080"
    assert parse_request_head(b"GET / HTTP/1.0\r\n\r\n").host is None
    with pytest.raises(ProtocolError, match="more than one Host field") as info:
        parse_request_head(b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n")
    assert info.value.status == 400


def test_connect_head_parses() -> None:
    req = parse_request_head(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")
    assert req.method == b"CONNECT" and req.target == b"a.test:443"


SMUGGLING = [
    # CL.TE and TE.CL: both framings present.
    b"POST http://a/ HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
    # TE.TE obfuscations.
    b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding:\tchunked\r\n \r\n\r\n",
    # Differing and malformed Content-Length.
    b"POST http://a/ HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nContent-Length: 4, 5\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
    # obs-fold, bare CR, bad tokens.
    b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"G(T http://a/ HTTP/1.1\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nBad Name: v\r\n\r\n",
    b"GET http://a/ HTTP/1.1\nX: y\n\n\r\n\r\n",
]


@pytest.mark.parametrize("head", SMUGGLING)
def test_ambiguous_requests_are_refused_with_4xx_or_505(head: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_head(head)
    assert 400 <= info.value.status < 506


def test_a_newer_minor_version_of_1_is_taken_as_11_and_another_major_is_505() -> None:
    """RFC 9110 2.5: a recipient SHOULD process a higher minor version as the highest it
    implements (llhttp refuses "HTTP/1.2"); an unsupported major version is a 505."""
    req = parse_request_head(b"GET http://a/x HTTP/1.2\r\nHost: a\r\n\r\n")
    assert (req.version, req.target, req.host, req.keep_alive) == (
        b"1.1",
        b"http://a/x",
        b"a",
        True,
    )
    resp = parse_response_head(b"HTTP/1.9 200 OK\r\nContent-Length: 3\r\n\r\n")
    assert (resp.version, resp.status, resp.content_length) == (b"1.1", 200, 3)
    for head in (b"GET http://a/ HTTP/9.9\r\n\r\n", b"GET http://a/ HTTP/3.0\r\n\r\n"):
        with pytest.raises(ProtocolError) as info:
            parse_request_head(head)
        assert info.value.status == 505
    with pytest.raises(UpstreamError, match=r"unsupported HTTP/9\.9"):
        parse_response_head(b"HTTP/9.9 200 OK\r\n\r\n")
    with pytest.raises(ProtocolError) as info:  # a newer version does not excuse bad framing
        parse_request_head(b"GET http://a/ HTTP/1.2\r\nContent-Length: 1, 2\r\n\r\n")
    assert info.value.status == 400


def test_any_token_is_a_method_relayed_as_written_and_a_non_token_is_400() -> None:
    # llhttp knows none of these: BREW, a lower-case get (methods are case-sensitive).
    for method in (b"BREW", b"get", b"UPDATEREDIRECTREF", b"X-Y.Z~1"):
        head = parse_request_head(method + b" http://a/p?q HTTP/1.0\r\nContent-Length: 3\r\n\r\n")
        assert (head.method, head.target, head.version) == (method, b"http://a/p?q", b"1.0")
        assert (head.content_length, head.keep_alive) == (3, False)
    with pytest.raises(ProtocolError) as info:  # the head's own rules still hold
        parse_request_head(b"BREW http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert info.value.status == 400
    with pytest.raises(ProtocolError) as info:
        parse_request_head(b"GE{T http://a/ HTTP/1.1\r\n\r\n")
    assert info.value.status == 400


def test_head_limits_give_414_and_431() -> None:
    with pytest.raises(ProtocolError) as info:
        find_head_end(b"GET /" + b"a" * 200, 100, request=True)
    assert info.value.status == 414
    with pytest.raises(ProtocolError) as info:
        find_head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * 200, 100, request=True)
    assert info.value.status == 431
    with pytest.raises(UpstreamError):
        find_head_end(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, 100, request=False)
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nrest", 100, request=True) == 18
    assert find_head_end(b"GET / HTTP/1.1\r\n", 100, request=True) == -1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_request_parser_raises_only_our_error(data: bytes) -> None:
    """Any bytes: a parsed head or a ProtocolError, never anything else."""
    try:
        parse_request_head(data + b"\r\n\r\n")
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_response_parser_raises_only_upstream_error(data: bytes) -> None:
    try:
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + data + b"\r\n\r\n")
    except UpstreamError:
        pass


# --- responses ---------------------------------------------------------------------


def test_response_head_and_body_rules() -> None:
    resp = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    assert (resp.status, resp.reason, resp.content_length, resp.keep_alive) == (200, b"OK", 3, True)
    assert not response_has_body(b"HEAD", 200)
    assert not response_has_body(b"GET", 204)
    assert not response_has_body(b"GET", 304)
    assert not response_has_body(b"GET", 100)
    assert not response_has_body(b"CONNECT", 200)
    assert response_has_body(b"GET", 200)
    with pytest.raises(UpstreamError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")


def test_response_decoder_choice() -> None:
    assert response_decoder(False, 10, False).done
    assert isinstance(response_decoder(True, None, True), ChunkedDecoder)
    assert isinstance(response_decoder(True, 5, False), LengthDecoder)
    assert isinstance(response_decoder(True, None, False), CloseDelimitedDecoder)
    assert request_decoder(None, False).done  # no framing on a request: no body


# --- framing -----------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 3])
def test_length_decoder_stops_at_length_and_leaves_the_rest(step: int | None) -> None:
    d = LengthDecoder(5, upstream=False)
    buf = bytearray()
    out = bytearray()
    data = b"hello" + b"NEXT"
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        buf += piece
        while (chunk := d.read(buf)) is not None:
            out += chunk
    assert out == b"hello" and d.done and buf == b"NEXT"


def test_truncated_length_body_raises_on_eof() -> None:
    d = LengthDecoder(5, upstream=True)
    buf = bytearray(b"hel")
    assert d.read(buf) == b"hel"
    with pytest.raises(UpstreamError):
        d.eof()


def test_a_clients_body_cut_short_is_a_400_counted_as_the_client_gone() -> None:
    """A client that gives up mid-upload (curl --max-time): metrics said bad_request."""
    from demux_proxy.exchange import error_kind

    d = LengthDecoder(5, upstream=False)
    assert d.read(bytearray(b"hel")) == b"hel"
    with pytest.raises(BodyCut) as info:
        d.eof()
    assert info.value.status == 400 and error_kind(info.value) == "client_lost"
    chunked = ChunkedDecoder(upstream=False)
    chunked.read(bytearray(b"5\r\nhel"))
    with pytest.raises(BodyCut):
        chunked.eof()


CHUNKED = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"


def test_trailer_values_may_hold_tabs_and_obs_text() -> None:
    d = ChunkedDecoder(upstream=True)
    _decode_all(d, b"0\r\nX-T: a\tb \xe9\r\n\r\n")
    assert d.done and d.trailers == [(b"X-T", b"a\tb \xe9")]


@pytest.mark.parametrize("step", [None, 1, 2, 5])
def test_chunked_decoder_whole_and_byte_by_byte(step: int | None) -> None:
    d = ChunkedDecoder(upstream=False)
    assert _decode_all(d, CHUNKED + b"NEXT", step=step) == b"hello, world"
    assert d.done
    assert d.trailers == [(b"X-Trailer", b"yes")]


@pytest.mark.parametrize(
    "data",
    [
        b"5\r\nhelloXX0\r\n\r\n",  # missing CRLF after data
        b"G\r\nhello\r\n",  # not hex
        b"5\nhello\r\n",  # bare LF
        b"-5\r\nhello\r\n",
        b"10000000000000000\r\n",  # 17 hex digits
        b" 5\r\nhello\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        # Trailer fields meet the rules of head fields (they were relayed as they came).
        b"0\r\nX-T: a\x00b\r\n\r\n",
        b"0\r\nX T: 1\r\n\r\n",
        b"0\r\nX(T)@: 1\r\n\r\n",
        b"0\r\nX-T: a\x1b[31mred\r\n\r\n",
        b"0\r\nX-T: a\x7f\r\n\r\n",
        b"0\r\n: empty name\r\n\r\n",
    ],
)
def test_chunked_decoder_rejects_malformed(data: bytes) -> None:
    d = ChunkedDecoder(upstream=False)
    with pytest.raises(ProtocolError):
        _decode_all(d, data)


def test_chunk_sizes_may_carry_leading_zeros() -> None:
    """1*HEXDIG: "0000000000000000005" is five, however many zeros lead it."""
    d = ChunkedDecoder(upstream=True)
    assert _decode_all(d, b"%s5\r\nhello\r\n%s\r\n\r\n" % (b"0" * 20, b"0" * 20)) == b"hello"
    assert d.done


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"%s\r\n" % (b"1" * (16 * 1024 + 1)), "chunk line too long"),
        (b"0\r\nX-Big: %s\r\n" % (b"v" * (64 * 1024 + 1)), "trailer section too large"),
        (b"0\r\n%s\r\n" % (b"X-Many: %s\r\n" % (b"v" * 1000) * 70), "trailer section too large"),
    ],
)
def test_an_oversized_chunk_line_or_trailer_is_named(data: bytes, reason: str) -> None:
    d = ChunkedDecoder(upstream=False)
    with pytest.raises(ProtocolError, match=reason):
        _decode_all(d, data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    st.integers(min_value=1, max_value=64),
)
def test_chunked_roundtrip_through_writer(chunks: list[bytes], step: int) -> None:
    """What writer.chunk encodes, ChunkedDecoder decodes, however the bytes are split."""
    wire = b"".join(b"".join(writer.chunk(c)) for c in chunks) + writer.last_chunk([])
    d = ChunkedDecoder(upstream=True)
    assert _decode_all(d, wire, step=step) == b"".join(chunks)
    assert d.done


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_chunked_decoder_raises_only_our_errors(data: bytes) -> None:
    d = ChunkedDecoder(upstream=False)
    try:
        _decode_all(d, data)
        d.eof()
    except ProxyError:
        pass


def test_close_delimited_ends_at_eof() -> None:
    d = CloseDelimitedDecoder(upstream=True)
    buf = bytearray(b"abc")
    assert d.read(buf) == b"abc" and not d.done
    d.eof()
    assert d.done


# --- headers and writer ------------------------------------------------------------


def test_hop_by_hop_and_connection_named_fields_are_dropped() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"X-Private, close"),
        (b"X-Private", b"secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"X-Keep", b"Me"),
        (b"Content-Length", b"3"),
    ]
    tokens = connection_tokens(headers)
    assert end_to_end(headers, tokens, drop_length=False) == [
        (b"Host", b"a"),
        (b"X-Keep", b"Me"),
        (b"Content-Length", b"3"),
    ]
    assert (b"Content-Length", b"3") not in end_to_end(headers, tokens, drop_length=True)


def test_replace_keeps_position_and_drops_duplicates() -> None:
    headers = [(b"A", b"1"), (b"host", b"x"), (b"B", b"2"), (b"Host", b"y")]
    assert replace(headers, b"host", b"Host", b"z") == [(b"A", b"1"), (b"Host", b"z"), (b"B", b"2")]
    assert replace([(b"A", b"1")], b"host", b"Host", b"z")[0] == (b"Host", b"z")


def test_plain_response_is_complete_and_parseable() -> None:
    raw = writer.plain_response(502, "connection refused by 1.2.3.4:80", close=True)
    end = find_head_end(raw, 1000, request=False)
    head = parse_response_head(raw[:end])
    assert head.status == 502
    assert raw[end:] == b"connection refused by 1.2.3.4:80\n"
    assert head.content_length == len(raw[end:])
    assert not head.keep_alive


_TE = b"POST http://a/ HTTP/1.1\r\n%s\r\n"


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        # Transfer-Encoding lines form one list: "x" then "chunked" is "x, chunked".
        (b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked, chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    ],
)
def test_transfer_codings_across_lines(fields: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_head(_TE % fields)
    assert info.value.status == status


def test_response_codings_besides_chunked_are_kept() -> None:
    resp = parse_response_head(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert resp.chunked and resp.codings == [b"gzip"]


@pytest.mark.parametrize("data", [b"5\nhello\n0\n\n", b"5 \r\nhello\r\n0\r\n\r\n"])
def test_chunked_bare_lf_and_trailing_space_fail_at_once(data: bytes) -> None:
    d = ChunkedDecoder(upstream=False)
    with pytest.raises(ProtocolError):
        _decode_all(d, data)


def test_chunk_extension_may_follow_whitespace() -> None:
    d = ChunkedDecoder(upstream=False)
    assert _decode_all(d, b"5 ;ext=1\r\nhello\r\n0\r\n\r\n") == b"hello"


# --- HTTP/1.0 with Transfer-Encoding, misplaced chunked, status range ------------------


def test_http10_request_with_transfer_encoding_closes_after_it() -> None:
    """RFC 9112 6.1: faulty framing in 1.0 (a smuggling vector): answer, then close."""
    req = parse_request_head(
        b"POST http://a/ HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert req.chunked and not req.keep_alive
    req = parse_request_head(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert req.chunked and req.keep_alive  # 1.1 is unaffected


@pytest.mark.parametrize("te", [b"chunked", b"gzip"])
def test_http10_response_with_transfer_encoding_is_not_reused(te: bytes) -> None:
    resp = parse_response_head(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: %s\r\n\r\n" % te
    )
    assert not resp.keep_alive
    resp = parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")
    assert resp.keep_alive  # keep-alive without Transfer-Encoding still holds


@pytest.mark.parametrize(
    "fields",
    [
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: gzip, chunked, chunked\r\n",
    ],
)
def test_response_chunked_not_last_or_twice_is_malformed(fields: bytes) -> None:
    """Relayed as it was, the upstream's chunk framing would reach the client as content."""
    with pytest.raises(UpstreamError, match="malformed upstream response"):
        parse_response_head(b"HTTP/1.1 200 OK\r\n%s\r\n" % fields)


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_response_status_outside_100_to_599_is_malformed(status: bytes) -> None:
    """RFC 9110 15: three digits, 100-599; llhttp itself takes any three digits."""
    with pytest.raises(
        UpstreamError, match=f"malformed upstream response: status {status.decode()}"
    ):
        parse_response_head(b"HTTP/1.1 %s Odd\r\nContent-Length: 0\r\n\r\n" % status)
    for ok in (100, 103, 204, 599):  # the bounds themselves stay valid
        assert parse_response_head(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % ok).status == ok


@pytest.mark.parametrize("reason", [b"O\x00K", b"O\x01K", b"Esc\x1b[2J", b"Del\x7f"])
def test_a_control_character_in_the_reason_phrase_is_malformed(reason: bytes) -> None:
    """RFC 9112 4: llhttp passed NUL, ESC, DEL... in the phrase, which went to the client
    as it came, while the same byte in a field value is refused: the same 502 now."""
    with pytest.raises(UpstreamError, match="control character in reason phrase"):
        parse_response_head(b"HTTP/1.1 200 %s\r\nContent-Length: 0\r\n\r\n" % reason)
    for ok in (b"OK", b"", b"Very\tOdd \x80\xff Reason"):  # HTAB, SP, obs-text stay valid
        assert (
            parse_response_head(b"HTTP/1.1 200 %s\r\nContent-Length: 0\r\n\r\n" % ok).reason == ok
        )


@pytest.mark.parametrize(
    "lines",
    [
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: 5, 5\r\n",
        b"content-length: 5\r\nX-A: b\r\nCONTENT-LENGTH:5 , 5\r\n",
    ],
)
def test_a_response_repeating_one_content_length_is_read_as_that_length(lines: bytes) -> None:
    """RFC 9110 8.6: identical values may be taken as one (curl and requests do)."""
    head = parse_response_head(b"HTTP/1.1 200 OK\r\n" + lines + b"X-Z: 1\r\n\r\n")
    assert head.content_length == 5 and head.status == 200
    assert [n.lower() for n, _ in head.headers].count(b"content-length") == 1
    assert (b"X-Z", b"1") in head.headers


@pytest.mark.parametrize(
    "lines",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: 5, x\r\n",
    ],
)
def test_differing_content_lengths_stay_refused(lines: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n")


def test_whitespace_before_a_colon_is_removed_from_a_response_refused_in_a_request() -> None:
    """RFC 9112 5.1: a server rejects it (400); a proxy removes it from a response and
    forwards the rest, rather than fail the exchange (502)."""
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\nX-A\t: b\r\nX-B: c : d\r\n\r\n"
    )
    assert head.content_length == 5
    assert head.headers == [(b"Content-Length", b"5"), (b"X-A", b"b"), (b"X-B", b"c : d")]
    with pytest.raises(ProtocolError) as info:
        parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n")
    assert info.value.status == 400


def test_a_101_without_upgrade_says_so() -> None:
    with pytest.raises(UpstreamError, match="101 without an Upgrade field"):
        parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n")


def test_a_partial_head_is_scanned_from_where_the_last_call_stopped() -> None:
    """A caller that calls again as more arrives passes how much it saw: a CRLF split
    across the two calls is no bare LF, and a bare LF in the new bytes is found."""
    first = b"GET / HTTP/1.1\r"
    assert find_head_end(first, 1000, request=True) == -1
    assert find_head_end(first + b"\nHost: a\r\n", 1000, request=True, checked=len(first)) == -1
    with pytest.raises(ProtocolError, match="bare LF"):
        find_head_end(first + b"\nHost: a\n", 1000, request=True, checked=len(first))
    with pytest.raises(UpstreamError, match="bare LF"):
        find_head_end(b"HTTP/1.1 200 OK\r\nA: b\n", 1000, request=False, checked=10)


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ([(b"Keep-Alive", b"timeout=5, max=100")], 5.0),
        ([(b"keep-alive", b"max=10,Timeout = 15")], 15.0),
        ([(b"Keep-Alive", b'timeout="2"')], 2.0),
        ([(b"Keep-Alive", b"max=100")], None),
        ([(b"Keep-Alive", b"timeout=-1")], None),
        ([(b"Keep-Alive", b"timeout=1.5")], None),
        ([(b"Keep-Alive", b"timeout=" + b"9" * 50)], None),
        ([(b"Connection", b"timeout=5")], None),
        ([], None),
    ],
)
def test_keep_alive_timeout(fields: list[tuple[bytes, bytes]], seconds: float | None) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    assert parse_response_head(head + b"Content-Length: 0\r\n\r\n").idle_s == seconds
