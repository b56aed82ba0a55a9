"""Open upstream connections bound to an egress address; map socket errors to ours.

The only place that dials out. Each connection's source address is the egress picked for
the request (bind before connect), the destination is checked by `policy` on the exact
address dialled, and every OSError/SSLError becomes an `UpstreamError` (502) or
`UpstreamTimeout` (504) here, with a reason a person can read.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Final

from demux_proxy.egress import Egress
from demux_proxy.errors import (
    EgressFailure,
    EgressRefused,
    EgressTimeout,
    EgressUnreachable,
    Forbidden,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from demux_proxy.policy import DestinationPolicy
from demux_proxy.pool import PoolKey
from demux_proxy.route import bracketed, is_ip_literal
from demux_proxy.stream import Stream

# Linux: let connect() pick the source port, so that many connections from one egress
# address to different destinations can share ports (IP_BIND_ADDRESS_NO_PORT, 4.2+).
_IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_ids: Final = count(1)
# getaddrinfo's "no address (of this family)": the name is fine, the answer is empty.
NO_ADDRESS_ERRNOS: Final = frozenset(
    {
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", -5),
        getattr(socket, "EAI_ADDRFAMILY", -9),
    }
)
FAMILY_NAME: Final[dict[int, str]] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
# ::ffff:0:0/96: an IPv4 address written as IPv6. An IPv6 socket cannot reach it (Linux:
# ENETUNREACH), and the destination rules already judge it as the IPv4 address inside.
_V4_MAPPED: Final = bytes(10) + b"\xff\xff"
# The egress address's own fault (gone from the host), and no route from it to there.
_EGRESS_ERRNOS: Final = frozenset({errno.EADDRNOTAVAIL})
_UNREACHABLE_ERRNOS: Final = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})
# The proxy short of descriptors or memory: resting an egress address would not help.
_LOCAL_SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(eq=False)
class UpstreamConnection:
    stream: Stream
    key: PoolKey
    egress: Egress
    remote: str  # the address actually dialled
    idle_since: float = 0.0
    max_idle_s: float = float("inf")  # from the server's Keep-Alive field (pool.Pooled)
    requests: int = 0
    id: int = field(default_factory=lambda: next(_ids))

    def usable(self) -> bool:
        """Idle and healthy: the server has not closed it nor sent anything unasked
        (also not in the kernel, unread, after a spliced body or with reading paused)."""
        s = self.stream
        return (
            not s.closed
            and not s.eof
            and not s.buffer
            # Reset: the transport is closing from then on, but connection_lost (which
            # sets `closed`) comes a loop turn later; the next request's write would fail
            # there, taken for the client's loss.
            and not s.transport.is_closing()
            and not (s.may_hold_unread and s.unread_in_kernel())
        )

    def close(self) -> None:
        self.stream.close()

    def drop(self) -> None:
        """Closed at once, without close_notify, the descriptor free by the end of this
        loop turn: for an idle connection (nothing in flight), and for one left mid-message
        (a client gone mid-body, an error), where uvloop's TLS shutdown would read and
        discard the rest of the body for up to 30 s, the site sending it all."""
        self.stream.transport.abort()


class Resolver:
    """getaddrinfo per address family, with a short cache (DNS TTLs are not visible here).

    Only names are cached, never the verdict: `policy` judges each address at connect.
    """

    def __init__(
        self,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 10.0,
    ) -> None:
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[list[str]]] = {}
        # Empty answers that were "no such name" (NXDOMAIN), not "none of this family".
        self._unknown: set[tuple[str, int]] = set()
        self._ttl = ttl_s
        self._timeout = timeout_s  # a resolver that never answers must not hold requests
        self._clock = clock

    def known(self, host: str, family: int) -> list[str] | None:
        """What `resolve` would answer without a lookup (an IP literal, a cached name),
        else None."""
        try:
            literal = socket.inet_pton(family, host)
        except OSError:
            literal = None
        if literal is not None:
            if literal[:12] == _V4_MAPPED:  # IPv6 only in form: dialled as IPv4 (below)
                return []
            return [host]
        if is_ip_literal(host):
            if family == socket.AF_INET:  # then it is IPv6: ::ffff:a.b.c.d is a.b.c.d
                packed = socket.inet_pton(socket.AF_INET6, host)
                if packed[:12] == _V4_MAPPED:
                    return [socket.inet_ntop(socket.AF_INET, packed[12:])]
            return []  # an IP literal of the other family
        cached = self._cache.get((host, family))
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        return None

    async def resolve(self, host: str, family: int) -> list[str]:
        """Addresses of `family` for `host`; [] when the name has none of that family."""
        known = self.known(host, family)
        if known is not None:
            return known
        now = self._clock()
        # One lookup per name and family at a time, whoever asks: libuv runs at most two
        # getaddrinfo at once, and lookups that hang (an AAAA nobody answers) must not
        # take both from the connects, which need one too.
        key = (host, family)
        lookup = self._pending.get(key)
        if lookup is None:
            lookup = self._pending[key] = asyncio.ensure_future(self._lookup(host, family, now))
            lookup.add_done_callback(lambda done: self._lookup_done(key, done))
        return await asyncio.shield(lookup)  # one asker's cancel is not everyone's

    def _lookup_done(self, key: tuple[str, int], done: asyncio.Future[list[str]]) -> None:
        del self._pending[key]
        if not done.cancelled():
            done.exception()  # seen by whoever awaits it; nobody may any more

    async def _lookup(self, host: str, family: int, now: float) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise UpstreamTimeout(f"resolving {host} took over {self._timeout:g} s") from None
        except socket.gaierror as exc:
            if exc.errno in NO_ADDRESS_ERRNOS:  # e.g. "2130706433" asked for IPv6
                addrs: list[str] = []
                if exc.errno == socket.EAI_NONAME:
                    self._unknown.add((host, family))
            else:
                raise UpstreamError(f"cannot resolve {host}: {exc.strerror}") from exc
        except UnicodeError as exc:  # IDNA: an empty or over-long label ("a..b")
            raise UpstreamError(f"cannot resolve {host}: not a valid host name") from exc
        except OSError as exc:  # the lookup itself could not run (out of descriptors...)
            if exc.errno in _LOCAL_SHORTAGE_ERRNOS:
                raise Unavailable(
                    f"cannot resolve {host}: {exc.strerror}", retry_after_s=1
                ) from exc
            raise UpstreamError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        else:
            addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
            self._unknown.discard((host, family))
        self._cache[(host, family)] = (now + self._ttl, addrs)
        if len(self._cache) > 10_000:
            self._cache.clear()
            self._unknown.clear()
        return addrs

    def no_address(self, host: str, families: Sequence[int]) -> UpstreamError:
        """The error for a host with no address in `families`: an unknown name is not
        "no address of this family" (the resolver's own words for each)."""
        if all((host, f) in self._unknown for f in families):
            return UpstreamError(f"cannot resolve {host}: no such host name")
        names = "/".join(FAMILY_NAME[f] for f in families)
        if is_ip_literal(host):
            # Not the literal's spelling: [::ffff:a.b.c.d] is reached over IPv4.
            other = "IPv6" if socket.AF_INET in families else "IPv4"
            return UpstreamError(f"{host} is an {other} address, and no egress address is {other}")
        return UpstreamError(f"{host} has no {names} address that an egress address can reach")


def allowed_addresses(policy: DestinationPolicy, key: PoolKey, addresses: list[str]) -> list[str]:
    """The `addresses` (at least one) that policy lets `key` connect to; Forbidden, with
    the first one's reason, when none."""
    allowed: list[str] = []
    why: str | None = None
    for address in addresses:
        reason = policy.refusal(key[2], address, key[3], key[4])
        if reason is None:
            allowed.append(address)
        elif why is None:
            why = reason
    if not allowed:
        raise Forbidden(f"destination {key[2]} ({addresses[0]}) is {why}")
    return allowed


async def connect(
    *,
    egress: Egress,
    addresses: list[str],
    key: PoolKey,
    tls: ssl.SSLContext | None,
    server_hostname: str,
    policy: DestinationPolicy,
    timeout_s: float,
) -> UpstreamConnection:
    """Dial the first address that policy allows and that answers, bound to `egress`.

    Each address but the last may take its share of the time left for its TCP connect
    (as curl does): one that never answers (SYNs dropped) leaves the others time, where
    it used to take all of `timeout_s`."""
    port = key[3]
    allowed = allowed_addresses(policy, key, addresses)
    loop = asyncio.get_running_loop()
    last: UpstreamError | None = None
    deadline = loop.time() + timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            for index, address in enumerate(allowed):
                try:
                    sock = _bound_socket(egress)
                except OSError as exc:
                    if exc.errno in _LOCAL_SHORTAGE_ERRNOS:  # ours, not the address's
                        raise Unavailable(
                            f"cannot open a connection: {exc.strerror}", retry_after_s=1
                        ) from exc
                    raise EgressFailure(
                        f"cannot bind egress address {egress.address}: {exc.strerror}"
                    ) from exc
                left = len(allowed) - index
                handed = False  # to uvloop: see _let_go
                try:
                    if left > 1:
                        share = (deadline - loop.time()) / left
                        try:
                            async with asyncio.timeout(share):
                                await loop.sock_connect(sock, (address, port))
                        except TimeoutError:
                            sock.close()
                            if loop.time() >= deadline:
                                raise  # the whole time is up: the outer timeout's
                            last = UpstreamError(
                                f"connecting to {bracketed(address)}:{port} timed out"
                            )
                            continue
                    else:
                        await loop.sock_connect(sock, (address, port))
                    handed = True
                    _, stream = await loop.create_connection(
                        lambda: Stream(native_tls=tls is not None),
                        sock=sock,
                        ssl=tls,
                        server_hostname=server_hostname if tls is not None else None,
                        ssl_handshake_timeout=timeout_s if tls is not None else None,
                    )
                except ssl.SSLCertVerificationError as exc:
                    _let_go(sock, handed)
                    raise UpstreamError(
                        f"upstream certificate of {server_hostname} not trusted: "
                        f"{exc.verify_message}"
                    ) from exc
                except ssl.SSLError as exc:
                    _let_go(sock, handed)
                    raise UpstreamError(f"TLS with {server_hostname} failed: {exc}") from exc
                except UnicodeError as exc:  # the ssl module's IDNA check of the name
                    _let_go(sock, handed)
                    raise UpstreamError(
                        f"cannot verify {server_hostname[:80]!r}: not a valid host name"
                    ) from exc
                except OSError as exc:
                    _let_go(sock, handed)
                    if exc.errno in _LOCAL_SHORTAGE_ERRNOS:  # ENOBUFS...: ours, as above
                        raise Unavailable(
                            f"cannot open a connection: {exc.strerror}", retry_after_s=1
                        ) from exc
                    # The address's own fault (gone, unroutable) or the destination's.
                    failure = (
                        EgressFailure
                        if exc.errno in _EGRESS_ERRNOS
                        else EgressUnreachable
                        if exc.errno in _UNREACHABLE_ERRNOS
                        else EgressRefused
                        if exc.errno == errno.ECONNRESET
                        else UpstreamError
                    )
                    last = failure(describe_connect_error(exc, egress.address, address, port))
                    last.__cause__ = exc
                    continue
                except BaseException:  # cancelled: the timeout, or the client gone
                    _let_go(sock, handed)
                    raise
                return UpstreamConnection(stream=stream, key=key, egress=egress, remote=address)
    except TimeoutError as exc:
        raise EgressTimeout(
            f"connecting to {key[2]}:{port} from {egress.address} timed out after {timeout_s:g} s"
        ) from exc
    assert last is not None
    raise last


def _let_go(sock: socket.socket, handed: bool) -> None:
    """Give up a socket whose connection failed. Once handed to uvloop's
    create_connection, the descriptor is its transport's, which closes it on any
    failure (at once, or a loop turn later when cancelled): closing it again here, or
    the socket object's finalizer doing so, would close whatever connection took the
    number meanwhile (a retry from another address got EBADF)."""
    if handed:
        sock.detach()
    else:
        sock.close()


def _bound_socket(egress: Egress) -> socket.socket:
    sock = socket.socket(egress.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # not Linux: bind() then picks the port, which only costs ports
        sock.bind((egress.address, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def describe_connect_error(exc: OSError, source: str, address: str, port: int) -> str:
    """A reason a person can read for a failed connect from `source` to address:port."""
    where = f"{bracketed(address)}:{port}"
    if exc.errno == errno.ECONNREFUSED:
        return f"connection refused by {where}"
    if exc.errno == errno.ECONNRESET:
        return f"connection reset by {where}"
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"{where} is unreachable from {source}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot send from {source}: this host does not own it"
    if exc.errno == errno.EINVAL and ipaddress.ip_address(source).is_loopback:
        return f"a loopback address cannot reach {where}"
    if exc.errno == errno.ETIMEDOUT:
        return f"connecting to {where} timed out"
    return f"cannot connect to {where}: {exc.strerror or exc}"
