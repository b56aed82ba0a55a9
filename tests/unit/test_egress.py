"""Unit tests for demux_proxy.egress: parsing, bind checks and discovery filters."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

from demux_proxy.egress import (
    Egress,
    check_bindable,
    discover,
    interface_of,
    not_a_source,
    parse_addresses,
    resolve_egress,
)
from demux_proxy.errors import ConfigError

# --- parse_addresses -------------------------------------------------------------------------


def test_parse_commas_whitespace_and_empty_items() -> None:
    assert parse_addresses(["127.0.0.2,127.0.0.3", " 127.0.0.4 , ,", "", "127.0.0.5"]) == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
    ]


def test_parse_brackets_and_normalisation() -> None:
    assert parse_addresses(["[2001:DB8:0:0::1]", "2001:db8::2"]) == ["2001:db8::1", "2001:db8::2"]
    # An IPv4-mapped address was an IPv6 egress that reached IPv4 alone (a 502 for an
    # IPv6 host, every second request to a dual-stack one): it is its IPv4.
    assert parse_addresses(["::ffff:192.0.2.2", "192.0.2.2", "[::FFFF:c000:203]"]) == [
        "192.0.2.2",
        "192.0.2.3",
    ]


def test_parse_deduplicates_keeping_first_order() -> None:
    values = ["127.0.0.3,127.0.0.2", "127.0.0.3", "[::1]", "0:0::1"]
    assert parse_addresses(values) == ["127.0.0.3", "127.0.0.2", "::1"]


def test_parse_empty() -> None:
    assert parse_addresses([]) == []
    assert parse_addresses([" , "]) == []


@pytest.mark.parametrize("bad", ["foo", "127.0.0.256", "[127.0.0.1", "[]", "127.0.0.1:80"])
def test_parse_rejects_non_addresses(bad: str) -> None:
    with pytest.raises(ConfigError, match="not an IP address") as info:
        parse_addresses(["127.0.0.2", bad])
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"])
def test_parse_rejects_addresses_nothing_leaves_from(bad: str) -> None:
    """bind() takes them, so they passed; the kernel then picked the source itself, and
    the log named an address never used (the upstream saw 127.0.0.1 for "0.0.0.0")."""
    with pytest.raises(ConfigError, match=f"cannot use egress address {re.escape(bad)}: "):
        parse_addresses(["127.0.0.2", bad])


# --- Egress ----------------------------------------------------------------------------------


def test_egress_str_is_address_and_frozen() -> None:
    e = Egress("127.0.0.2", "lo", socket.AF_INET)
    assert str(e) == "127.0.0.2"
    with pytest.raises(AttributeError):
        e.address = "127.0.0.3"  # type: ignore[misc]


# --- check_bindable --------------------------------------------------------------------------


def _nonlocal_bind_enabled() -> bool:
    try:
        return Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0"
    except OSError:
        return False


def test_check_bindable_loopback_range() -> None:
    # Linux answers for all of 127.0.0.0/8, not only 127.0.0.1.
    check_bindable("127.0.0.9")


def test_check_bindable_not_owned() -> None:
    if _nonlocal_bind_enabled():
        pytest.skip("net.ipv4.ip_nonlocal_bind is set: the kernel lets any address bind")
    # 192.0.2.77 is TEST-NET-1; make sure this host does not happen to carry it.
    if interface_of("192.0.2.77"):
        pytest.skip("this host carries 192.0.2.77")
    with pytest.raises(ConfigError, match=r"192\.0\.2\.77") as info:
        check_bindable("192.0.2.77")
    assert "does not own" in str(info.value)
    assert info.value.exit_status == 75  # it may be assigned later (a service retries)


def test_check_bindable_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="not an IP address") as info:
        check_bindable("example.com")
    assert info.value.exit_status == 2


# --- resolve_egress --------------------------------------------------------------------------


def test_resolve_named_loopback_addresses() -> None:
    got = resolve_egress(["127.0.0.2,127.0.0.3", "127.0.0.2"], [])
    assert got == [
        Egress("127.0.0.2", "lo", socket.AF_INET),
        Egress("127.0.0.3", "lo", socket.AF_INET),
    ]


def test_resolve_unknown_interface() -> None:
    with pytest.raises(ConfigError, match="no such interface: 'nosuchif0'"):
        resolve_egress([], ["nosuchif0"])


def test_resolve_not_owned_address() -> None:
    if _nonlocal_bind_enabled():
        pytest.skip("net.ipv4.ip_nonlocal_bind is set: the kernel lets any address bind")
    if interface_of("192.0.2.77"):
        pytest.skip("this host carries 192.0.2.77")
    with pytest.raises(ConfigError, match=r"cannot use egress address 192\.0\.2\.77"):
        resolve_egress(["127.0.0.2", "192.0.2.77"], [])


def test_resolve_lo_interface_and_named_deduplicated() -> None:
    got = resolve_egress(["127.0.0.1"], ["lo"])
    addresses = [e.address for e in got]
    assert addresses[0] == "127.0.0.1"
    assert len(addresses) == len(set(addresses))
    assert all(e.interface == "lo" for e in got)


# --- discover (real host) --------------------------------------------------------------------


def test_discover_skips_loopback_and_link_local() -> None:
    for e in discover():
        ip = ipaddress.ip_address(e.address)
        assert "%" not in e.address
        assert not ip.is_loopback
        assert not ip.is_link_local
        assert e.family == (socket.AF_INET if ip.version == 4 else socket.AF_INET6)
        if ip.version == 6:
            assert ip.is_global
        assert e.interface


def test_discover_named_lo_includes_loopback() -> None:
    got = discover(["lo"])
    assert Egress("127.0.0.1", "lo", socket.AF_INET) in got


# --- discover (faked interface table) --------------------------------------------------------


class _Addr(NamedTuple):
    family: int
    address: str
    netmask: str | None


class _Stats(NamedTuple):
    isup: bool


_FAKE_ADDRS = {
    "lo": [
        _Addr(socket.AF_INET, "127.0.0.1", "255.0.0.0"),
        _Addr(socket.AF_INET6, "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ],
    "eth1": [
        _Addr(psutil.AF_LINK, "02:00:00:00:00:02", None),
        _Addr(socket.AF_INET, "10.0.0.5", "255.255.255.0"),
        _Addr(socket.AF_INET6, "2a00:1450::5", "ffff:ffff:ffff:ffff::"),
        _Addr(socket.AF_INET6, "fe80::2%eth1", "ffff:ffff:ffff:ffff::"),
        _Addr(socket.AF_INET6, "fd00::5", "ffff:ffff:ffff:ffff::"),
        _Addr(socket.AF_INET, "169.254.1.1", "255.255.0.0"),
    ],
    "eth0": [
        _Addr(socket.AF_INET, "10.0.1.5", "255.255.255.0"),
        _Addr(socket.AF_INET, "10.0.1.6", "255.255.255.0"),
    ],
    "down0": [_Addr(socket.AF_INET, "10.0.2.5", "255.255.255.0")],
}
_FAKE_STATS = {
    "lo": _Stats(True),
    "eth1": _Stats(True),
    "eth0": _Stats(True),
    "down0": _Stats(False),
}


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def addrs() -> dict[str, Any]:
        return _FAKE_ADDRS

    def stats() -> dict[str, Any]:
        return _FAKE_STATS

    monkeypatch.setattr(psutil, "net_if_addrs", addrs)
    monkeypatch.setattr(psutil, "net_if_stats", stats)


@pytest.mark.usefixtures("fake_host")
def test_discover_filters_and_orders() -> None:
    assert discover() == [
        Egress("10.0.1.5", "eth0", socket.AF_INET),
        Egress("10.0.1.6", "eth0", socket.AF_INET),
        Egress("10.0.0.5", "eth1", socket.AF_INET),
        Egress("2a00:1450::5", "eth1", socket.AF_INET6),
    ]


@pytest.mark.usefixtures("fake_host")
def test_discover_named_interfaces() -> None:
    assert discover(["lo"]) == [
        Egress("127.0.0.1", "lo", socket.AF_INET),
        Egress("::1", "lo", socket.AF_INET6),
    ]
    # Explicitly named: link-local IPv4 kept, link-local and ULA IPv6 still not.
    assert [e.address for e in discover(["eth1"])] == ["10.0.0.5", "2a00:1450::5", "169.254.1.1"]


@pytest.mark.usefixtures("fake_host")
def test_discover_named_down_or_unknown() -> None:
    with pytest.raises(ConfigError, match="'down0' is down"):
        discover(["down0"])
    with pytest.raises(ConfigError, match="no such interface: 'x'"):
        discover(["eth0", "x"])


@pytest.mark.usefixtures("fake_host")
def test_interface_of_fake() -> None:
    assert interface_of("10.0.0.5") == "eth1"
    assert interface_of("[2a00:1450::5]") == "eth1"
    assert interface_of("127.3.2.1") == "lo"
    assert interface_of("10.0.0.6") == ""  # same subnet, not carried
    assert interface_of("::2") == ""


@pytest.mark.usefixtures("fake_host")
def test_resolve_empty_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_FAKE_ADDRS, "eth0", [])
    monkeypatch.setitem(_FAKE_ADDRS, "eth1", [])
    with pytest.raises(ConfigError, match=r"no usable egress address.*--egress"):
        resolve_egress([], [])
    with pytest.raises(ConfigError, match=r"no usable egress address: interface.*'eth0'"):
        resolve_egress([], ["eth0"])


def test_not_a_source_reads_the_kernels_ipv6_flags() -> None:
    table = (
        "2a001450000000000000000000000010 02 40 00 80 eth0\n"  # permanent: a source
        "2a001450000000000000000000000011 02 40 00 a0 eth0\n"  # deprecated
        "2a001450000000000000000000000012 03 40 00 c0 eth1\n"  # tentative
        "2a001450000000000000000000000013 03 40 00 48 eth1\n"  # DAD failed
        "2a001450000000000000000000000014 03 40 00 04 eth1\n"  # optimistic: usable
        "not a line\n"
        "zz001450000000000000000000000015 03 40 00 40 eth1\n"
    )
    assert not_a_source(table) == {
        ("2a00:1450::11", "eth0"),
        ("2a00:1450::12", "eth1"),
        ("2a00:1450::13", "eth1"),
    }
    assert not_a_source("") == set()
