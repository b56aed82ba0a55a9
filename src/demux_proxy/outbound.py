"""The upstream side of one exchange: the egress address, a connection, the request head.

`Outbound.open` picks the egress for the request (waiting in the host's queue when every
address is out of budget), takes an idle connection for (egress, scheme, host, port)
from the pool or dials one (with mixed IPv4/IPv6 egress, only from a family the host
has), writes the request head and logs the "outbound request" line. A pooled connection
the server closed just before our head is replaced once, for a request that is safe to
send again. The bodies and the answer are `exchange.py`'s.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final

from demux_proxy import log
from demux_proxy.config import Config
from demux_proxy.dispatch import Dispatcher
from demux_proxy.egress import Egress
from demux_proxy.errors import PeerGone, StreamClosed, Unavailable, UpstreamTimeout
from demux_proxy.http1 import writer
from demux_proxy.http1.framing import BodyDecoder
from demux_proxy.http1.headers import end_to_end, replace, websocket_upgrade
from demux_proxy.http1.parser import RequestHead
from demux_proxy.metrics import Recorder
from demux_proxy.outcome import Outcome
from demux_proxy.policy import DestinationPolicy
from demux_proxy.pool import Pool
from demux_proxy.route import Route, is_ip_literal
from demux_proxy.scheduler import Scheduler
from demux_proxy.stream import Stream
from demux_proxy.upstream import Resolver, UpstreamConnection, allowed_addresses, connect

# RFC 9110 9.2.2: the methods a proxy may send again on its own (never a POST: a server
# that closed without answering may have acted on it already).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


# RFC 8305 3: how long to wait for the other family once one has answered.
_RESOLUTION_DELAY_S: Final = 0.05


def _retrieved(lookup: asyncio.Future[list[str]]) -> None:
    """A lookup nobody waits for any more: its error is not worth a warning."""
    if not lookup.cancelled():
        lookup.exception()


def _found(lookup: asyncio.Future[list[str]]) -> bool:
    """A lookup that ended with addresses."""
    return (
        lookup.done()
        and not lookup.cancelled()
        and lookup.exception() is None
        and bool(lookup.result())
    )


class _StaleConnection(Exception):
    """A pooled connection closed before answering: safe to retry on a fresh one."""


class Outbound:
    def __init__(
        self,
        config: Config,
        dispatch: Dispatcher,
        scheduler: Scheduler,
        pool: Pool[UpstreamConnection],
        upstream_tls: ssl.SSLContext,
        events: log.EventLog,
        policy: DestinationPolicy,
        metrics: Recorder,
    ) -> None:
        self._config = config
        self._dispatch = dispatch
        self._scheduler = scheduler
        self._pool = pool
        self._tls = upstream_tls
        self._events = events
        self._policy = policy
        self._metrics = metrics
        self._resolver = Resolver(timeout_s=config.connect_timeout_s)

    async def open(
        self,
        client: Stream,
        req: RequestHead,
        route: Route,
        body: BodyDecoder,
        out: Outcome,
        sid: int,
        method: str,
        tried: list[str],
        only: str | None,
        family: int | None,
    ) -> tuple[UpstreamConnection, Egress]:
        """Pick the egress and a connection, send the head. One retry on a stale pooled one.

        The request is counted in `scheduler.in_flight` for the address in `out.egress`
        from the moment it is picked, also when this raises: the caller uncounts it.
        """
        policy = self._policy
        if policy.names_ruled:
            # The tunnel's SNI and the Host inside it (absolute-form's authority replaces
            # the field; outside a tunnel, that authority is the route's own host).
            host_field = route.host_header if route.host_header is not None else req.host
            policy.check_request(route.host, route.tls_name, host_field)
        egress = self._dispatch.acquire_now(route, tried, only, family)
        if egress is None:
            egress, out.queued_ms = await self._dispatch.acquire(client, route, tried, only, family)
        else:
            out.queued_ms = 0.0
        out.egress = egress
        self._scheduler.started(egress.address)
        key = (egress.address, route.scheme, route.host, route.port, route.tls_name)
        conn = self._pool.checkout(key)
        if conn is None:
            conn = await self._dial(egress, route)
            self._dispatch.connected(egress.address, route)
        else:
            self._metrics.upstream_connection(egress.address, reused=True)
        fields: dict[str, object] = {  # keys in sorted order (emit's in_order)
            "client": client.peer[0],
            "device": egress.interface,
            "interface": egress.address,
            "method": method,
        }
        if out.queued_ms:
            fields["queued_ms"] = out.queued_ms
        if tried:
            fields["retry_of"] = tried[-1]
        fields["session_id"] = sid
        fields["type"] = "request"
        fields["url"] = route.url
        self._events.emit(log.INFO, "outbound request", fields, in_order=True)
        head = request_head(req, route)
        conn.stream.write(head)
        if conn.requests and body.done and not req.upgrade and req.method in IDEMPOTENT:
            # A reused connection the server closed just now fails before any byte of
            # answer; an idempotent request without a body is safe to send again on a
            # fresh one. (Any other fails as the exchange reads its answer: a 502.)
            try:
                await self._await_first_byte(conn, client)
                stale = False
            except _StaleConnection:
                stale = True  # no await in an except block: see stream._splice_chunk
            except BaseException:
                conn.drop()  # a timeout here: the caller never sees `conn` to close it
                raise
            if stale:
                conn.close()
                conn = await self._dial(egress, route)
                self._dispatch.connected(egress.address, route)
                conn.stream.write(head)
        conn.requests += 1
        return conn, egress

    async def family(self, route: Route) -> int | None:
        """With mixed IPv4/IPv6 egress, the one family of addresses that can reach the
        host, else None (both can, or egress has one family). Found before an address is
        chosen, so that the choice keeps to budgets, cooldowns, sessions and the pool.

        Both lookups run at once (cached as usual). A family whose lookup fails counts as
        unreachable when the other has addresses, and once one family has answered with
        addresses the other gets 50 ms more (RFC 8305's resolution delay), not its timeout.
        """
        families = sorted(self._scheduler.families)
        if len(families) < 2:
            return None
        known = [self._resolver.known(route.host, f) for f in families]
        if all(k is not None for k in known):  # most requests: no task, no wait
            decided, family = self._one_family(route, families, known)
            if decided:
                return family
        lookups = [asyncio.ensure_future(self._resolver.resolve(route.host, f)) for f in families]
        done, pending = await asyncio.wait(lookups, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            if any(_found(t) for t in done):
                await asyncio.wait(pending, timeout=_RESOLUTION_DELAY_S)
            else:
                await asyncio.wait(pending)
            for t in lookups:
                if not t.done():  # left to finish (and be cached) on its own, not cancelled
                    t.add_done_callback(_retrieved)
        answers = [t.result() if _found(t) else None for t in lookups]
        decided, family = self._one_family(route, families, answers)
        if decided:
            return family
        for t in lookups:
            exc = t.exception() if t.done() and not t.cancelled() else None
            if exc is not None:
                raise exc
        raise self._resolver.no_address(route.host, families)

    def _one_family(
        self, route: Route, families: list[int], answers: list[list[str] | None]
    ) -> tuple[bool, int | None]:
        """From each family's addresses for the host (None or empty: none), whether any
        had one, and the one family to use, else None (both can). Only addresses the
        destination rules admit count: a name whose IPv6 address is refused (private,
        --deny) goes over IPv4, rather than one request in two getting a 403. Where none
        is admitted, the family that has addresses is used, and the dial says why not."""
        found: list[int] = []
        admitted: list[int] = []
        policy = self._policy
        for family, addresses in zip(families, answers, strict=True):
            if addresses:
                found.append(family)
                for address in addresses:
                    if policy.refusal(route.host, address, route.port, route.tls_name) is None:
                        admitted.append(family)
                        break
        usable = admitted or found
        return bool(found), usable[0] if len(usable) == 1 else None

    async def _dial(self, egress: Egress, route: Route) -> UpstreamConnection:
        """A new connection from `egress`, verified as the route's TLS name."""
        self._policy.check_name(route.host)
        for attempt in range(2):
            try:
                conn = await self._dial_once(egress, route)
                break
            except Unavailable:
                # Out of descriptors (lookup or socket): idle connections to other hosts
                # hold them. Give some back and try once more; then the 503 stands.
                if attempt or not self._pool.shed():
                    raise
            await asyncio.sleep(0)  # the loop closes their sockets at the end of its turn
        self._pool.created += 1
        self._scheduler.healthy(egress.address)
        self._metrics.upstream_connection(egress.address, reused=False)
        return conn

    async def _dial_once(self, egress: Egress, route: Route) -> UpstreamConnection:
        addresses = await self._resolver.resolve(route.host, egress.family)
        key = (egress.address, route.scheme, route.host, route.port, route.tls_name)
        if not addresses:
            if is_ip_literal(route.host):  # of the other family: refused is said first
                allowed_addresses(self._policy, key, [route.host])
            raise self._resolver.no_address(route.host, [egress.family])
        return await connect(
            egress=egress,
            addresses=addresses,
            key=key,
            tls=self._tls if route.scheme == "https" else None,
            server_hostname=route.tls_name,
            policy=self._policy,
            timeout_s=self._config.connect_timeout_s,
        )

    async def _await_first_byte(self, conn: UpstreamConnection, client: Stream) -> None:
        """The answer's first byte on a reused connection; _StaleConnection when it closed
        first. A client that resets meanwhile ends the wait (PeerGone), as in the
        exchange's own wait for the head: its upstream is not held to --response-timeout."""
        up = conn.stream
        if up.buffer:
            return
        if client.closed:
            raise PeerGone("client connection lost while waiting for the upstream")
        # No `finally`: on the compiled path it costs every reused request more than the
        # rest of this method (bench/instructions.sh); each way out resets the watcher.
        client.watcher = up
        try:
            more = await up.fill(self._config.response_timeout_s)
        except StreamClosed as exc:
            client.watcher = None
            if isinstance(exc, PeerGone):
                raise  # the client's loss, not a stale connection: the exchange ends
            raise _StaleConnection from None
        except TimeoutError as exc:
            client.watcher = None
            timeout = self._config.response_timeout_s
            raise UpstreamTimeout(f"no response from upstream within {timeout:g} s") from exc
        except BaseException:
            client.watcher = None
            raise
        client.watcher = None
        if not more:
            raise _StaleConnection


def request_head(req: RequestHead, route: Route) -> bytes:
    """The head sent upstream: hop-by-hop fields removed, Host set, framing declared."""
    headers = end_to_end(req.headers, req.connection, drop_length=False)
    if route.host_header is not None:
        # RFC 9112 3.2.2: a proxy replaces Host with the absolute-form's authority.
        headers = replace(headers, b"host", b"Host", route.host_header)
    if req.chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if req.upgrade:
        headers.append((b"Connection", b"upgrade"))
        headers.append((b"Upgrade", websocket_upgrade(req.headers) or b"websocket"))
    return writer.request_head(req.method, route.target, headers)
