"""The asyncio shell: accept clients, read request heads, answer CONNECT, intercept TLS.

Path of a connection: `_on_connect` starts one task per client, `_serve` reads heads in
a loop (keep-alive, pipelining: the next head is read only after the previous answer),
CONNECT switches to `_tunnel` (TLS with a leaf for the requested name: intercept.py; or
plain HTTP in the tunnel), and each request goes to `Forwarder.forward`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Final

from demux_proxy import log
from demux_proxy.auth import ClientPolicy, challenge_response, session_of
from demux_proxy.ca import CertificateAuthority, valid_name
from demux_proxy.config import Config
from demux_proxy.errors import Forbidden, ProtocolError, ProxyError, StreamClosed
from demux_proxy.exchange import Forwarder, error_kind
from demux_proxy.http1 import writer
from demux_proxy.http1.headers import Headers, get, replace
from demux_proxy.http1.parser import RequestHead, find_head_end, parse_request_head
from demux_proxy.intercept import Interceptor
from demux_proxy.policy import DestinationPolicy
from demux_proxy.route import (
    Tunnel,
    check_host_field,
    is_ip_literal,
    parse_authority,
    route_for,
    tls_name,
)
from demux_proxy.stream import Stream

_internal: Final = logging.getLogger(log.LOGGER_NAME)
_TLS_HANDSHAKE: Final = 0x16  # first byte of a TLS record carrying a ClientHello
# How long a connection we end may still take the client's bytes (Stream.linger_close).
LINGER_S: Final = 2.0
_MAX_FORWARDS_METHODS: Final = frozenset({b"TRACE", b"OPTIONS"})
_SENSITIVE_FIELDS: Final = frozenset({b"proxy-authorization", b"authorization", b"cookie"})
_ALLOW: Final = b"GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"
# Pipelined requests answered from one buffer before the loop may run other clients.
_PIPELINED_BATCH: Final = 8
LISTEN_BACKLOG: Final = 4096
# accept() errors that mean the descriptor table is full: idle upstreams give some back.
_SHORT_OF_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE})


def _max_forwards(headers: Headers) -> int | None:
    """The hops Max-Forwards allows: None without the field, -1 with no valid number."""
    seen = False
    least = -1
    for name, field in headers:
        if len(name) != 12 or name.lower() != b"max-forwards":
            continue
        seen = True
        for value in field.split(b","):
            value = value.strip()
            if value.isdigit():
                n = int(value) if len(value) <= 18 else 10**18
                least = n if least < 0 else min(least, n)
    return least if seen else None


def _ends_connection(req: RequestHead) -> bool:
    """Whether the connection ends after the proxy answers `req` itself (407, Max-Forwards
    0): a body we do not read leaves it off a message boundary, and a client may have
    asked for the end (Connection: close, HTTP/1.0)."""
    return bool(req.content_length or req.chunked) or not req.keep_alive


def _numeric_ipv4(host: str) -> str | None:
    """The IPv4 address a numeric host that is no dotted quad names ("127.1", "0x7f.1",
    "2130706433": getaddrinfo reads them so), for judging a CONNECT before its 200."""
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


class ProxyServer:
    def __init__(
        self,
        config: Config,
        ca: CertificateAuthority,
        forwarder: Forwarder,
        events: log.EventLog,
        policy: ClientPolicy,
        destinations: DestinationPolicy,
    ) -> None:
        self._policy = policy
        self._destinations = destinations
        self._config = config
        self._ca = ca
        self._forwarder = forwarder
        self._accept_failed_at = -1e9  # loop time of the last "accept failed" line
        self._events = events
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: set[Stream] = set()  # waiting for a next request: closed at shutdown
        self._intercept = Interceptor(ca, events, config.handshake_timeout_s, self._shed_if_short)
        self._closing = False
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        # The task just started for a new Stream, handed to the accept loop for its slot.
        self._task_of: dict[Stream, asyncio.Task[None]] = {}

    async def start(self) -> int:
        """Listen (with SO_REUSEPORT when shared with other workers) and accept; return the
        port.

        Our own accept loop rather than `loop.create_server`, so that at
        `max_connections` we simply stop accepting: new clients wait in the kernel's
        listen backlog instead of being dropped, and are taken as soon as one ends.
        """
        cfg = self._config
        infos = socket.getaddrinfo(
            cfg.listen_host, cfg.listen_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if cfg.workers > 1:  # only then: any process of ours that sets it could join
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        return int(sock.getsockname()[1])

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._config.max_connections)
        while True:
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                # EMFILE and friends: give idle upstream connections back, say so, breathe,
                # and keep the listener alive.
                slots.release()
                self._accept_failed(exc)
                conn = None  # no await in an except block (see stream._splice_chunk)
            if conn is None:
                await asyncio.sleep(0.1)
                continue
            stream = await self._wrap(conn)
            if stream is None:
                slots.release()
                continue
            task = self._task_of.pop(stream, None)
            if task is None:
                slots.release()
            else:
                task.add_done_callback(lambda _t: slots.release())

    async def _wrap(self, conn: socket.socket) -> Stream | None:
        """The accepted socket as a transport; None when that failed (the client left
        between accept and now, mostly: nothing to serve, nothing to say)."""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _, stream = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: Stream(on_connect=self._on_connect), conn
            )
            return stream
        except OSError as exc:
            if exc.errno in _SHORT_OF_FDS:  # not the client's doing: said, as for accept
                self._accept_failed(exc)
            conn.close()
            return None

    def _shed_if_short(self, exc: OSError) -> int:
        """Out of descriptors: idle upstream connections closed to make room (how many)."""
        return self._forwarder.shed_idle() if exc.errno in _SHORT_OF_FDS else 0

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors: close idle upstream connections and say so, at most once a
        second unless some were closed. Other errors are said likewise (the accept loop
        sleeps 0.1 s after each, so the shed sockets are closed by then)."""
        shed = self._shed_if_short(exc)
        now = asyncio.get_running_loop().time()
        if shed or now - self._accept_failed_at >= 1.0:
            self._accept_failed_at = now
            self._events.error(
                "accept failed", error=exc.strerror or str(exc), idle_upstream_closed=shed
            )

    def close_listener(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()

    def __repr__(self) -> str:
        return f"<ProxyServer clients={len(self._tasks)} idle={len(self._idle)}>"

    async def shutdown(self) -> None:
        """Stop accepting, close idle clients, let requests in flight finish (bounded)."""
        self._closing = True
        self._forwarder.closing = True
        self.close_listener()
        for stream in list(self._idle):
            stream.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._config.shutdown_grace_s)
            for task in pending:
                task.cancel()
            if pending:
                self._events.warning(
                    "shutdown grace period over: cutting requests in flight",
                    cut=len(pending),
                )
                await asyncio.wait(pending)

    # --- per client ---------------------------------------------------------------

    def _on_connect(self, stream: Stream) -> None:
        if self._closing:
            stream.abort()
            return
        if not self._policy.client_allowed(stream.peer[0]):
            self._events.warning("client refused by --allow-client", client=stream.peer[0])
            stream.abort()
            return
        task = stream.loop.create_task(self._client(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._task_of[stream] = task

    async def _client(self, stream: Stream) -> None:
        try:
            await self._serve(stream, None)
            if not self._closing:
                await stream.linger_close(LINGER_S)
        except (StreamClosed, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            self._events.debug(
                "client connection ended",
                client=stream.peer[0],
                reason=str(exc) or type(exc).__name__,
            )
        except Exception:
            # A bug of ours: logged with its traceback, the client gets a reset, the proxy
            # keeps serving everyone else.
            _internal.exception("internal error", extra={"fields": {"client": stream.peer[0]}})
            stream.abort()
        finally:
            self._idle.discard(stream)
            stream.close()

    async def _serve(self, stream: Stream, tunnel: Tunnel | None) -> None:
        idle_timeout = self._config.idle_timeout_s
        served = 0
        valid_host: bytes | None = None  # the Host field last found valid in the tunnel
        while not self._closing:
            if stream.buffer:
                served += 1
                if not served % _PIPELINED_BATCH:
                    # Requests pipelined in one read are all in the buffer, and answering
                    # one need not wait for anything (a refusal): let the others run.
                    await asyncio.sleep(0)
            # A client that sends requests without reading the answers stops being read
            # until it takes them, also the answers the proxy writes itself (407, 403).
            if stream.must_drain:
                await stream.drain(idle_timeout)
            req = await self._next_request(stream)
            if req is None:
                return
            # Inside a tunnel the client already proved itself on CONNECT.
            if (
                tunnel is None
                and self._policy.auth_required
                and not await self._authorized(stream, req)
            ):
                if _ends_connection(req):
                    return
                continue
            if req.method == b"CONNECT":
                if tunnel is not None:
                    self._refuse(stream, ProtocolError("CONNECT inside a tunnel"))
                    return
                await self._tunnel(stream, req)
                return
            if req.method in _MAX_FORWARDS_METHODS and not self._forwards(stream, req):
                if _ends_connection(req):
                    return
                continue
            try:
                route = route_for(req.target, tunnel, req.method == b"OPTIONS")
                if (
                    tunnel is not None
                    and route.host_header is None
                    and (req.host is None or req.host != valid_host)
                ):
                    check_host_field(req.host, req.version)
                    if req.host is None:  # HTTP/1.0 may omit it; it goes on as 1.1
                        route.host_header = tunnel.host_field
                    valid_host = req.host  # the tunnel's next requests mostly repeat it
            except ProtocolError as exc:
                self._refuse(stream, exc)
                return
            if not await self._forwarder.forward(stream, req, route):
                return

    def _forwards(self, stream: Stream, req: RequestHead) -> bool:
        """RFC 9110 7.6.2: TRACE and OPTIONS with Max-Forwards go on with it decremented,
        or, at 0, are answered here (False). Several fields or list members count as the
        least of them, and one field goes on; with no valid number, none goes on (a
        next hop could read one the proxy ignored)."""
        hops = _max_forwards(req.headers)
        if hops is None:
            return True
        if hops < 0:
            req.headers = [(n, v) for n, v in req.headers if n.lower() != b"max-forwards"]
            return True
        if hops > 0:
            req.headers = replace(req.headers, b"max-forwards", b"Max-Forwards", b"%d" % (hops - 1))
            return True
        close = _ends_connection(req)
        headers: list[tuple[bytes, bytes]] = []
        body = b""
        if req.method == b"TRACE":  # the request as received, less its credentials
            lines = [b"%s %s HTTP/%s\r\n" % (req.method, req.target, req.version)]
            lines += [
                b"%s: %s\r\n" % (name, v)
                for name, v in req.headers
                if name.lower() not in _SENSITIVE_FIELDS
            ]
            body = b"".join(lines) + b"\r\n"
            headers.append((b"Content-Type", b"message/http"))
        else:
            headers.append((b"Allow", _ALLOW))
        headers.append((b"Content-Length", b"%d" % len(body)))
        if close:
            headers.append((b"Connection", b"close"))
        stream.write(writer.response_head(200, b"OK", headers) + body)
        self._forwarder.answered_here(200, None)
        self._events.info(
            "answered by the proxy: Max-Forwards 0",
            client=stream.peer[0],
            method=req.method.decode("latin-1"),
            status_code=200,
        )
        return False

    async def _authorized(self, stream: Stream, req: RequestHead) -> bool:
        """Check Proxy-Authorization; answer 407 when it is missing or wrong.

        A bcrypt/argon2 check costs ~100 ms by design: the first one per credential runs
        in a thread so the loop keeps serving everyone else; later ones hit the cache.
        """
        policy = self._policy
        if policy.would_block(req.headers):
            loop = asyncio.get_running_loop()
            user = await loop.run_in_executor(None, policy.check, req.headers)
        else:
            user = policy.check(req.headers)
        if user is not None:
            return True
        # The challenge to a client that sent no credentials is how Basic auth begins
        # (browsers, Scrapy, curl --proxy-anyauth ask first): info. Refused ones: warning.
        offered = get(req.headers, b"proxy-authorization") is not None
        (self._events.warning if offered else self._events.info)(
            "proxy authentication required",
            client=stream.peer[0],
            credentials="refused" if offered else "none",
            method=req.method.decode("latin-1"),
            status_code=407,
        )
        stream.write(challenge_response(close=_ends_connection(req)))
        # Credentials refused count as an error; a challenge is how Basic auth begins.
        self._forwarder.answered_here(407, "auth" if offered else None)
        return False

    async def _next_request(self, stream: Stream) -> RequestHead | None:
        """The next request head, or None when the client is done (or must be dropped)."""
        cfg = self._config
        buf = stream.buffer
        loop = stream.loop
        deadline: float | None = None  # the whole head, not each read, is bounded
        skipped = 0  # empty lines dropped before the request-line
        checked = 0  # how much of buf find_head_end has seen
        try:
            while True:
                if buf and (buf[0] == 0x0D or buf[0] == 0x0A):
                    # RFC 9112 2.2: ignore empty lines before the request-line (a stray
                    # CRLF, or a lone LF, after a body), or find_head_end would stop at
                    # them. Counted against the head's size and time limits: a flood of
                    # them ends too.
                    i = 0
                    n = len(buf)
                    while i < n:
                        if buf[i] == 0x0A:
                            i += 1
                        elif buf[i] == 0x0D and i + 1 < n and buf[i + 1] == 0x0A:
                            i += 2
                        else:
                            break
                    if i:
                        del buf[:i]
                        checked = max(0, checked - i)
                        skipped += i
                        if skipped > cfg.max_head_bytes:
                            raise ProtocolError("too many empty lines before the request-line")
                end = find_head_end(
                    buf, cfg.max_head_bytes - skipped, request=True, checked=checked
                )
                if end >= 0:
                    break
                checked = len(buf)
                idle = not buf
                if idle:
                    self._idle.add(stream)  # nothing of a request yet: closed at shutdown
                if idle and not skipped:
                    timeout = cfg.client_idle_timeout_s
                else:
                    if deadline is None:
                        deadline = loop.time() + cfg.head_timeout_s
                    timeout = max(deadline - loop.time(), 0.0)
                try:
                    more = await stream.fill(timeout)
                finally:
                    self._idle.discard(stream)
                if not more:
                    return None
            head = bytes(buf[:end])
            del buf[:end]
            return parse_request_head(head)
        except TimeoutError:
            if buf:
                self._refuse(stream, ProtocolError("request head not received in time", status=408))
            return None
        except ProtocolError as exc:
            self._refuse(stream, exc)
            return None

    def _refuse(self, stream: Stream, exc: ProxyError) -> None:
        """Answer a request we will not forward; the caller returns, and the connection
        closes (lingering: Stream.linger_close), since its framing can't be trusted."""
        self._events.warning(
            "request refused",
            client=stream.peer[0],
            status_code=exc.status,
            error=exc.reason,
        )
        stream.write(writer.plain_response(exc.status, exc.reason, close=True))
        self._forwarder.answered_here(exc.status, error_kind(exc))

    # --- CONNECT ------------------------------------------------------------------

    async def _tunnel(self, stream: Stream, req: RequestHead) -> None:
        """CONNECT host:port: say yes, then read what the client speaks in the tunnel."""
        try:
            host, port = parse_authority(req.target)
            if self._ca.expired():  # before the 200: every leaf would be refused
                raise ProxyError(
                    f"the proxy's CA certificate expired on {self._ca.expires:%Y-%m-%d}: "
                    "HTTPS cannot be intercepted until the proxy restarts with a new one",
                    status=503,
                )
            if not valid_name(host):  # before the 200: no leaf could be made for it
                raise ProtocolError(f"CONNECT target is not a host name: {host[:64]!r}")
            self._destinations.check_name(host)
            literal = host if is_ip_literal(host) else _numeric_ipv4(host)
            if literal is not None:
                why = self._destinations.refusal(host, literal, port)
                if why is not None:
                    raise Forbidden(f"destination {host} is {why}")
            # X-Demux-Egress and X-Demux-Session on CONNECT hold for every request inside,
            # as a session in the proxy user name does (a request's own header wins).
            pin_field = get(req.headers, b"x-demux-egress")
            pin = self._forwarder.pin(pin_field) if pin_field is not None else None
        except ProxyError as exc:
            self._refuse(stream, exc)
            return
        session_field = get(req.headers, b"x-demux-session")
        session = (
            session_field.decode("latin-1").strip() if session_field else session_of(req.headers)
        )
        stream.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        cfg = self._config
        try:
            if not stream.buffer and not await stream.fill(cfg.handshake_timeout_s):
                return
        except TimeoutError:
            # Said, not a silent close: a client waiting for the server to speak first
            # (SMTP, SSH...) gets nothing, as the proxy relays requests, not bytes.
            self._events.warning(
                "tunnel closed: the client sent nothing",
                client=stream.peer[0],
                host=host,
                port=port,
                waited_s=cfg.handshake_timeout_s,
                reason="only TLS and HTTP are relayed through CONNECT, "
                "not a protocol whose server speaks first",
            )
            return
        if stream.buffer[0] != _TLS_HANDSHAKE:
            # Plain HTTP inside the tunnel (ws:// through CONNECT): proxied the same way.
            await self._serve(stream, Tunnel("http", host, port, host, session, pin))
            return
        name = await self._intercept.handshake(stream, host)
        if name is not None:
            await self._serve(stream, Tunnel("https", host, port, tls_name(name), session, pin))
