"""`demux-proxy check`: does every egress address work, and does it show its own public address?

Three parts, kept apart so the judgement can be tested without a network:

* `evaluate` (pure): per-address results in, a `Report` out -- which addresses failed, which
  share a public address with another, which leave by an interface that does not own them,
  and the `ip rule` / `ip route` lines that would fix the last kind.
* `run_probes` (asyncio I/O): one HTTP/1.1 GET per egress address, on a socket bound to it;
  the response body (stripped) is the public address the far end saw.
* `inspect_routes` (netlink I/O through pyroute2): `ip route get DEST from SRC` for each
  address, plus what the fix lines need (routing tables in use, gateways, subnets).

The probe URL is the operator's own, so the destination policy (`policy.refusal`) does not
apply to it: checking against a server on a private network is legitimate here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from demux_proxy import __version__
from demux_proxy.egress import Egress
from demux_proxy.errors import ConfigError, DemuxError, ProxyError
from demux_proxy.http1.framing import response_decoder
from demux_proxy.http1.parser import find_head_end, parse_response_head, response_has_body
from demux_proxy.upstream import describe_connect_error

__all__ = [
    "DEFAULT_URL",
    "FAILED",
    "SHARED",
    "WRONG_ROUTE",
    "AddressResult",
    "InterfaceRouting",
    "Probe",
    "Report",
    "RouteCheck",
    "RouteInspection",
    "Row",
    "Target",
    "evaluate",
    "inspect_routes",
    "parse_target",
    "probe",
    "render_text",
    "resolve_target",
    "run_check",
    "run_probes",
]

DEFAULT_URL = "https://checkip.amazonaws.com"

FAILED = "failed"  # the request did not produce a public address: the address is unusable
SHARED = "shared"  # another egress address showed the same public address: it adds nothing
WRONG_ROUTE = "wrong-route"  # the kernel sends it out of another interface: unusable on a VPC

# Tables 100 + n for the n-th interface, as cloud-init numbers them on EC2 (100 + NIC index).
TABLE_BASE = 100
# Kernel-reserved tables: main, local, default (and "unspec").
_RESERVED_TABLES = frozenset({0, 253, 254, 255})
MAX_BODY_BYTES = 4096  # a checkip answer is one address; anything larger is not one
MAX_HEAD_BYTES = 64 * 1024
_RTN_LOCAL = 2  # rtm_type of a route to an address of this host
_IFF_LOOPBACK = 0x8  # ifi_flags bit of the loopback interface


# ---------------------------------------------------------------------------------------------
# Pure part: results in, verdicts and fix lines out.


@dataclass(frozen=True, slots=True)
class AddressResult:
    """Everything learnt about one egress address, as `evaluate` consumes it."""

    egress: Egress
    public: str | None = None  # the public address the checkip server saw
    error: str | None = None  # why no public address was obtained
    latency_ms: float | None = None  # connect to end of response
    route_device: str | None = None  # interface the kernel routes it out of; None: not checked
    route_note: str | None = None  # why the route was not checked


@dataclass(frozen=True, slots=True)
class InterfaceRouting:
    """What the host already has for an interface, for writing fix lines.

    ``table`` is a routing table that already holds a default route via this interface
    (as cloud agents create, 10000 + device number on Amazon Linux 2023); with one, only
    the `ip rule` is missing. ``gateway4``/``gateway6`` come from any route through the
    interface that names a gateway; ``subnet4`` (e.g. "10.0.1.0/24") is used to hint at the
    gateway when none is known.
    """

    table: int | None = None
    gateway4: str | None = None
    gateway6: str | None = None
    subnet4: str | None = None


@dataclass(frozen=True, slots=True)
class Row:
    result: AddressResult
    flags: tuple[str, ...] = ()
    shared_with: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Failed and wrong-route addresses are unusable; a shared one works, adding nothing."""
        return FAILED not in self.flags and WRONG_ROUTE not in self.flags

    @property
    def status(self) -> str:
        if not self.flags:
            return "ok"
        parts = []
        r = self.result
        if FAILED in self.flags:
            parts.append(f"FAILED: {r.error or 'no public address'}")
        if SHARED in self.flags:
            parts.append(f"SHARED with {', '.join(self.shared_with)}")
        if WRONG_ROUTE in self.flags:
            parts.append(f"WRONG ROUTE: leaves by {r.route_device}, not {r.egress.interface}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Report:
    rows: tuple[Row, ...]
    fix: tuple[str, ...] = ()  # shell lines (comments start with "#")
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every address is usable (the exit status of `check`)."""
        return all(row.usable for row in self.rows)

    def count(self, flag: str) -> int:
        return sum(flag in row.flags for row in self.rows)

    def summary(self) -> dict[str, int]:
        publics = {row.result.public for row in self.rows if row.result.public is not None}
        return {
            "addresses": len(self.rows),
            "ok": sum(not row.flags for row in self.rows),
            "usable": sum(row.usable for row in self.rows),
            "failed": self.count(FAILED),
            "shared": self.count(SHARED),
            "wrong_route": self.count(WRONG_ROUTE),
            "distinct_public_addresses": len(publics),
        }

    def to_json(self, url: str) -> dict[str, Any]:
        return {
            "url": url,
            "ok": self.ok,
            "summary": self.summary(),
            "addresses": [
                {
                    "interface": row.result.egress.interface or None,
                    "address": row.result.egress.address,
                    "public_address": row.result.public,
                    "latency_ms": (
                        None if row.result.latency_ms is None else round(row.result.latency_ms, 1)
                    ),
                    "usable": row.usable,
                    "flags": list(row.flags),
                    "status": row.status,
                    "error": row.result.error,
                    "shared_with": list(row.shared_with),
                    "route_device": row.result.route_device,
                    "route_note": row.result.route_note,
                }
                for row in self.rows
            ],
            "fix": list(self.fix),
            "notes": list(self.notes),
        }


def evaluate(
    results: Sequence[AddressResult],
    interfaces: Mapping[str, InterfaceRouting] | None = None,
    *,
    taken_tables: frozenset[int] = frozenset(),
) -> Report:
    """Flag each address and write the fix lines; rows keep the order of ``results``.

    * failed: no public address came back (an error, or none recorded);
    * shared: its public address was also seen from another egress address;
    * wrong-route: the kernel routes it out of an interface other than the one owning it.

    Each misrouted address gets ``ip rule add from ADDR lookup TABLE``; each interface with a
    misrouted address gets one ``ip route add default via GATEWAY dev IFACE table TABLE``,
    unless ``interfaces`` names a table that already routes through it. New tables are
    numbered 100 + the interface's position among all interfaces in ``results`` (skipping
    ``taken_tables``), so the primary interface would be 100 and the next 101, as cloud-init
    numbers them; GATEWAY stays literal when no gateway through the interface is known.
    """
    interfaces = interfaces or {}
    by_public: dict[str, list[str]] = {}
    for r in results:
        if r.public is not None and r.error is None:
            by_public.setdefault(r.public, []).append(r.egress.address)

    rows = []
    for r in results:
        flags = []
        shared: tuple[str, ...] = ()
        if r.public is None or r.error is not None:
            flags.append(FAILED)
        else:
            shared = tuple(a for a in by_public[r.public] if a != r.egress.address)
            if shared:
                flags.append(SHARED)
        if _misrouted(r):
            flags.append(WRONG_ROUTE)
        rows.append(Row(r, tuple(flags), shared))

    return Report(
        rows=tuple(rows),
        fix=tuple(_fix_lines(rows, interfaces, taken_tables)),
        notes=tuple(_notes(rows, interfaces)),
    )


def _misrouted(r: AddressResult) -> bool:
    return bool(r.route_device and r.egress.interface and r.route_device != r.egress.interface)


def _table_numbers(
    rows: Sequence[Row], interfaces: Mapping[str, InterfaceRouting], taken: frozenset[int]
) -> dict[str, int]:
    order = list(
        dict.fromkeys(row.result.egress.interface for row in rows if row.result.egress.interface)
    )
    used = set(taken) | {info.table for info in interfaces.values() if info.table is not None}
    tables: dict[str, int] = {}
    for position, name in enumerate(order):
        existing = interfaces.get(name, InterfaceRouting()).table
        if existing is not None:
            tables[name] = existing
            continue
        number = TABLE_BASE + position
        while number in used or number in _RESERVED_TABLES:
            number += 1
        used.add(number)
        tables[name] = number
    return tables


def _fix_lines(
    rows: Sequence[Row], interfaces: Mapping[str, InterfaceRouting], taken: frozenset[int]
) -> list[str]:
    wrong: dict[str, list[Egress]] = {}  # interface -> its misrouted addresses, in order
    for row in rows:
        if WRONG_ROUTE in row.flags:
            wrong.setdefault(row.result.egress.interface, []).append(row.result.egress)
    if not wrong:
        return []
    tables = _table_numbers(rows, interfaces, taken)
    lines: list[str] = []
    for name, egresses in wrong.items():
        info = interfaces.get(name, InterfaceRouting())
        table = tables[name]
        leaves = sorted({r.result.route_device or "?" for r in rows if r.result.egress in egresses})
        lines.append(
            f"# {name}: {len(egresses)} address(es) leave by {', '.join(leaves)}; "
            f"route them through table {table}"
        )
        families = list(dict.fromkeys(e.family for e in egresses))
        if info.table is None:
            for family in families:
                v6 = family == socket.AF_INET6
                gateway = (info.gateway6 if v6 else info.gateway4) or "GATEWAY"
                ip = "ip -6" if v6 else "ip"
                lines.append(f"{ip} route add default via {gateway} dev {name} table {table}")
        for e in egresses:
            ip = "ip -6" if e.family == socket.AF_INET6 else "ip"
            lines.append(f"{ip} rule add from {e.address} lookup {table}")
    return lines


def _notes(rows: Sequence[Row], interfaces: Mapping[str, InterfaceRouting]) -> list[str]:
    notes: list[str] = []
    skipped: dict[str, list[str]] = {}
    for row in rows:
        if row.result.route_note:
            skipped.setdefault(row.result.route_note, []).append(row.result.egress.address)
    for why, addresses in skipped.items():
        notes.append(f"route not checked for {_some(addresses)}: {why}")

    wrong_ifaces = list(
        dict.fromkeys(row.result.egress.interface for row in rows if WRONG_ROUTE in row.flags)
    )
    for name in wrong_ifaces:
        info = interfaces.get(name, InterfaceRouting())
        if info.table is not None or info.gateway4 is not None:
            continue
        if not any(
            row.result.egress.interface == name and row.result.egress.family == socket.AF_INET
            for row in rows
            if WRONG_ROUTE in row.flags
        ):
            continue
        hint = f"GATEWAY is the router of {name}'s subnet"
        if info.subnet4:
            net = ipaddress.ip_network(info.subnet4, strict=False)
            hint += f" {net} (in an AWS VPC its first host, {net.network_address + 1})"
        else:
            hint += " (in an AWS VPC, the first host of the subnet)"
        notes.append(hint)
    if wrong_ifaces:
        notes.append(
            "the fix lines last until reboot; docs/ec2.md shows how to make them persistent"
        )
    return notes


def _some(addresses: Sequence[str], limit: int = 6) -> str:
    if len(addresses) <= limit:
        return ", ".join(addresses)
    return f"{', '.join(addresses[:limit])} and {len(addresses) - limit} more"


def render_text(report: Report, url: str) -> str:
    """The report as a table with aligned columns, then a summary, fix lines and notes."""
    header = ("INTERFACE", "LOCAL ADDRESS", "PUBLIC ADDRESS", "LATENCY", "STATUS")
    table = [header]
    for row in report.rows:
        r = row.result
        if r.latency_ms is None:
            latency = "-"
        else:
            latency = f"{r.latency_ms:.{0 if r.latency_ms >= 10 else 1}f} ms"
        table.append(
            (r.egress.interface or "-", r.egress.address, r.public or "-", latency, row.status)
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    out = []
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)]
        cells[3] = line[3].rjust(widths[3])  # latency reads better right-aligned
        out.append("  ".join([*cells, line[-1]]).rstrip())

    s = report.summary()
    parts = [f"{s['ok']} ok"]
    if s["failed"]:
        parts.append(f"{s['failed']} failed")
    if s["wrong_route"]:
        parts.append(f"{s['wrong_route']} with a wrong route")
    if s["shared"]:
        parts.append(f"{s['shared']} sharing a public address")
    out.append("")
    out.append(
        f"{s['addresses']} address(es) checked against {url}: {', '.join(parts)}; "
        f"{s['distinct_public_addresses']} distinct public address(es)"
    )
    if report.fix:
        out.append("")
        out.append("To route each address out of its own interface (as root):")
        out.extend(f"  {line}" for line in report.fix)
    if report.notes:
        out.append("")
        out.extend(f"note: {note}" for note in report.notes)
    return "\n".join(out) + "\n"


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
    bracketed = f"[{host}]" if ":" in host else host
    authority = bracketed if port in (None, default) else f"{bracketed}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url.strip(), scheme, host, port or default, path, authority)


def resolve_target(target: Target, families: Sequence[int]) -> dict[int, list[str] | str]:
    """Addresses of the URL's host per address family, or why there are none (a string)."""
    out: dict[int, list[str] | str] = {}
    for family in dict.fromkeys(families):
        try:
            infos = socket.getaddrinfo(target.host, target.port, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
            out[family] = f"cannot resolve {target.host} to an {kind} address: {exc.strerror}"
            continue
        out[family] = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return out


@dataclass(frozen=True, slots=True)
class Probe:
    public: str | None = None
    error: str | None = None
    latency_ms: float | None = None


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


# ---------------------------------------------------------------------------------------------
# The route check: ask the kernel, through netlink.


@dataclass(frozen=True, slots=True)
class RouteCheck:
    device: str | None = None
    note: str | None = None


@dataclass
class RouteInspection:
    checks: dict[str, RouteCheck] = field(default_factory=dict)  # by egress address
    interfaces: dict[str, InterfaceRouting] = field(default_factory=dict)
    taken_tables: frozenset[int] = frozenset()


def inspect_routes(
    egresses: Sequence[Egress], destinations: Mapping[int, list[str] | str]
) -> RouteInspection:
    """`ip route get DEST from SRC` for every egress address, through pyroute2.

    Loopback addresses are not checked (they never leave the host); when netlink cannot
    answer (pyroute2 missing, not Linux, a restricted sandbox) every address gets a note
    instead of a verdict. Must not run inside an event loop.
    """
    try:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]
    except ImportError:
        why = "pyroute2 is not installed"
        return RouteInspection({e.address: RouteCheck(note=why) for e in egresses})
    try:
        with IPRoute() as ipr:
            return _inspect(ipr, egresses, destinations)
    except Exception as exc:  # netlink refused us as a whole: say so, do not crash the check
        why = f"the kernel's routing table could not be read ({exc})"
        return RouteInspection({e.address: RouteCheck(note=why) for e in egresses})


def _inspect(
    ipr: Any, egresses: Sequence[Egress], destinations: Mapping[int, list[str] | str]
) -> RouteInspection:
    names: dict[int, str] = {}
    loopback_links: set[str] = set()
    for link in ipr.get_links():
        name = str(link.get_attr("IFLA_IFNAME"))
        names[int(link["index"])] = name
        if int(link["flags"]) & _IFF_LOOPBACK:
            loopback_links.add(name)
    index_of = {name: index for index, name in names.items()}

    checks: dict[str, RouteCheck] = {}
    for e in egresses:
        if e.interface in loopback_links and not ipaddress.ip_address(e.address).is_loopback:
            # An address on lo (an anycast or service address) leaves by whichever
            # interface routes it: there is no owning interface to compare with.
            checks[e.address] = RouteCheck(note=f"addresses on {e.interface} have no own route")
            continue
        checks[e.address] = _route_of(ipr, e, destinations.get(e.family), names)

    gateways: dict[tuple[int, int], str] = {}  # (ifindex, family) -> a gateway through it
    default_tables: dict[int, int] = {}  # ifindex -> a non-main table with a default via it
    taken: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family):
            table = int(route.get_attr("RTA_TABLE") or route["table"])
            taken.add(table)
            oif = route.get_attr("RTA_OIF")
            gateway = route.get_attr("RTA_GATEWAY")
            if oif is None:
                continue
            if gateway is not None:
                is_default = route["dst_len"] == 0
                if is_default or (int(oif), family) not in gateways:
                    gateways[(int(oif), family)] = str(gateway)
            if route["dst_len"] == 0 and table not in _RESERVED_TABLES and family == socket.AF_INET:
                default_tables.setdefault(int(oif), table)

    subnets: dict[int, str] = {}
    for addr in ipr.get_addr(family=socket.AF_INET):
        index, prefix = int(addr["index"]), int(addr["prefixlen"])
        local = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
        if local is None or prefix >= 31:
            continue  # /32 secondaries (as Amazon Linux adds them) say nothing of the subnet
        net = ipaddress.ip_network(f"{local}/{prefix}", strict=False)
        known = subnets.get(index)
        if known is None or ipaddress.ip_network(known).prefixlen > prefix:
            subnets[index] = str(net)

    interfaces: dict[str, InterfaceRouting] = {}
    for name in dict.fromkeys(e.interface for e in egresses if e.interface):
        ifindex = index_of.get(name)
        if ifindex is None:
            continue
        interfaces[name] = InterfaceRouting(
            table=default_tables.get(ifindex),
            gateway4=gateways.get((ifindex, socket.AF_INET)),
            gateway6=gateways.get((ifindex, socket.AF_INET6)),
            subnet4=subnets.get(ifindex),
        )
    return RouteInspection(checks, interfaces, frozenset(taken))


def _route_of(
    ipr: Any, egress: Egress, destinations: list[str] | str | None, names: Mapping[int, str]
) -> RouteCheck:
    if ipaddress.ip_address(egress.address).is_loopback:
        return RouteCheck(note="loopback addresses never leave the host")
    if not egress.interface:
        return RouteCheck(note="no interface carries the address")
    if not destinations or isinstance(destinations, str):
        return RouteCheck(note="the URL's host has no address of this family to route to")
    destination = destinations[0]
    try:
        answer = ipr.route("get", dst=destination, src=egress.address)
    except Exception as exc:  # NetlinkError: e.g. no route at all, or a refused source
        return RouteCheck(note=f"the kernel has no route from it to {destination} ({exc})")
    if not answer:
        return RouteCheck(note=f"the kernel has no route from it to {destination}")
    route = answer[0]
    if route["type"] == _RTN_LOCAL:
        return RouteCheck(note=f"{destination} is an address of this host")
    oif = route.get_attr("RTA_OIF")
    if oif is None:
        return RouteCheck(note=f"the route to {destination} names no interface")
    return RouteCheck(device=names.get(int(oif), f"#{oif}"))


# ---------------------------------------------------------------------------------------------
# All together.


def run_check(
    egresses: Sequence[Egress],
    url: str,
    *,
    tls: ssl.SSLContext | None,
    timeout_s: float = 10.0,
    concurrency: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Probe every egress address, check its route, and judge. ConfigError for a bad URL."""
    target = parse_target(url)
    destinations = resolve_target(target, [e.family for e in egresses])
    routes = inspect_routes(egresses, destinations)  # before the loop: pyroute2 is blocking
    probes = asyncio.run(
        run_probes(
            egresses,
            target,
            destinations,
            tls=tls if target.tls else None,
            timeout_s=timeout_s,
            concurrency=concurrency,
            progress=progress,
        )
    )
    results = []
    for egress, p in zip(egresses, probes, strict=True):
        route = routes.checks.get(egress.address, RouteCheck())
        results.append(
            AddressResult(
                egress=egress,
                public=p.public,
                error=p.error,
                latency_ms=p.latency_ms,
                route_device=route.device,
                route_note=route.note,
            )
        )
    return evaluate(results, routes.interfaces, taken_tables=routes.taken_tables)
