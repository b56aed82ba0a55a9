"""May we connect to this address? Pure functions, applied to the address actually dialled.

The original tool resolved a name, checked the answer, then let the HTTP client resolve
it again: a DNS answer that changes between the two (rebinding) walked past the check.
Here the check runs on the very sockaddr handed to connect(), so there is no second
lookup to race.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def refusal(address: str) -> str | None:
    """Why `address` is refused as a destination by default, or None when it is public.

    Covers loopback, RFC 1918 and ULA private ranges, link-local (169.254.169.254 and
    fd00:ec2::254, the EC2 metadata service, are link-local and ULA), CGNAT, multicast,
    unspecified and reserved space; IPv4-mapped IPv6 is judged as the IPv4 inside it.
    """
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None
