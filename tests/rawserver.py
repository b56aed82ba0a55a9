"""A raw threaded TCP (or TLS) server for tests that need an upstream misbehaving on
purpose: malformed responses, resets mid-body. Subclasses implement `_respond`."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import trustme


class RawServer:
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name="raw-server", daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(10)
        # A connection the proxy keeps pooled holds its thread in recv() for the socket
        # timeout: ended here, the thread sees the end at once (5 s a test otherwise).
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(10)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                if self.tls is not None:
                    with self.tls.wrap_socket(conn, server_side=True) as tls:
                        self._conns.append(tls)  # `conn` is detached now: closed through it
                        # wrap_socket detached `conn`: options (SO_LINGER 0 for a reset)
                        # go through the TLS socket, which has the descriptor now.
                        self._respond(tls, tls)
                else:
                    self._respond(conn, conn)
            except OSError:
                pass  # the proxy may close early (huge head, refusal): nothing to do

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        """Read the request from `sock` and misbehave; `raw` is for socket options (the
        TLS socket itself under TLS: setting them on it sets them on its descriptor)."""
        raise NotImplementedError


S = TypeVar("S", bound=RawServer)


def read_head(sock: socket.socket) -> bytes:
    """Bytes up to and including the first blank line (and whatever came with them), or
    b"" when the peer closes before one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        data += chunk
    return data


@contextmanager
def plain_and_tls(cls: type[S], ca: trustme.CA) -> Iterator[dict[str, S]]:
    """One `cls` server for "http" and one over TLS for "https", with a leaf from `ca`
    (the CA the proxy under test trusts through --upstream-ca)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    servers = {"http": cls(None), "https": cls(ctx)}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.close()
