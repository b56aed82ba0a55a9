"""tls.DirectSSLObject: what both sides' contexts wrap, with the C methods called straight.

Two SSLObjects over memory BIOs, a real handshake and real records between them: the
proxy's server side (a context from our CA) and its upstream side (upstream_context).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from demux_proxy.ca import CertificateAuthority
from demux_proxy.tls import DirectSSLObject, offered_alpn, upstream_context


def _pump(a: ssl.MemoryBIO, b: ssl.MemoryBIO) -> None:
    if a.pending:
        b.write(a.read())


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, bios: list[ssl.MemoryBIO]) -> None:
    c_in, c_out, s_in, s_out = bios
    for _ in range(10):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            _pump(c_out, s_in)
            _pump(s_out, c_in)
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def test_both_sides_wrap_to_direct_objects_that_carry_records(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    server_ctx = ca.server_context("upstream.test")
    trust = tmp_path / "ours.pem"
    trust.write_bytes(ca.cert_pem)
    client_ctx = upstream_context(trust, insecure=False)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c_in, c_out, s_in, s_out = bios
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="upstream.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    assert isinstance(client, DirectSSLObject) and isinstance(server, DirectSSLObject)
    # The methods callers fetch are the C object's own, not the stdlib's wrappers.
    for obj in (client, server):
        inner = obj._sslobj  # type: ignore[attr-defined]
        for name in ("read", "write", "pending"):
            assert getattr(obj, name).__self__ is inner, name
    _handshake(client, server, bios)
    assert client.getpeercert()["subjectAltName"] == (("DNS", "upstream.test"),)

    request = b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n"
    assert client.write(request) == len(request)
    _pump(c_out, s_in)
    buf = bytearray(1024)
    n = server.read(len(buf), buf)
    assert bytes(buf[:n]) == request
    assert server.pending() == 0
    server.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    _pump(s_out, c_in)
    assert client.read(1024) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_a_context_of_someone_elses_still_works_with_a_stdlib_object() -> None:
    """Stream accepts any SSLObject: the stdlib one's wrappers behave the same."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c_in, c_out, s_in, s_out = bios
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    assert type(server) is ssl.SSLObject
    _handshake(client, server, bios)
    client.write(b"ping")
    _pump(c_out, s_in)
    assert server.read(16) == b"ping"


def _client_hello(alpn: list[str] | None, sni: str = "a.test") -> bytes:
    """The ClientHello Python's ssl sends for these ALPN names: real bytes."""
    ctx = ssl.create_default_context()
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_the_alpn_names_a_client_hello_offers() -> None:
    assert offered_alpn(_client_hello(["h2"])) == [b"h2"]
    assert offered_alpn(_client_hello(["h2", "http/1.1"])) == [b"h2", b"http/1.1"]
    assert offered_alpn(_client_hello(None)) is None
    long = _client_hello(["h2"], sni="x" * 60 + ".test")
    assert offered_alpn(bytearray(long)) == [b"h2"]
    for cut in (1, 5, 40, len(long) - 1):  # not all of it here yet: not judged
        assert offered_alpn(long[:cut]) is None
    assert offered_alpn(b"GET / HTTP/1.1\r\n\r\n") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=2000))
def test_no_bytes_make_the_alpn_reader_raise(data: bytes, at: int) -> None:
    hello = _HELLO[:at] + data  # a real hello's start, then anything
    names = offered_alpn(hello)
    assert names is None or all(isinstance(n, bytes) for n in names)


_HELLO = _client_hello(["h2", "http/1.1"])
