"""May we connect to this address? Pure functions, applied to the address actually dialled.

The original tool resolved a name, checked the answer, then let the HTTP client resolve
it again: a DNS answer that changes between the two (rebinding) walked past the check.
Here the check runs on the very sockaddr handed to connect(), so there is no second
lookup to race.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

from demux_proxy.errors import ConfigError, Forbidden, LoopDetected

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# IPv6 prefixes that deliver to the IPv4 address embedded in them (NAT64 through a
# translator, SIIT, the deprecated IPv4-compatible form, 6to4): the IPv4 address at `shift`
# bits is where the packets end up, so it is judged too. Python's tables call most of these
# global (and 2002::/16 private or not depending on the version).
_EMBEDDINGS: tuple[tuple[ipaddress.IPv6Network, int, str], ...] = (
    (ipaddress.IPv6Network("64:ff9b::/96"), 0, "a NAT64"),  # RFC 6052, what DNS64 returns
    (ipaddress.IPv6Network("::ffff:0:0:0/96"), 0, "an IPv4-translated"),  # RFC 6145
    (ipaddress.IPv6Network("::/96"), 0, "an IPv4-compatible"),  # RFC 4291, deprecated
    (ipaddress.IPv6Network("2002::/16"), 80, "a 6to4"),  # RFC 3056
)
# The translator's own mapping (RFC 8215): which IPv4 address it reaches cannot be known.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _parse(address: str) -> tuple[IPAddress, ipaddress.IPv4Address | None, str]:
    """The address to judge, plus the IPv4 address it delivers to and how, if it embeds one.

    IPv4-mapped IPv6 is returned as its IPv4 alone: the kernel connects to that IPv4
    address itself, and ::ffff:0:0/96 as a whole is "private" to Python.
    """
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return ip, None, ""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, None, ""
    if int(ip) <= 1:  # :: and ::1 are themselves, not IPv4-compatible 0.0.0.0 and 0.0.0.1
        return ip, None, ""
    for net, shift, kind in _EMBEDDINGS:
        if ip in net:
            return ip, ipaddress.IPv4Address((int(ip) >> shift) & 0xFFFFFFFF), kind
    return ip, None, ""


_UNSPECIFIED: Final = "the unspecified address"


def _judge(ip: IPAddress) -> str | None:
    """Why one address, taken as itself, is refused by default, or None."""
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if ip.is_unspecified:
        return _UNSPECIFIED
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv6Address):
        # Explicit, so as not to depend on the Python version's tables.
        if ip in _NAT64_LOCAL:
            return "a NAT64 local-use address (the IPv4 address behind it cannot be known)"
        if ip.is_site_local:
            return "a site-local address (deprecated private IPv6 space)"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _refusal(ip: IPAddress, inner: ipaddress.IPv4Address | None, kind: str) -> str | None:
    """Refused if the embedded IPv4 address is, else if the address itself is: never looser."""
    if inner is not None:
        why = _judge(inner)
        if why is not None:
            where = f"{inner} inside {kind} address"
            if why.endswith(")"):  # one parenthesis, not two side by side
                return f"{why[:-1]}; {where})"
            return f"{why} ({where})"
    return _judge(ip)


def refusal(address: str) -> str | None:
    """Why `address` is refused as a destination by default, or None when it is public.

    Covers loopback, RFC 1918 and ULA private ranges, link-local (169.254.169.254 and
    fd00:ec2::254, the EC2 metadata service, are link-local and ULA), CGNAT, multicast,
    unspecified, site-local, NAT64 local-use and reserved space. IPv4-mapped IPv6 is
    judged as the IPv4 inside it; NAT64 (what DNS64 synthesises on an IPv6-only host),
    SIIT, IPv4-compatible and 6to4 addresses are refused when the IPv4 inside is.
    """
    ip, inner, kind = _parse(address)
    return _refusal(ip, inner, kind)


def _rule(text: str) -> tuple[str | None, ipaddress.IPv4Network | ipaddress.IPv6Network | None]:
    """A --deny/--allow-dest rule: a CIDR (or one address), else a host name pattern."""
    text = text.strip().lower().rstrip(".")
    try:
        return None, ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if not name or any(c in name for c in " /:@*"):
        raise ConfigError(f"not a host name, *.domain or CIDR: {text!r}")
    if not name.isascii():  # clients send A-labels (xn--...): the rule must be one too
        import idna  # IDNA 2008 with UTS 46, as browsers and curl encode ("ß" stays)

        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ConfigError(f"not a valid international host name: {text!r}") from None
        text = "*." + name if wildcard else name
    return text, None


def _name_matches(host: str, patterns: frozenset[str]) -> str | None:
    host = host.lower().rstrip(".")
    if host in patterns:
        return host
    labels = host.split(".")
    for i in range(1, len(labels)):
        candidate = "*." + ".".join(labels[i:])
        if candidate in patterns:
            return candidate
    return None


def _field_host(value: bytes) -> str:
    """The host of a Host field ("name:port", "[v6]:port"), lower-case; "" if none."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else ""
    return text.partition(":")[0]


class DestinationPolicy:
    """Where requests may go: the default refusals, operator rules, and never to ourselves.

    - `--deny HOST|CIDR` always wins; `--allow-dest HOST|CIDR`, when given, admits only
      matching destinations, and an allowed CIDR admits private ranges in it too (an
      operator who names 10.1.2.0/24 means it), without opening the rest.
    - A request to the proxy's own listening address and port is a loop: 508.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        deny: Sequence[str] = (),
        allow_dest: Sequence[str] = (),
    ) -> None:
        self.allow_private = allow_private
        deny_rules = [_rule(r) for r in deny]
        allow_rules = [_rule(r) for r in allow_dest]
        self._deny_names = frozenset(n for n, _ in deny_rules if n)
        self._deny_nets = tuple(net for _, net in deny_rules if net)
        self._allow_names = frozenset(n for n, _ in allow_rules if n)
        self._allow_nets = tuple(net for _, net in allow_rules if net)
        self._restricted = bool(allow_rules)
        # Whether any rule names hosts: only then does each request's names need a look.
        self.names_ruled = bool(self._deny_names or self._allow_names)
        self._self: frozenset[str] = frozenset()
        self._self_port = -1

    def set_self(self, addresses: Iterable[str], port: int) -> None:
        """Called once the listener is bound: the port is only known then (`:0`)."""
        self._self = frozenset(addresses)
        self._self_port = port

    def check_name(self, host: str) -> None:
        """Decisions that need no DNS: raise Forbidden early for names ruled out."""
        pattern = _name_matches(host, self._deny_names)
        if pattern is not None:
            raise Forbidden(f"destination {host} is denied by --deny {pattern}")
        if self._restricted and not self._allow_nets and not self._allow_names_match(host):
            raise Forbidden(f"destination {host} is not allowed by --allow-dest")

    def check_request(self, host: str, tls_name: str, host_field: bytes | None) -> None:
        """The names a request carries besides its host meet the name rules too: the name
        the upstream's certificate is verified as (the client's SNI in a tunnel), and the
        Host field inside a tunnel (a server behind an allowed name may serve a denied
        one: domain fronting). Raises Forbidden, as `check_name` does."""
        if tls_name != host:
            self.check_name(tls_name)
        if host_field:
            name = _field_host(host_field)
            if name and name != host and name != tls_name:
                self.check_name(name)

    def _allow_names_match(self, host: str) -> bool:
        return _name_matches(host, self._allow_names) is not None

    def refusal(
        self, host: str, address: str, port: int, tls_name: str | None = None
    ) -> str | None:
        """Why connecting to `address` for `host` (verified as `tls_name`) is refused, or
        None. Raises on a loop."""
        ip, inner, kind = _parse(address)
        # Rules and the loop check see both forms: an IPv4 CIDR catches the IPv4 address a
        # NAT64 or 6to4 address delivers to, an IPv6 CIDR still matches the IPv6 form.
        forms: tuple[IPAddress, ...] = (ip,) if inner is None else (ip, inner)
        if ip.is_unspecified:
            # A connect to 0.0.0.0 or :: reaches this host (Linux takes it as the bound
            # source address or loopback): past --deny and the loop check, whatever
            # they say of loopback. Nothing legitimate names it: refused whatever the options.
            return f"{_UNSPECIFIED}, which reaches this host itself: never a destination"
        if port == self._self_port and any(str(a) in self._self or a.is_loopback for a in forms):
            raise LoopDetected(f"{host}:{port} is this proxy itself: refusing to loop")
        for net in self._deny_nets:
            if any(a in net for a in forms):
                return f"denied by --deny {net}"
        if self._restricted:
            if any(a in net for net in self._allow_nets for a in forms):
                return None
            if not self._allow_names_match(host) or (
                tls_name is not None and tls_name != host and not self._allow_names_match(tls_name)
            ):
                return "not allowed by --allow-dest"
        if self.allow_private:
            return None
        why = _refusal(ip, inner, kind)
        if why is not None:
            return f"{why}; start the proxy with --allow-private to allow it"
        return None
