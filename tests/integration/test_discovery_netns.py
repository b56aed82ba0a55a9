"""Address discovery against a real interface table, inside a throw-away network namespace.

A namespace gives a fully known set of interfaces and addresses (a dummy interface plus lo)
without touching the host's own network.  The addresses used are documentation ranges, plus
one global-looking IPv6 address (documentation IPv6 is not ``is_global``); they exist only
inside the isolated namespace and nothing is ever sent.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import add_namespace_or_skip, ip, ns_ip

pytestmark = pytest.mark.netns

SRC = Path(__file__).resolve().parents[2] / "src"

# (address/prefix, extra `ip addr add` flags) on dummy0; nodad so IPv6 is usable at once
# instead of "tentative" (which would make bind() fail with EADDRNOTAVAIL).
DUMMY_ADDRS = [
    ("192.0.2.10/24", []),
    ("192.0.2.11/24", []),
    ("198.51.100.7/24", []),
    ("2a00:1450::10/64", ["nodad"]),
    ("2001:db8::10/64", ["nodad"]),  # documentation space: not is_global, must be skipped
    ("2a00:1450::11/64", ["nodad", "preferred_lft", "0"]),  # deprecated: skipped
]
# On a veth pair whose duplicate address detection takes 100 probes: tentative all test.
TENTATIVE = "2a00:1450::12"
EXPECTED_DUMMY = ["192.0.2.10", "192.0.2.11", "198.51.100.7", "2a00:1450::10"]

# Runs inside the namespace: performs the requested calls and prints one JSON object.
PROBE = """
import ipaddress, json, sys
from demux_proxy.egress import check_bindable, discover, resolve_egress
from demux_proxy.errors import ConfigError

def rows(egresses):
    return [[e.address, e.interface, int(e.family)] for e in egresses]

out = {"discover": rows(discover()), "dummy0": rows(discover(["dummy0"])), "bind": {}}
out["dad0"] = rows(discover(["dad0"]))
with open("/proc/net/if_inet6") as table:
    out["tentative"] = [
        str(ipaddress.IPv6Address(int(f[0], 16)))
        for f in map(str.split, table)
        if f[5] == "dad0" and int(f[4], 16) & 0x40
    ]
for addr in sys.argv[1:]:
    try:
        check_bindable(addr)
        out["bind"][addr] = None
    except ConfigError as e:
        out["bind"][addr] = str(e)
try:
    out["resolve"] = rows(resolve_egress([], []))
except ConfigError as e:
    out["resolve"] = str(e)
try:
    discover(["down0"])
    out["down0"] = None
except ConfigError as e:
    out["down0"] = str(e)
print(json.dumps(out))
"""


def _add_links(ns: str) -> list[str]:
    """Create dummy0 (to be brought up) and down0 (left down) inside the namespace.

    Returns the extra interfaces to bring up.  Dummy interfaces are the natural choice, but some
    kernels are built without them; veth pairs stand in there.  psutil counts an interface as up
    only when it is RUNNING (up with carrier), and a veth end has carrier only when its peer is
    up too, so dummy0's peer is brought up (it carries no usable address) and down0's is not.
    """
    proc = ip("-n", ns, "link", "add", "dummy0", "type", "dummy")
    if proc.returncode == 0:
        ns_ip(ns, "link", "add", "down0", "type", "dummy")
        return []
    ns_ip(ns, "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy0p")
    ns_ip(ns, "link", "add", "down0", "type", "veth", "peer", "name", "down0p")
    return ["dummy0p"]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"demuxtest-{secrets.token_hex(4)}"
    add_namespace_or_skip(name)
    try:
        extra_up = _add_links(name)
        for cidr, flags in DUMMY_ADDRS:
            ns_ip(name, "addr", "add", cidr, "dev", "dummy0", *flags)
        ns_ip(name, "addr", "add", "203.0.113.9/24", "dev", "down0")
        ns_ip(name, "link", "add", "dad0", "type", "veth", "peer", "name", "dad0p")
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.dad0.dad_transmits=100"],
            check=True,
            timeout=10,
        )
        ns_ip(name, "addr", "add", f"{TENTATIVE}/64", "dev", "dad0")
        for link in ["dummy0", "dad0", "dad0p", *extra_up]:
            ns_ip(name, "link", "set", link, "up")
        ns_ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "delete", name)


def _probe(ns: str, *bind_addrs: str) -> dict[str, Any]:
    env = dict(os.environ)
    # The package may or may not be installed in this interpreter; make src importable anyway.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, *bind_addrs],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def probe(netns: str) -> dict[str, Any]:
    return _probe(netns, "192.0.2.10", "2a00:1450::10", "127.0.0.42", "192.0.2.12", "203.0.113.5")


def test_discover_finds_exactly_dummy_addresses(probe: dict[str, Any]) -> None:
    found = [a for a, _, _ in probe["discover"]]
    # Order is the kernel's (primary addresses before secondaries), so compare as multisets.
    assert sorted(found) == sorted(EXPECTED_DUMMY)
    assert found[0] == "192.0.2.10"  # first primary address, as assigned
    assert {iface for _, iface, _ in probe["discover"]} == {"dummy0"}


def test_tentative_and_deprecated_ipv6_is_no_egress(probe: dict[str, Any]) -> None:
    """psutil lists an address in duplicate address detection (bind fails: every request
    from it a retry) and a deprecated one (not for new connections) like any other."""
    assert TENTATIVE in probe["tentative"]  # the kernel still says so
    found = [a for a, _, _ in probe["discover"]]
    assert TENTATIVE not in found and "2a00:1450::11" not in found, found
    assert TENTATIVE not in [a for a, _, _ in probe["dad0"]], probe["dad0"]


def test_discover_families(probe: dict[str, Any]) -> None:
    families = {a: fam for a, _, fam in probe["discover"]}
    assert families["192.0.2.10"] == socket.AF_INET
    assert families["2a00:1450::10"] == socket.AF_INET6


def test_discover_named_interface(probe: dict[str, Any]) -> None:
    assert probe["dummy0"] == probe["discover"]


def test_named_down_interface_is_an_error(probe: dict[str, Any]) -> None:
    # down0 carries 203.0.113.9 but is down: not discovered, and naming it is refused.
    assert probe["down0"] is not None
    assert "'down0' is down" in probe["down0"]


def test_resolve_defaults_to_discovery(probe: dict[str, Any]) -> None:
    assert probe["resolve"] == probe["discover"]


def test_check_bindable_owned(probe: dict[str, Any]) -> None:
    for addr in ("192.0.2.10", "2a00:1450::10", "127.0.0.42"):
        assert probe["bind"][addr] is None, probe["bind"][addr]


def test_check_bindable_not_owned(probe: dict[str, Any]) -> None:
    # 192.0.2.12 is inside dummy0's subnet but not assigned: still not ours.
    for addr in ("192.0.2.12", "203.0.113.5"):
        err = probe["bind"][addr]
        assert err is not None
        assert addr in err
        assert "does not own" in err
