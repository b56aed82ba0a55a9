"""`demux-proxy check`, the route check: `ip route get DEST from SRC` through netlink."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from demux_proxy.check_report import RESERVED_TABLES, InterfaceRouting
from demux_proxy.egress import Egress

_RTN_LOCAL = 2  # rtm_type of a route to an address of this host
_IFF_LOOPBACK = 0x8  # ifi_flags bit of the loopback interface


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
            if route["dst_len"] == 0 and table not in RESERVED_TABLES and family == socket.AF_INET:
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
