"""Find and validate the local source addresses ("egresses") outgoing connections are bound to.

The proxy rotates through a list of local addresses and binds each upstream socket to the next
one.  This module builds that list, either from what the user named (``--egress`` addresses,
``--egress-interface`` interfaces) or by discovering the host's usable addresses with psutil.

Everything here is a pure function of its arguments and of the host's current interface table:
there is no module state, so callers can re-resolve at any time (e.g. on reload).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from demux_proxy.errors import ConfigError, HostNotReady

__all__ = [
    "Egress",
    "check_bindable",
    "discover",
    "interface_of",
    "parse_addresses",
    "resolve_egress",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Commas separate several addresses in one option value; whitespace is accepted as a separator
# too so that "127.0.0.2, 127.0.0.3" and shell-joined lists both work.
_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True, slots=True)
class Egress:
    """One local source address the proxy may bind outgoing connections to."""

    address: str  # normalised textual IP ("127.0.0.2", "2001:db8::1")
    interface: str  # interface name, or "" when no interface is known to carry it
    family: int  # socket.AF_INET or socket.AF_INET6

    def __str__(self) -> str:
        return self.address


def _split(values: Iterable[str]) -> list[str]:
    """Split option values on commas/whitespace, dropping empty items."""
    return [item for value in values for item in _SEPARATORS.split(value) if item]


def _parse_one(item: str) -> IPAddress:
    text = item
    # IPv6 is often written in brackets (as in URLs); accept "[2001:db8::1]" as well.
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"not an IP address: {item!r}") from None


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _unscoped(text: str) -> IPAddress | None:
    """Parse an address as psutil reports it, without the "%scope" suffix of link-local IPv6."""
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None


def parse_addresses(values: Iterable[str]) -> list[str]:
    """Parse ``--egress`` values into normalised, de-duplicated textual addresses.

    Each value may hold several addresses separated by commas (or whitespace); empty items are
    ignored and IPv6 may be bracketed.  Order of first appearance is kept, because it is the
    rotation order.  Raises ConfigError for anything that is not an IP address one can
    send from (not 0.0.0.0, ::, multicast or 255.255.255.255).
    """
    seen: dict[str, None] = {}  # dict as an ordered set
    for item in _split(values):
        ip = _parse_one(item)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an AF_INET6 socket bound to it reaches IPv4 alone
        # The kernel lets a socket bind these, but nothing leaves from them: it picks the
        # source itself, and logs and metrics would name an address never used.
        if ip.is_unspecified or ip.is_multicast or ip == _BROADCAST:
            kind = (
                "the unspecified address"
                if ip.is_unspecified
                else "a broadcast or multicast address"
            )
            raise ConfigError(f"cannot use egress address {ip}: {kind}, not a source address")
        seen.setdefault(str(ip), None)
    return list(seen)


_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


def _usable(ip: IPAddress, *, explicit: bool) -> bool:
    """Whether an interface address is worth sending from.

    Automatic discovery skips loopback and link-local addresses: they cannot reach anything
    off-host.  IPv6 must be globally routable (``is_global``), which also rules out ULA and
    documentation prefixes; link-local IPv6 is never used, as binding it needs a scope id.
    When the user names the interface they asked for its addresses, so its loopback (``lo``)
    and link-local IPv4 addresses are kept.
    """
    if ip.version == 6:
        return ip.is_global or (explicit and ip.is_loopback)
    return explicit or not (ip.is_loopback or ip.is_link_local)


# Linux's IPv6 address flags (include/uapi/linux/if_addr.h) that make an address no
# source for new connections: still in duplicate address detection (bind() fails with
# EADDRNOTAVAIL), found duplicate, or deprecated (its preferred lifetime ended: RFC 4862
# keeps it for connections that exist, not for new ones).
_IFA_F_DADFAILED: Final = 0x08
_IFA_F_DEPRECATED: Final = 0x20
_IFA_F_TENTATIVE: Final = 0x40
_NOT_A_SOURCE: Final = _IFA_F_DADFAILED | _IFA_F_DEPRECATED | _IFA_F_TENTATIVE
_IF_INET6: Final = "/proc/net/if_inet6"


def not_a_source(table: str) -> set[tuple[str, str]]:
    """(address, interface) of the IPv6 addresses in a /proc/net/if_inet6 `table` that
    are tentative, duplicate or deprecated: psutil lists them like any other."""
    found = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) != 6:
            continue
        hex_address, _, _, _, flags, name = fields
        try:
            if int(flags, 16) & _NOT_A_SOURCE:
                found.add((str(ipaddress.IPv6Address(int(hex_address, 16))), name))
        except ValueError:
            continue
    return found


def _ipv6_not_a_source() -> set[tuple[str, str]]:
    try:
        with open(_IF_INET6, encoding="ascii") as table:
            return not_a_source(table.read())
    except OSError:  # not Linux, or no IPv6: nothing to leave out
        return set()


def discover(interfaces: Sequence[str] = (), *, skipped: list[str] | None = None) -> list[Egress]:
    """Return the usable egress addresses of the host's interfaces.

    "Up" is psutil's ``isup``, i.e. RUNNING (administratively up *and* with carrier): an
    interface without link cannot carry traffic, so its addresses are not worth rotating to.

    With no ``interfaces``: every interface that is up, non-loopback IPv4 and global IPv6
    (not while tentative, nor duplicate or deprecated: `not_a_source`).
    With ``interfaces``: only those, including loopback addresses; an unknown or down interface
    is a ConfigError because the user asked for it by name, unless a ``skipped`` list is given
    (re-discovery: the interface's addresses drop out, its name goes in the list).  Interfaces
    are visited in name order (so the result is stable across runs) and addresses in the order
    psutil reports them.
    """
    import psutil  # here, not at the top: the serving process needs it only to re-discover

    addrs = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    explicit = bool(interfaces)
    if explicit:
        names = []
        for name in sorted(set(_split(interfaces))):
            if name not in addrs and name not in stats:
                problem = f"no such interface: {name!r}"
            elif name not in stats or not stats[name].isup:
                problem = f"interface {name!r} is down (not up and running)"
            else:
                names.append(name)
                continue
            if skipped is None:
                raise HostNotReady(problem)  # at boot, it may not be there yet
            skipped.append(name)
    else:
        names = sorted(name for name, st in stats.items() if st.isup)

    unready = _ipv6_not_a_source()
    found: dict[str, Egress] = {}  # keyed by address: one address on two interfaces counts once
    for name in names:
        for snic in addrs.get(name, []):
            if snic.family not in (socket.AF_INET, socket.AF_INET6):
                continue  # AF_PACKET (MAC addresses) and the like
            ip = _unscoped(snic.address)
            if ip is None or not _usable(ip, explicit=explicit):
                continue
            if ip.version == 6 and (str(ip), name) in unready:
                continue  # re-discovery takes it once detection ends
            found.setdefault(str(ip), Egress(str(ip), name, _family(ip)))
    return list(found.values())


def interface_of(address: str) -> str:
    """Name the interface carrying ``address``, or "" when none does.

    An exact match wins.  Otherwise a loopback address is attributed to the interface whose
    loopback network contains it: Linux answers for all of 127.0.0.0/8 because ``lo`` carries
    127.0.0.1/8, although only 127.0.0.1 is listed.
    """
    import psutil

    ip = _parse_one(address.strip())
    addrs = psutil.net_if_addrs()
    for name in sorted(addrs):
        for snic in addrs[name]:
            if snic.family in (socket.AF_INET, socket.AF_INET6) and _unscoped(snic.address) == ip:
                return name
    if ip.is_loopback:
        for name in sorted(addrs):
            for snic in addrs[name]:
                own = _unscoped(snic.address)
                if own is None or own.version != ip.version or not own.is_loopback:
                    continue
                if not snic.netmask:
                    continue
                try:
                    net = ipaddress.ip_network(f"{own}/{snic.netmask}", strict=False)
                except ValueError:
                    continue
                if ip in net:
                    return name
    return ""


def check_bindable(address: str) -> None:
    """Raise ConfigError unless this host can send from ``address``.

    Rather than second-guessing routing tables, ask the kernel: bind a TCP socket to the address
    with an ephemeral port and close it again.  Nothing is sent.  This accepts exactly what
    connecting from the address later will accept (including all of 127.0.0.0/8 on Linux, and
    anything at all when net.ipv4.ip_nonlocal_bind is set).
    """
    ip = _parse_one(address.strip())
    try:
        with socket.socket(_family(ip), socket.SOCK_STREAM) as sock:
            sock.bind((str(ip), 0))
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno is not None else str(e)
        # Not on the host (yet: a secondary address the cloud's agent assigns after boot)
        # may change; anything else is the address itself.
        error = HostNotReady if e.errno == errno.EADDRNOTAVAIL else ConfigError
        raise error(
            f"cannot use egress address {ip}: {reason} (this host does not own it)"
        ) from None


def resolve_egress(
    addresses: Sequence[str], interfaces: Sequence[str], *, skipped: list[str] | None = None
) -> list[Egress]:
    """Build the rotation list from ``--egress`` and ``--egress-interface``.

    Named addresses come first (in the order given, each checked with check_bindable), then every
    address of the named interfaces.  With neither, the host's addresses are discovered.  The
    result is de-duplicated by address; an empty result is a ConfigError, since a proxy with
    nothing to rotate through cannot do its job. ``skipped``: see `discover`.
    """
    named = parse_addresses(addresses)
    ifaces = list(dict.fromkeys(_split(interfaces)))

    result: dict[str, Egress] = {}
    for addr in named:
        check_bindable(addr)
        ip = ipaddress.ip_address(addr)
        result.setdefault(addr, Egress(addr, interface_of(addr), _family(ip)))
    if ifaces:
        for egress in discover(ifaces, skipped=skipped):
            result.setdefault(egress.address, egress)
    if not named and not ifaces:
        for egress in discover():
            result.setdefault(egress.address, egress)

    if not result:
        if ifaces:
            searched = f"interface(s) {', '.join(map(repr, ifaces))} carry no IPv4 or global IPv6"
        else:
            searched = "no interface that is up carries a non-loopback IPv4 or a global IPv6"
        raise HostNotReady(
            f"no usable egress address: {searched} address; name one with --egress ADDRESS "
            "(e.g. --egress 127.0.0.2 for local testing)"
        )
    return list(result.values())
