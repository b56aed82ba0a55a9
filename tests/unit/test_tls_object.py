"""tls.DirectSSLObject: what both sides' contexts wrap, with the C methods called straight.

Two SSLObjects over memory BIOs, a real handshake and real records between them: the
proxy's server side (a context from our CA) and its upstream side (upstream_context).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from demux_proxy.ca import CertificateAuthority
from demux_proxy.tls import DirectSSLObject, upstream_context


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
