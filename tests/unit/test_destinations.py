"""DestinationPolicy: default refusals, --deny, --allow-dest, and loops to ourselves."""

from __future__ import annotations

import pytest

from demux_proxy.errors import ConfigError, Forbidden, LoopDetected
from demux_proxy.policy import DestinationPolicy, refusal


def test_defaults_refuse_private_and_say_how_to_allow() -> None:
    p = DestinationPolicy()
    why = p.refusal("metadata", "169.254.169.254", 80)
    assert why is not None and "--allow-private" in why
    assert p.refusal("example.com", "93.184.216.34", 443) is None
    assert DestinationPolicy(allow_private=True).refusal("x", "10.0.0.1", 80) is None


def test_deny_wins_over_everything() -> None:
    p = DestinationPolicy(
        allow_private=True, deny=["*.blocked.test", "93.184.0.0/16"], allow_dest=["0.0.0.0/0"]
    )
    with pytest.raises(Forbidden, match=r"\*\.blocked\.test"):
        p.check_name("a.b.blocked.test")
    p.check_name("blocked.test")  # *.domain does not cover the domain itself
    assert p.refusal("x", "93.184.216.34", 443) == "denied by --deny 93.184.0.0/16"


def test_allow_dest_admits_only_what_it_names() -> None:
    p = DestinationPolicy(allow_dest=["api.example.com", "10.1.2.0/24"])
    assert p.refusal("api.example.com", "93.184.216.34", 443) is None
    assert p.refusal("other.example.com", "93.184.216.34", 443) == "not allowed by --allow-dest"
    # An allowed CIDR admits the private range it names, not the rest of private space.
    assert p.refusal("intranet", "10.1.2.7", 80) is None
    why = p.refusal("api.example.com", "10.9.9.9", 80)
    assert why is not None and "private" in why
    names_only = DestinationPolicy(allow_dest=["api.example.com"])
    with pytest.raises(Forbidden):
        names_only.check_name("evil.test")


def test_a_request_to_the_proxy_itself_is_a_loop() -> None:
    p = DestinationPolicy(allow_private=True)
    p.set_self({"127.0.0.1"}, 8080)
    with pytest.raises(LoopDetected):
        p.refusal("127.0.0.1", "127.0.0.1", 8080)
    with pytest.raises(LoopDetected):
        p.refusal("localhost", "::ffff:127.0.0.1", 8080)
    assert p.refusal("127.0.0.1", "127.0.0.1", 8081) is None


@pytest.mark.parametrize("bad", ["", "a b", "http://x/", "*", "user@host"])
def test_bad_rules_are_refused_at_start(bad: str) -> None:
    with pytest.raises(ConfigError):
        DestinationPolicy(deny=[bad])


# IPv6 forms that deliver to an embedded IPv4 address: (address, reason, where it leads).
# 10.0.0.1 = a00:1, 127.0.0.1 = 7f00:1, 169.254.169.254 = a9fe:a9fe, 100.64.0.1 = 6440:1.
EMBEDDED_REFUSED = [
    (f"{prefix}{v6}", reason, f"{v4} inside {kind} address")
    for prefix, kind in [
        ("64:ff9b::", "a NAT64"),
        ("::ffff:0:", "an IPv4-translated"),
        ("::", "an IPv4-compatible"),
    ]
    for v6, v4, reason in [
        ("a00:1", "10.0.0.1", "a private address"),
        ("7f00:1", "127.0.0.1", "a loopback address"),
        ("a9fe:a9fe", "169.254.169.254", "link-local address (where cloud metadata"),
        ("6440:1", "100.64.0.1", "not a globally routable address"),
    ]
] + [
    ("2002:a00:1::", "a private address", "10.0.0.1 inside a 6to4 address"),
    ("2002:7f00:1::", "a loopback address", "127.0.0.1 inside a 6to4 address"),
    ("2002:a9fe:a9fe::", "link-local", "169.254.169.254 inside a 6to4 address"),
    ("2002:6440:1::", "not a globally routable", "100.64.0.1 inside a 6to4 address"),
]


@pytest.mark.parametrize(("address", "reason", "where"), EMBEDDED_REFUSED)
def test_ipv6_forms_that_reach_a_refused_ipv4_are_refused(
    address: str, reason: str, where: str
) -> None:
    why = DestinationPolicy().refusal("rebound.example", address, 443)
    assert why is not None
    assert reason in why and where in why and why.endswith("--allow-private to allow it")
    assert refusal(address) == why.split("; start the proxy")[0]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("64:ff9b:1::a00:1", "a NAT64 local-use address"),
        ("64:ff9b:1::5db8:d822", "a NAT64 local-use address"),  # whatever is inside
        ("fec0::1", "a site-local address"),
        ("feff::a00:1", "a site-local address"),
    ],
)
def test_nat64_local_use_and_site_local_are_refused(address: str, reason: str) -> None:
    why = DestinationPolicy().refusal("x", address, 443)
    assert why is not None and why.startswith(reason) and "--allow-private" in why


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::5db8:d822",  # 93.184.216.34 through NAT64: what DNS64 gives a public name
        "64:ff9b::93.184.216.34",
        "::ffff:0:5db8:d822",
        "::ffff:93.184.216.34",  # IPv4-mapped: judged as its IPv4 alone
    ],
)
def test_public_ipv4_behind_ipv6_stays_allowed(address: str) -> None:
    assert refusal(address) is None
    assert DestinationPolicy().refusal("example.com", address, 443) is None


@pytest.mark.parametrize(
    ("address", "message"),
    [("::", "the unspecified address"), ("::1", "a loopback address")],
)
def test_unspecified_and_loopback_ipv6_keep_their_own_messages(address: str, message: str) -> None:
    assert refusal(address) == message
    why = DestinationPolicy().refusal("x", address, 80)
    assert why is not None and why.startswith(message)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "::ffff:0.0.0.0"])
def test_the_unspecified_address_is_refused_whatever_the_options(address: str) -> None:
    """A connect to it reaches this host: it got past --deny 127.0.0.0/8 and the loop
    check with --allow-private."""
    p = DestinationPolicy(allow_private=True, deny=["127.0.0.0/8", "::1"], allow_dest=["::/0"])
    p.set_self({"127.0.0.1"}, 8080)
    for port in (80, 8080):
        why = p.refusal("0", address, port)
        assert why is not None and "never a destination" in why


def test_deny_catches_the_ipv4_inside_and_the_ipv6_form() -> None:
    p = DestinationPolicy(allow_private=True, deny=["10.0.0.0/8", "2002:5db8::/32"])
    assert p.refusal("x", "64:ff9b::a00:1", 80) == "denied by --deny 10.0.0.0/8"
    assert p.refusal("x", "2002:a01:203::1", 80) == "denied by --deny 10.0.0.0/8"
    assert p.refusal("x", "2002:5db8:d822::", 80) == "denied by --deny 2002:5db8::/32"
    assert p.refusal("x", "64:ff9b::5db8:d822", 80) is None


def test_allow_dest_admits_the_ipv4_it_names_behind_nat64_and_no_more() -> None:
    p = DestinationPolicy(allow_dest=["api.example.com", "10.1.2.0/24"])
    assert p.refusal("intranet", "64:ff9b::a01:207", 80) is None  # 10.1.2.7
    assert p.refusal("other", "64:ff9b::a09:909", 80) == "not allowed by --allow-dest"
    why = p.refusal("api.example.com", "64:ff9b::a09:909", 80)  # 10.9.9.9
    assert why is not None and "a private address (10.9.9.9 inside a NAT64 address)" in why
    # A rule written as an IPv6 CIDR still matches the IPv6 form.
    v6 = DestinationPolicy(allow_dest=["64:ff9b::a01:200/120"])
    assert v6.refusal("intranet", "64:ff9b::a01:207", 80) is None
    assert v6.refusal("intranet", "64:ff9b::a09:909", 80) == "not allowed by --allow-dest"


def test_a_nat64_or_6to4_address_of_the_proxy_itself_is_a_loop() -> None:
    p = DestinationPolicy(allow_private=True)
    p.set_self({"10.0.0.5"}, 8080)
    with pytest.raises(LoopDetected):
        p.refusal("self.example", "64:ff9b::a00:5", 8080)
    with pytest.raises(LoopDetected):
        p.refusal("self.example", "2002:a00:5::", 8080)
    assert p.refusal("self.example", "64:ff9b::a00:5", 8081) is None
