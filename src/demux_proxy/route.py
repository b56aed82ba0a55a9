"""Where a request goes: the request-target (RFC 9112 section 3.2) turned into a Route."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

import httptools

from demux_proxy.errors import ProtocolError

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_WS_SCHEMES: Final = {"ws": "http", "wss": "https"}
_BAD_HOST: Final = re.compile(r"[ /\\@?#%\t]")
# A Host field a tunnel's request may carry: a name or IP literal, an optional port.
_HOST_FIELD: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{0,5})?")


@dataclass(frozen=True, slots=True)
class Tunnel:
    """What a CONNECT established: every request inside goes to this host and port."""

    scheme: str  # "https" when the client spoke TLS inside, else "http"
    host: str
    port: int
    tls_name: str  # the name the client asked for in SNI, else the CONNECT host
    session: str | None = None  # sticky session named on CONNECT (user name, header)
    pin: str | None = None  # X-Demux-Egress sent on CONNECT: every request inside

    @property
    def host_field(self) -> bytes:
        """The Host of a request inside that has none (HTTP/1.0): the name asked for."""
        return authority(self.tls_name, self.port, DEFAULT_PORTS[self.scheme]).encode()


# Not frozen: a frozen dataclass pays an object.__setattr__ per field (about 1 us for a
# Route, per request); nothing changes a Route once made. The __init__ is written out:
# the compiled module runs it natively, a dataclass-generated one is interpreted.
@dataclass(slots=True, init=False)
class Route:
    scheme: str
    host: str  # lower-case name or bare IP literal (no brackets)
    port: int
    target: bytes  # origin-form sent upstream
    host_header: bytes | None  # replaces Host (absolute-form, RFC 9112 3.2.2), else None
    tls_name: str  # server name to verify upstream
    session: str | None
    pin: str | None
    # For the two log lines of every request: formatted once, here.
    url: str = field(repr=False, compare=False)

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        target: bytes,
        host_header: bytes | None,
        tls_name: str,
        session: str | None = None,  # sticky session inherited from the tunnel
        pin: str | None = None,  # an address pinned for the whole tunnel
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.target = target
        self.host_header = host_header
        self.tls_name = tls_name
        self.session = session
        self.pin = pin
        # The asterisk-form is the absolute form without a path (RFC 9112 3.2.4): the
        # URL logged is that one, not "http://host:port*".
        path = target.decode("latin-1") if target != b"*" else ""
        self.url = f"{scheme}://{bracketed(host)}:{port}{path}"


def bracketed(host: str) -> str:
    """A host as a URL's authority holds it: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def authority(host: str, port: int, default_port: int) -> str:
    """`host[:port]` as a Host field or URL shows it: the port only where not the default."""
    shown = bracketed(host)
    return shown if port == default_port else f"{shown}:{port}"


def tls_name(host: str) -> str:
    """The name SNI carries and an upstream's certificate is verified against: a fully
    qualified "a.test." is "a.test" there (RFC 6066 3; certificates name hosts without
    the dot, and OpenSSL's host check does not match a name that has one)."""
    return host[:-1] if len(host) > 1 and host.endswith(".") else host


def _host(raw: bytes) -> str:
    """A target's host, lower-case; an IPv6 literal canonical, and an IPv4-mapped one as
    its IPv4 (what the kernel connects to), so that budgets, cooldowns, the pool and the
    logs know one destination by one name ("fd00:6:0::2" is "fd00:6::2")."""
    try:
        host = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise ProtocolError("non-ASCII host in request target") from None
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host or _BAD_HOST.search(host):
        if "@" in host:  # userinfo (CONNECT user:password@host): not echoed, nor logged
            raise ProtocolError("userinfo in request target: not allowed")
        raise ProtocolError(f"invalid host in request target: {host[:64]!r}")
    if bracketed or ":" in host:  # brackets hold an IPv6 address, nothing else (RFC 3986)
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ProtocolError(f"invalid IPv6 address in request target: {host[:64]!r}") from None
        host = str(ip.ipv4_mapped or ip)
    return host


def parse_authority(target: bytes) -> tuple[str, int]:
    """CONNECT's authority-form `host:port` (RFC 9112 3.2.3); the port is required."""
    host, sep, port = target.rpartition(b":")
    if not sep or not port.isdigit():
        raise ProtocolError("CONNECT target must be host:port")
    if b":" in host and not (host.startswith(b"[") and host.endswith(b"]")):
        # "fd00::2:8080" may be fd00::2 port 8080 or fd00::2:8080 with no port.
        raise ProtocolError("CONNECT target: an IPv6 address goes in brackets, [address]:port")
    # 1-65535: port 0 is reserved (RFC 6335 6), nothing listens there. Leading zeros are
    # allowed (RFC 3986 3.2.3), and int() of over 4300 digits would raise ValueError.
    digits = port.lstrip(b"0")
    if not digits or len(digits) > 5 or int(digits) > 65535:
        raise ProtocolError("invalid port in CONNECT target")
    return _host(host), int(digits)


def _origin(path: bytes | None, query: bytes | None) -> bytes:
    target = path or b"/"
    if query is not None:
        target += b"?" + query
    return target


def check_host_field(host: bytes | None, version: bytes) -> None:
    """RFC 9112 3.2, for a request inside a tunnel, where the proxy is the server: a 1.1
    request has a Host field, and it is a valid one (a list of names, or a name with
    spaces, would reach the upstream unjudged by the name rules). More than one is
    refused by the parser, in and out of tunnels. Raises ProtocolError."""
    if host is None:
        if version == b"1.1":
            raise ProtocolError("HTTP/1.1 request without a Host field")
    elif not _HOST_FIELD.fullmatch(host):
        raise ProtocolError(f"invalid Host field: {host[:64]!r}")


def route_for(target: bytes, tunnel: Tunnel | None, options: bool = False) -> Route:
    """The Route of a request: absolute-form outside a tunnel, origin-form inside one.

    `options`: an OPTIONS request, whose asterisk-form ("*") a tunnel passes on, and
    whose absolute-form without path or query goes on as "*" (RFC 9112 3.2.4).
    """
    if tunnel is not None:
        host_header: bytes | None = None
        if target.startswith(b"/") or (options and target == b"*"):
            cut = target.find(b"#")  # RFC 9112 3.2.1: no fragment in a request-target
            origin = target if cut < 0 else target[:cut]
        else:  # absolute-form is allowed too, and its authority is the Host (3.2.2)
            scheme, host, port, path, query = _parsed(target)
            if scheme == "https" and tunnel.scheme == "http":
                # A plain tunnel carries it in clear text to whatever listens there.
                raise ProtocolError("https request target inside a tunnel without TLS")
            origin = _origin(path, query)
            host_header = authority(host, port, DEFAULT_PORTS[scheme]).encode()
        return Route(
            tunnel.scheme,
            tunnel.host,
            tunnel.port,
            origin,
            host_header,
            tunnel.tls_name,
            tunnel.session,
            tunnel.pin,
        )
    if target.startswith(b"/") or target == b"*":
        raise ProtocolError(
            "this is a proxy: send requests in absolute form (GET http://host/path)"
        )
    # A crawler sends request after request to the same few origins: the part of an
    # absolute-form target before its path ("http://host:port") is parsed once, and
    # later targets with the same prefix reuse what parsing it found.
    path_at = _path_start(target)
    if path_at > 0:
        known = _ORIGINS.get(target[:path_at])
        if known is not None:
            return Route(known[0], known[1], known[2], target[path_at:], known[3], known[4])
    scheme, host, port, path, query = _parsed(target)
    host_header = authority(host, port, DEFAULT_PORTS[scheme]).encode()
    name = tls_name(host)
    if options and not path and query is None:
        return Route(scheme, host, port, b"*", host_header, name)
    origin = _origin(path, query)
    if path_at > 0 and target[path_at:] == origin:
        # Only a prefix whose parse left the rest of the target as the origin-form
        # (no userinfo trick, no fragment) is remembered. A full memo starts over.
        if len(_ORIGINS) >= _ORIGINS_MAX:
            _ORIGINS.clear()
        _ORIGINS[target[:path_at]] = (scheme, host, port, host_header, name)
    return Route(scheme, host, port, origin, host_header, name)


# "http://host:port" prefix -> (scheme, host, port, Host header, TLS name): see route_for.
# Bounded, and holds only what parsing that prefix again would give.
_ORIGINS: Final[dict[bytes, tuple[str, str, int, bytes, str]]] = {}
_ORIGINS_MAX: Final = 4096


def _path_start(target: bytes) -> int:
    """Where the path of an http(s) absolute-form target starts; -1 when it has no path,
    its authority holds "?", or it holds "#" anywhere (those take the full parse).

    One pass of compiled byte indexing: bytes.find or `in` would each cost more than the
    whole loop does for a usual target (method calls with boxed arguments; `in` first
    tries its argument as an int).
    """
    if target.startswith(b"http://"):
        i = 7
    elif target.startswith(b"https://"):
        i = 8
    else:
        return -1
    path_at = -1
    n = len(target)
    while i < n:
        c = target[i]
        if c == 0x23:  # "#"
            return -1
        if path_at < 0:
            if c == 0x2F:  # "/"
                path_at = i
            elif c == 0x3F:  # "?"
                return -1
        i += 1
    return path_at


class _URL(Protocol):
    """What httptools.parse_url returns. Its stub says bytes for every part; absent parts
    are None (the compiled module checks values against their declared types)."""

    schema: bytes | None
    host: bytes | None
    port: int | None
    path: bytes | None
    query: bytes | None


# An authority ending in ":" (an empty port: port = *DIGIT, RFC 3986 3.2.3), which
# llhttp refuses; it means the scheme's default (RFC 9110 4.2.3).
_EMPTY_PORT: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(:)(?:[/?#]|$)")


def _parse_url(target: bytes) -> _URL:
    try:
        return cast(_URL, httptools.parse_url(target))
    except httptools.HttpParserInvalidURLError:
        pass
    empty = _EMPTY_PORT.match(target)
    if empty is not None:
        try:  # once: "host::" is no port either
            return cast(
                _URL, httptools.parse_url(target[: empty.start(1)] + target[empty.end(1) :])
            )
        except httptools.HttpParserInvalidURLError:
            pass
    raise ProtocolError("invalid request target")


def _parsed(target: bytes) -> tuple[str, str, int, bytes | None, bytes | None]:
    url = _parse_url(target)
    scheme = (url.schema or b"").decode("ascii", "replace").lower()
    # Some clients (aiohttp) send WebSocket URLs as they are: ws is http, wss is https.
    scheme = _WS_SCHEMES.get(scheme, scheme)
    if scheme not in DEFAULT_PORTS:
        raise ProtocolError(f"unsupported scheme {scheme!r}: only http and https are proxied")
    if not url.host:
        raise ProtocolError("request target has no host")
    host = _host(url.host)
    port = url.port
    if port is None:
        port = DEFAULT_PORTS[scheme]
    elif not 0 < port < 65536:
        # ":0" is 0 here, not None (no port): reserved (RFC 6335 6), never the default.
        raise ProtocolError(f"invalid port {port} in request target")
    return scheme, host, port, url.path, url.query


def is_ip_literal(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False
