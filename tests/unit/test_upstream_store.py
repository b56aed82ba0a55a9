"""tls.upstream_context: the system store as a hashed directory, read per issuer.

A real hashed directory (`openssl rehash`), a real TLS server on loopback, a real
handshake: the context holds no CA certificate until a chain needs one, then trusts the
CA found in the directory and nothing else.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from demux_proxy.tls import upstream_context

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to hash a directory"
)


def _store(tmp_path: Path, ca: trustme.CA) -> ssl.DefaultVerifyPaths:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "test-ca.pem"))
    subprocess.run(["openssl", "rehash", str(certs)], check=True, capture_output=True)
    return ssl.DefaultVerifyPaths(
        cafile=None,  # type: ignore[arg-type]
        capath=str(certs),
        openssl_cafile_env="DEMUX_TEST_UNSET_CAFILE",
        openssl_cafile="",
        openssl_capath_env="DEMUX_TEST_UNSET_CAPATH",
        openssl_capath="",
    )


@pytest.fixture
def server() -> Iterator[tuple[trustme.CA, int]]:
    """A TLS server for localhost, one handshake per connection, in a thread."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError):
                pass  # a client that refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield ca, listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(timeout=5)


def _handshake(ctx: ssl.SSLContext, port: int) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.recv(2)


def test_hashed_store_loads_nothing_up_front_and_verifies_on_demand(
    tmp_path: Path, server: tuple[trustme.CA, int]
) -> None:
    ca, port = server
    ctx = upstream_context(None, insecure=False, system=_store(tmp_path, ca))
    assert ctx.get_ca_certs() == []  # nothing parsed at start
    assert _handshake(ctx, port) == b"ok"
    assert len(ctx.get_ca_certs()) == 1  # the issuer, read when the chain needed it


def test_hashed_store_refuses_a_ca_it_does_not_hold(
    tmp_path: Path, server: tuple[trustme.CA, int]
) -> None:
    _, port = server
    ctx = upstream_context(None, insecure=False, system=_store(tmp_path, trustme.CA()))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ctx, port)


def test_this_hosts_store_is_used() -> None:
    ctx = upstream_context(None, insecure=False)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    paths = ssl.get_default_verify_paths()
    hashed = paths.capath and any(p.name.endswith(".0") for p in Path(paths.capath).glob("*"))
    if hashed and not os.environ.get(paths.openssl_cafile_env):
        assert ctx.get_ca_certs() == []  # lazily, from the hashed directory
    else:
        assert ctx.get_ca_certs()  # SSL_CERT_FILE, a bundle file or certifi: loaded whole
