"""A real upstream HTTP/HTTPS server for the proxy's integration tests.

Everything listens on 127.0.0.1 only, on ephemeral ports, served by aiohttp.web
(plus a tiny raw asyncio server for close-delimited responses) from a background
thread with its own event loop, so synchronous tests (requests, curl
subprocesses) and async tests can both use it.

Usage::

    with running_upstream(tmp_path) as up:
        requests.get(up.http_url("/ip")).json()["peer"]  # -> "127.0.0.1"
        requests.get(up.https_url("/bytes/10"), verify=up.ca_pem_path)

Endpoints on ``http_port`` and ``https_port`` (identical on both):

* ``GET /ip`` -> ``{"peer", "port", "scheme", "connection_id"}``; ``connection_id``
  is a counter unique per TCP connection (proves keep-alive reuse).
* ``GET /bytes/{n}`` -> ``expected_bytes(n)``, Content-Length, ``X-Sha256``.
* ``GET /chunked/{n}`` -> same body, Transfer-Encoding: chunked (7919-byte pieces).
* ``POST|PUT /upload`` -> ``{"length", "sha256", "chunked", "expect"}``.
* ``GET|HEAD /head`` -> 200, body ``b"x" * 1234``.
* ``GET /status/{code}`` -> that status; 204/304 bodiless, others ``"status <code>"``.
* ``GET /headers`` -> JSON list of ``[name, value]`` as received (raw case & order).
* ``GET /slow/{n}?delay=0.1`` -> ``expected_bytes(n)`` in ~10 pieces, ``delay`` s apart.
* ``GET /ws`` -> WebSocket echo (text and binary).
* anything else -> 404.

Raw (non-aiohttp) listeners, because aiohttp always chunks an HTTP/1.1 response
that has no Content-Length:

* ``raw_port`` (plain HTTP) and ``raw_https_port`` (TLS, same cert as
  ``https_port``) serve only ``GET /close-delimited/{n}[?version=1.1]``: a response
  with no Content-Length and no chunking, ``X-Sha256`` set, the body
  ``expected_bytes(n)``, then the server closes the connection. The status line is
  ``HTTP/1.0 200 OK`` unless ``?version=1.1`` (then ``HTTP/1.1 200 OK`` with
  ``Connection: close``). Every other request there gets a 404 and a close.

Every request on any listener is recorded in ``Upstream.seen_headers`` (see
``SeenRequest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import ssl
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import trustme
from aiohttp import WSMsgType, web

__all__ = [
    "CHUNKED_PIECE",
    "CHUNK_SIZE",
    "SeenRequest",
    "Upstream",
    "expected_bytes",
    "expected_sha256",
    "iter_expected_bytes",
    "running_upstream",
]

CHUNK_SIZE = 64 * 1024
"""Generation / write granularity of /bytes and of the raw close-delimited body."""
CHUNKED_PIECE = 7919
"""Piece size (one HTTP chunk each) of /chunked."""
CERT_IDENTITIES = ("localhost", "127.0.0.1", "::1", "upstream.test")
LISTEN_HOST = "127.0.0.1"
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 15.0
_SHUTDOWN_GRACE = 0.25
"""aiohttp's per-phase wait for in-flight handlers on stop (it waits twice, then cancels)."""


# --------------------------------------------------------------------------- content


def _block(n: int, index: int, size: int) -> bytes:
    # SHAKE-256 is an XOF: digest(k) is a prefix of digest(CHUNK_SIZE), so the
    # content is well defined whatever the block boundaries used by the caller.
    return hashlib.shake_256(b"demux-proxy-upstream/%d/%d" % (n, index)).digest(size)


def _iter_blocks(n: int) -> Iterator[bytes]:
    for index, start in enumerate(range(0, n, CHUNK_SIZE)):
        yield _block(n, index, min(CHUNK_SIZE, n - start))


def iter_expected_bytes(n: int, piece: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The body of ``/bytes/{n}`` as consecutive pieces of ``piece`` bytes (last shorter)."""
    if piece <= 0:
        raise ValueError("piece must be positive")
    if piece == CHUNK_SIZE:
        yield from _iter_blocks(n)
        return
    buf = bytearray()
    for block in _iter_blocks(n):
        buf += block
        while len(buf) >= piece:
            yield bytes(buf[:piece])
            del buf[:piece]
    if buf:
        yield bytes(buf)


def expected_bytes(n: int) -> bytes:
    """Deterministic pseudo-random content (seeded by ``n``) served by /bytes/{n} & co."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return b"".join(_iter_blocks(n))


@functools.lru_cache(maxsize=64)
def expected_sha256(n: int) -> str:
    """Hex SHA-256 of ``expected_bytes(n)`` (computed streaming, cached)."""
    digest = hashlib.sha256()
    for block in _iter_blocks(n):
        digest.update(block)
    return digest.hexdigest()


async def _sha256_of(n: int) -> str:
    """``expected_sha256(n)`` without blocking the server loop for large bodies."""
    if n <= 4 * 1024 * 1024:
        return expected_sha256(n)
    return await asyncio.get_running_loop().run_in_executor(None, expected_sha256, n)


# --------------------------------------------------------------------------- API


class SeenRequest(TypedDict):
    """One entry of ``Upstream.seen_headers``."""

    listener: str  # "http", "https", "raw" or "raw-https"
    method: str
    path: str  # raw request target (path + query)
    headers: list[list[str]]  # [name, value] pairs, original case & order (latin-1)


@dataclass
class Upstream:
    http_port: int
    https_port: int
    ca: trustme.CA
    """The CA trusted by clients. Signs the HTTPS cert unless ``untrusted=True``."""
    ca_pem_path: Path
    """``ca``'s certificate as a PEM file (for the proxy's --upstream-ca / ``verify=``)."""
    raw_port: int
    """Plain-HTTP listener for ``/close-delimited/{n}`` only."""
    raw_https_port: int
    """TLS listener for ``/close-delimited/{n}`` only (same cert as ``https_port``)."""
    untrusted: bool = False
    seen_headers: list[SeenRequest] = field(default_factory=list)
    """Every request received, appended from the server thread (list.append is atomic)."""
    host: str = LISTEN_HOST

    @staticmethod
    def _authority(host: str, port: int) -> str:
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{port}"

    def http_url(self, path: str, host: str = LISTEN_HOST) -> str:
        return f"http://{self._authority(host, self.http_port)}{path}"

    def https_url(self, path: str, host: str = LISTEN_HOST) -> str:
        return f"https://{self._authority(host, self.https_port)}{path}"

    def raw_url(self, path: str, host: str = LISTEN_HOST) -> str:
        return f"http://{self._authority(host, self.raw_port)}{path}"

    def raw_https_url(self, path: str, host: str = LISTEN_HOST) -> str:
        return f"https://{self._authority(host, self.raw_https_port)}{path}"

    def close_delimited_url(self, n: int, host: str = LISTEN_HOST) -> str:
        return self.raw_url(f"/close-delimited/{n}", host)


# --------------------------------------------------------------------------- aiohttp app

_SEEN_KEY = web.AppKey("seen", list)
_SCHEME_KEY = web.AppKey("scheme", str)
_WEBSOCKETS_KEY = web.AppKey("websockets", weakref.WeakSet)
_CONN_IDS_KEY = web.AppKey("conn_ids", weakref.WeakKeyDictionary)
_COUNTER_KEY = web.AppKey("conn_counter", itertools.count)


def _raw_headers(request: web.Request) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]


@web.middleware
async def _record(request: web.Request, handler: Any) -> web.StreamResponse:
    request.app[_SEEN_KEY].append(
        SeenRequest(
            listener=request.app[_SCHEME_KEY],
            method=request.method,
            path=request.raw_path,
            headers=_raw_headers(request),
        )
    )
    response: web.StreamResponse = await handler(request)
    return response


def _int_param(request: web.Request, name: str, maximum: int = 1 << 40) -> int:
    try:
        value = int(request.match_info[name])
    except ValueError:
        raise web.HTTPBadRequest(text=f"bad {name}\n") from None
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"bad {name}\n")
    return value


async def _ip(request: web.Request) -> web.Response:
    transport = request.transport
    assert transport is not None
    peer = transport.get_extra_info("peername")
    ids = request.app[_CONN_IDS_KEY]
    conn_id = ids.get(transport)
    if conn_id is None:
        conn_id = ids[transport] = next(request.app[_COUNTER_KEY])
    return web.json_response(
        {
            "peer": peer[0],
            "port": peer[1],
            "scheme": request.app[_SCHEME_KEY],
            "connection_id": conn_id,
        }
    )


async def _stream(
    request: web.Request,
    resp: web.StreamResponse,
    pieces: Iterator[bytes],
    delay: float = 0.0,
) -> web.StreamResponse:
    """Send ``pieces`` (``delay`` s apart); a client going away mid-body is not an error."""
    try:
        await resp.prepare(request)
        for i, data in enumerate(pieces):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(data)
        await resp.write_eof()
    except ConnectionError:
        pass  # aiohttp sees the closed transport and drops the connection quietly
    return resp


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n")
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Sha256": await _sha256_of(n)}
    )
    resp.content_length = n
    return await _stream(request, resp, iter_expected_bytes(n))


async def _chunked(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n")
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Sha256": await _sha256_of(n)}
    )
    # No content_length: aiohttp chunks automatically for HTTP/1.1 clients (and would
    # close-delimit for HTTP/1.0 ones, where chunking is forbidden).
    return await _stream(request, resp, iter_expected_bytes(n, CHUNKED_PIECE))


async def _upload(request: web.Request) -> web.Response:
    # aiohttp's default expect handler answers "100 Continue" before we read the body.
    digest = hashlib.sha256()
    length = 0
    async for data in request.content.iter_chunked(CHUNK_SIZE):
        digest.update(data)
        length += len(data)
    te = request.headers.get("Transfer-Encoding", "")
    return web.json_response(
        {
            "length": length,
            "sha256": digest.hexdigest(),
            "chunked": "chunked" in te.lower(),
            "expect": request.headers.get("Expect"),
        }
    )


async def _head(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 1234, content_type="application/octet-stream")


async def _status(request: web.Request) -> web.Response:
    code = _int_param(request, "code", 999)
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 200..599\n")
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}")


async def _headers(request: web.Request) -> web.Response:
    return web.json_response(_raw_headers(request))


async def _slow(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "n")
    try:
        delay = float(request.query.get("delay", "0.1"))
    except ValueError:
        raise web.HTTPBadRequest(text="bad delay\n") from None
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Sha256": await _sha256_of(n)}
    )
    resp.content_length = n
    piece = max(1, -(-n // 10))
    return await _stream(request, resp, iter_expected_bytes(n, piece), delay)


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    request.app[_WEBSOCKETS_KEY].add(ws)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _close_websockets(app: web.Application) -> None:
    for ws in list(app[_WEBSOCKETS_KEY]):
        await ws.close(code=1001, message=b"server shutdown")


async def _abort_leftover_transports() -> None:
    """Abort connections still open after the graceful cleanup.

    aiohttp's shutdown *closes* connections; a TLS (or plain) transport whose peer
    stopped reading keeps waiting to flush (close_notify, buffered body) and would
    outlive the loop, i.e. leak its socket (ResourceWarning). The same goes for
    connections stuck in the TLS handshake, which no server object tracks. Uses the
    selector loop's private fd -> transport map, defensively.
    """
    loop = asyncio.get_running_loop()
    transports = getattr(loop, "_transports", None)
    if transports is None:
        return
    for transport in list(transports.values()):
        if transport is not None:
            transport.abort()
    for _ in range(5):  # let connection_lost callbacks close the sockets
        await asyncio.sleep(0)


def _make_app(
    scheme: str, seen: list[SeenRequest], counter: itertools.count[int]
) -> web.Application:
    app = web.Application(middlewares=[_record])
    app[_SEEN_KEY] = seen
    app[_SCHEME_KEY] = scheme
    app[_WEBSOCKETS_KEY] = weakref.WeakSet()
    app[_CONN_IDS_KEY] = weakref.WeakKeyDictionary()
    app[_COUNTER_KEY] = counter
    app.on_shutdown.append(_close_websockets)
    app.router.add_get("/ip", _ip, allow_head=False)
    app.router.add_get("/bytes/{n}", _bytes, allow_head=False)
    app.router.add_get("/chunked/{n}", _chunked, allow_head=False)
    app.router.add_post("/upload", _upload)
    app.router.add_put("/upload", _upload)
    app.router.add_get("/head", _head)  # allow_head=True: HEAD /head too
    app.router.add_get("/status/{code}", _status, allow_head=False)
    app.router.add_get("/headers", _headers, allow_head=False)
    app.router.add_get("/slow/{n}", _slow, allow_head=False)
    app.router.add_get("/ws", _ws, allow_head=False)
    return app


# --------------------------------------------------------------------------- raw server


class _RawServer:
    """Serves close-delimited responses; one request per connection."""

    def __init__(self, listener: str, seen: list[SeenRequest]) -> None:
        self.listener = listener
        self.seen = seen
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ssl.SSLError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = [*lines[0].split(" ", 2), "", ""][:3]
        headers = [[k, v.strip()] for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
        self.seen.append(
            SeenRequest(listener=self.listener, method=method, path=target, headers=headers)
        )
        path, _, query = target.partition("?")
        prefix = "/close-delimited/"
        n = -1
        if method == "GET" and path.startswith(prefix) and path[len(prefix) :].isdigit():
            n = int(path[len(prefix) :])
        if n < 0:
            writer.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n"
                b"Connection: close\r\n\r\nnot found\n"
            )
            await writer.drain()
            return
        version = "HTTP/1.1" if "version=1.1" in query.split("&") else "HTTP/1.0"
        writer.write(
            (
                f"{version} 200 OK\r\n"
                "Content-Type: application/octet-stream\r\n"
                f"X-Sha256: {await _sha256_of(n)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
        )
        for block in iter_expected_bytes(n):
            writer.write(block)
            await writer.drain()

    def abort_all(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()


# --------------------------------------------------------------------------- runner


class _ServerThread(threading.Thread):
    def __init__(self, server_ctx: ssl.SSLContext, seen: list[SeenRequest]) -> None:
        super().__init__(name="test-upstream", daemon=True)
        self.server_ctx = server_ctx
        self.seen = seen
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.ports: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the starting thread
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            # Registered first, so it runs last, after the graceful cleanups.
            stack.push_async_callback(_abort_leftover_transports)
            counter: itertools.count[int] = itertools.count(1)
            for scheme, ctx in (("http", None), ("https", self.server_ctx)):
                runner = web.AppRunner(
                    _make_app(scheme, self.seen, counter),
                    access_log=None,
                    shutdown_timeout=_SHUTDOWN_GRACE,
                )
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                site = web.TCPSite(runner, LISTEN_HOST, 0, ssl_context=ctx)
                await site.start()
                self.ports[scheme] = runner.addresses[0][1]
            for name, ctx in (("raw", None), ("raw-https", self.server_ctx)):
                await stack.enter_async_context(self._raw_server(name, ctx))
            self.ready.set()
            await self.stop_event.wait()

    @contextlib.asynccontextmanager
    async def _raw_server(self, name: str, ctx: ssl.SSLContext | None) -> AsyncIterator[None]:
        raw = _RawServer(name, self.seen)
        server = await asyncio.start_server(raw.handle, LISTEN_HOST, 0, ssl=ctx)
        self.ports[name] = server.sockets[0].getsockname()[1]
        try:
            yield
        finally:
            server.close()
            raw.abort_all()
            await server.wait_closed()
            # Let aborted connection handlers run their cleanup.
            for _ in range(3):
                await asyncio.sleep(0)

    def stop(self) -> None:
        loop, event = self.loop, self.stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(event.set)
        self.join(_STOP_TIMEOUT)
        if self.is_alive():
            raise RuntimeError("test upstream did not stop in time")


@contextlib.contextmanager
def running_upstream(tmp_path: Path, *, untrusted: bool = False) -> Iterator[Upstream]:
    """Start the upstream (HTTP, HTTPS and raw listeners on 127.0.0.1:0); stop it on exit.

    With ``untrusted=True`` the HTTPS listeners present a certificate signed by a
    different CA than ``Upstream.ca`` / ``ca_pem_path``, so verification must fail.
    """
    ca = trustme.CA()
    signer = trustme.CA() if untrusted else ca
    server_cert = signer.issue_cert(*CERT_IDENTITIES)
    ca_pem_path = tmp_path / ("upstream-ca-untrusted-case.pem" if untrusted else "upstream-ca.pem")
    ca.cert_pem.write_to_path(ca_pem_path)

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["http/1.1"])

    seen: list[SeenRequest] = []
    thread = _ServerThread(server_ctx, seen)
    thread.start()
    if not thread.ready.wait(_START_TIMEOUT):
        thread.stop()
        raise RuntimeError("test upstream did not start in time")
    if thread.error is not None:
        thread.join(_STOP_TIMEOUT)
        raise RuntimeError("test upstream failed to start") from thread.error
    try:
        yield Upstream(
            http_port=thread.ports["http"],
            https_port=thread.ports["https"],
            ca=ca,
            ca_pem_path=ca_pem_path,
            raw_port=thread.ports["raw"],
            raw_https_port=thread.ports["raw-https"],
            untrusted=untrusted,
            seen_headers=seen,
        )
    finally:
        thread.stop()
    if thread.error is not None:
        raise RuntimeError("test upstream crashed") from thread.error
