"""`demux-proxy check`, the probe: one HTTP/1.1 GET per egress address, bound to it."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from demux_proxy import __version__
from demux_proxy.egress import Egress
from demux_proxy.errors import ConfigError, DemuxError, ProxyError
from demux_proxy.http1.framing import response_decoder
from demux_proxy.http1.parser import find_head_end, parse_response_head, response_has_body
from demux_proxy.route import authority
from demux_proxy.upstream import FAMILY_NAME, NO_ADDRESS_ERRNOS, describe_connect_error

MAX_BODY_BYTES = 4096  # a checkip answer is one address; anything larger is not one
MAX_HEAD_BYTES = 64 * 1024


# ---------------------------------------------------------------------------------------------
# The probe: one GET per egress address.


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    scheme: str  # "http" or "https"
    host: str  # without brackets
    port: int
    path: str  # origin-form, with the query
    authority: str  # the Host header

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_target(url: str) -> Target:
    """Split a checkip URL; ConfigError unless it is an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid --url {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"invalid --url {url!r}: only http:// and https:// URLs can be probed")
    host = parts.hostname
    if not host:
        raise ConfigError(f"invalid --url {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"invalid --url {url!r}: credentials in the URL are not supported")
    default = 443 if scheme == "https" else 80
    host_field = authority(host, default if port is None else port, default)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url.strip(), scheme, host, port or default, path, host_field)


def resolve_target(target: Target, families: Sequence[int]) -> dict[int, list[str] | str]:
    """Addresses of the URL's host per address family, or why there are none (a string).

    An empty list: the host has no address of that family but has one of another (an IP
    literal of the other family, a name with only A or only AAAA records), so addresses of
    that family cannot be checked against it, which is not their fault. A name that
    resolves in no family stays an error for every family.
    """
    wanted = list(dict.fromkeys(families))
    literal = _literal(target.host)
    if literal is not None:
        family, address = literal
        return {f: [address] if f == family else [] for f in wanted}
    found: dict[int, list[str] | socket.gaierror] = {}

    def lookup(family: int) -> list[str] | socket.gaierror:
        if family not in found:
            try:
                infos = socket.getaddrinfo(target.host, target.port, family, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                found[family] = exc
            else:
                found[family] = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return found[family]

    out: dict[int, list[str] | str] = {}
    for family in wanted:
        got = lookup(family)
        if isinstance(got, list):
            out[family] = got
        elif got.errno in NO_ADDRESS_ERRNOS and any(
            isinstance(lookup(other), list) for other in FAMILY_NAME if other != family
        ):
            out[family] = []  # the name is fine: it has addresses, none of this family
        else:
            kind = FAMILY_NAME.get(family, "IPv4")
            out[family] = f"cannot resolve {target.host} to an {kind} address: {got.strerror}"
    return out


def _literal(host: str) -> tuple[int, str] | None:
    """An IP literal's family and address; ::ffff:a.b.c.d is a.b.c.d, reached over IPv4."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return socket.AF_INET, str(ip.ipv4_mapped)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), host


def not_checked_reason(target: Target, family: int) -> str:
    """Why an address of ``family`` is not probed when the URL's host has none of it."""
    kind = FAMILY_NAME.get(family, "IPv4")
    other = "IPv4" if family == socket.AF_INET6 else "IPv6"  # what resolve_target found
    if _literal(target.host) is not None:
        return f"the URL has no {kind} address ({target.host} is an {other} address)"
    return f"the URL has no {kind} address ({target.host} has only {other} addresses)"


@dataclass(frozen=True, slots=True)
class Probe:
    public: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    not_checked: str | None = None  # why it was not probed (not a failure)


class _ProbeError(DemuxError):
    pass


def _request(target: Target) -> bytes:
    return (
        f"GET {target.path} HTTP/1.1\r\n"
        f"Host: {target.authority}\r\n"
        f"User-Agent: demux-proxy-check/{__version__}\r\n"
        "Accept: text/plain, */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii", "strict")


async def _open(
    egress: Egress, target: Target, addresses: Sequence[str], tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    last = ""
    for address in addresses:
        try:
            return await asyncio.open_connection(
                address,
                target.port,
                family=egress.family,
                local_addr=(egress.address, 0),
                ssl=tls,
                server_hostname=target.host if tls is not None else None,
            )
        except ssl.SSLCertVerificationError as exc:
            raise _ProbeError(
                f"certificate of {target.host} not trusted: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            raise _ProbeError(f"TLS with {target.host} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            last = describe_connect_error(exc, egress.address, address, target.port)
    raise _ProbeError(last or f"no address to connect to for {target.host}")


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    """Read one response (skipping 1xx) and return its body; _ProbeError unless 200."""
    buf = bytearray()
    while True:
        end = find_head_end(buf, MAX_HEAD_BYTES, request=False)
        if end < 0:
            data = await reader.read(65536)
            if not data:
                raise _ProbeError("the server closed the connection without answering")
            buf += data
            continue
        head = parse_response_head(bytes(buf[:end]))
        del buf[:end]
        if 100 <= head.status < 200 and head.status != 101:
            continue  # interim response
        break
    decoder = response_decoder(
        response_has_body(b"GET", head.status), head.content_length, head.chunked
    )
    body = bytearray()
    while not decoder.done:
        piece = decoder.read(buf)
        if piece:
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise _ProbeError(f"the answer is longer than {MAX_BODY_BYTES} bytes")
            continue
        if decoder.done:
            break
        data = await reader.read(65536)
        if not data:
            decoder.eof()  # ends a close-delimited body, raises for a truncated one
            break
        buf += data
    if head.status != 200:
        reason = head.reason.decode("latin-1").strip()
        raise _ProbeError(f"HTTP {head.status} {reason}".rstrip())
    return bytes(body)


def _public_address(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise _ProbeError(f"the answer is not an IP address: {shown!r}") from None


async def probe(
    egress: Egress,
    target: Target,
    addresses: Sequence[str] | str,
    tls: ssl.SSLContext | None,
    timeout_s: float,
) -> Probe:
    """One GET from ``egress``; the stripped body is the public address seen."""
    if isinstance(addresses, str):
        return Probe(error=addresses)
    if not addresses:
        return Probe(not_checked=not_checked_reason(target, egress.family))
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await _open(egress, target, addresses, tls)
            writer.write(_request(target))
            await writer.drain()
            body = await _read_answer(reader)
        latency = (time.perf_counter() - started) * 1000.0
        return Probe(public=_public_address(body), latency_ms=latency)
    except TimeoutError:
        return Probe(error=f"no answer within {timeout_s:g} s")
    except _ProbeError as exc:
        return Probe(error=str(exc))
    except ProxyError as exc:  # malformed HTTP from the parser or the body framing
        return Probe(error=exc.reason)
    except ssl.SSLError as exc:
        return Probe(error=f"TLS with {target.host} failed: {exc.reason or exc}")
    except OSError as exc:
        return Probe(error=f"connection to {target.host} failed: {exc.strerror or exc}")
    finally:
        if writer is not None:
            # The whole answer is read (or abandoned): no need for a graceful TLS shutdown,
            # which could wait on a peer that never answers close_notify.
            writer.transport.abort()


async def run_probes(
    egresses: Sequence[Egress],
    target: Target,
    destinations: Mapping[int, list[str] | str],
    *,
    tls: ssl.SSLContext | None,
    timeout_s: float,
    concurrency: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[Probe]:
    """Probe every egress, at most ``concurrency`` at a time; results in ``egresses`` order."""
    limit = asyncio.Semaphore(max(1, concurrency))
    done = 0

    async def one(egress: Egress) -> Probe:
        nonlocal done
        addresses = destinations.get(egress.family, f"no address for {target.host}")
        async with limit:
            result = await probe(egress, target, addresses, tls, timeout_s)
        done += 1
        if progress is not None:
            progress(done, len(egresses))
        return result

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(e)) for e in egresses]
    return [t.result() for t in tasks]
