"""`demux-proxy check`'s judgement, fed results directly: no sockets, no netlink."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from demux_proxy.check import (
    FAILED,
    NOT_CHECKED,
    SHARED,
    WRONG_ROUTE,
    AddressResult,
    InterfaceRouting,
    evaluate,
    parse_target,
    render_text,
    resolve_target,
)
from demux_proxy.check_probe import probe
from demux_proxy.egress import Egress
from demux_proxy.errors import ConfigError

V4 = socket.AF_INET
V6 = socket.AF_INET6


def eg(address: str, interface: str = "eth0") -> Egress:
    return Egress(address, interface, V6 if ":" in address else V4)


def ok(address: str, interface: str, public: str, route: str | None = None) -> AddressResult:
    return AddressResult(
        egress=eg(address, interface),
        public=public,
        latency_ms=12.5,
        route_device=interface if route is None else route,
    )


def test_all_good() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.1.20", "eth1", "198.51.100.2"),
        ]
    )
    assert report.ok
    assert [row.flags for row in report.rows] == [(), ()]
    assert [row.status for row in report.rows] == ["ok", "ok"]
    assert report.fix == ()
    assert report.notes == ()
    assert report.summary() == {
        "addresses": 2,
        "ok": 2,
        "usable": 2,
        "failed": 0,
        "shared": 0,
        "wrong_route": 0,
        "not_checked": 0,
        "distinct_public_addresses": 2,
    }


def test_failure_is_flagged_and_unusable() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            AddressResult(eg("10.0.0.11"), error="connection refused by 192.0.2.7:443"),
        ]
    )
    assert not report.ok
    good, bad = report.rows
    assert good.flags == () and good.usable
    assert bad.flags == (FAILED,)
    assert not bad.usable
    assert bad.status == "FAILED: connection refused by 192.0.2.7:443"
    assert report.summary()["failed"] == 1


def test_no_public_address_and_no_error_counts_as_failed() -> None:
    report = evaluate([AddressResult(eg("10.0.0.10"))])
    assert report.rows[0].flags == (FAILED,)
    assert report.rows[0].status == "FAILED: no public address"
    assert not report.ok


def test_an_error_wins_over_a_public_address() -> None:
    report = evaluate([AddressResult(eg("10.0.0.10"), public="198.51.100.1", error="boom")])
    assert report.rows[0].flags == (FAILED,)


def test_shared_public_address() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.0.11", "eth0", "198.51.100.9"),
            ok("10.0.0.12", "eth0", "198.51.100.9"),
            ok("10.0.0.13", "eth0", "198.51.100.9"),
        ]
    )
    first, *others = report.rows
    assert first.flags == ()
    assert [row.flags for row in others] == [(SHARED,)] * 3
    assert others[0].shared_with == ("10.0.0.12", "10.0.0.13")
    assert others[1].shared_with == ("10.0.0.11", "10.0.0.13")
    assert others[1].status == "SHARED with 10.0.0.11, 10.0.0.13"
    # Sharing works, it just adds nothing: not unusable, so the exit status stays 0.
    assert all(row.usable for row in report.rows)
    assert report.ok
    assert report.summary()["distinct_public_addresses"] == 2
    assert report.summary()["shared"] == 3
    assert report.summary()["ok"] == 1


def test_failed_addresses_do_not_share() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            AddressResult(eg("10.0.0.11"), public="198.51.100.1", error="HTTP 500"),
        ]
    )
    assert report.rows[0].flags == ()
    assert report.rows[1].flags == (FAILED,)


def test_wrong_route_fix_lines_with_unknown_gateway() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.1.23", "eth1", "198.51.100.1", route="eth0"),
            ok("10.0.1.24", "eth1", "198.51.100.1", route="eth0"),
            ok("10.0.1.25", "eth1", "198.51.100.5"),  # already routed right
        ],
        {"eth1": InterfaceRouting(subnet4="10.0.1.0/24")},
    )
    flags = [row.flags for row in report.rows]
    assert flags == [(SHARED,), (SHARED, WRONG_ROUTE), (SHARED, WRONG_ROUTE), ()]
    assert not report.ok
    assert report.rows[1].status == (
        "SHARED with 10.0.0.10, 10.0.1.24; WRONG ROUTE: leaves by eth0, not eth1"
    )
    commands = [line for line in report.fix if not line.startswith("#")]
    # eth1 is the second interface seen: table 101, like cloud-init's 100 + NIC index.
    assert commands == [
        "ip route add default via GATEWAY dev eth1 table 101",
        "ip rule add from 10.0.1.23 lookup 101",
        "ip rule add from 10.0.1.24 lookup 101",
    ]
    assert report.fix[0].startswith("# eth1: 2 address(es) leave by eth0")
    assert any("10.0.1.0/24" in n and "10.0.1.1" in n for n in report.notes)
    assert any("persistent" in n for n in report.notes)


def test_wrong_route_uses_known_gateway() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.1.23", "eth1", "198.51.100.2", route="eth0"),
        ],
        {"eth1": InterfaceRouting(gateway4="10.0.1.1", subnet4="10.0.1.0/24")},
    )
    assert "ip route add default via 10.0.1.1 dev eth1 table 101" in report.fix
    assert "ip rule add from 10.0.1.23 lookup 101" in report.fix
    assert not any("GATEWAY" in n for n in report.notes)


def test_existing_table_only_needs_the_rule() -> None:
    # Amazon Linux 2023 keeps a table 10000 + device number per secondary interface; an
    # address added after its refresh ran only lacks the rule.
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.1.23", "eth1", "198.51.100.2", route="eth0"),
        ],
        {"eth1": InterfaceRouting(table=10001, gateway4="10.0.1.1")},
    )
    commands = [line for line in report.fix if not line.startswith("#")]
    assert commands == ["ip rule add from 10.0.1.23 lookup 10001"]


def test_new_tables_avoid_taken_ones() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.1.23", "eth1", "198.51.100.2", route="eth0"),
            ok("10.0.2.23", "eth2", "198.51.100.3", route="eth0"),
        ],
        taken_tables=frozenset({101, 254, 255}),
    )
    commands = [line for line in report.fix if not line.startswith("#")]
    assert commands == [
        "ip route add default via GATEWAY dev eth1 table 102",
        "ip rule add from 10.0.1.23 lookup 102",
        "ip route add default via GATEWAY dev eth2 table 103",
        "ip rule add from 10.0.2.23 lookup 103",
    ]


def test_ipv6_fix_lines() -> None:
    report = evaluate(
        [
            ok("2a05:d018::10", "eth0", "2a05:d018::10"),
            ok("2a05:d018:1::23", "eth1", "2a05:d018:1::23", route="eth0"),
        ],
        {"eth1": InterfaceRouting(gateway6="fe80::1")},
    )
    commands = [line for line in report.fix if not line.startswith("#")]
    assert commands == [
        "ip -6 route add default via fe80::1 dev eth1 table 101",
        "ip -6 rule add from 2a05:d018:1::23 lookup 101",
    ]


def test_wrong_route_and_failure_together() -> None:
    # On a VPC a misrouted packet is dropped: the address fails *and* is misrouted.
    report = evaluate(
        [AddressResult(eg("10.0.1.23", "eth1"), error="timed out", route_device="eth0")]
    )
    assert report.rows[0].flags == (FAILED, WRONG_ROUTE)
    assert "ip rule add from 10.0.1.23 lookup 100" in report.fix


def test_unchecked_routes_are_notes_not_flags() -> None:
    results = [
        AddressResult(
            eg(f"127.0.0.{i}", "lo"),
            public=f"127.0.0.{i}",
            route_note="loopback addresses never leave the host",
        )
        for i in range(2, 10)
    ]
    results.append(AddressResult(eg("10.0.0.5", ""), public="198.51.100.1", route_device="eth0"))
    report = evaluate(results)
    assert report.ok
    assert all(row.flags == () for row in report.rows)
    assert report.fix == ()
    assert report.notes == (
        "route not checked for 127.0.0.2, 127.0.0.3, 127.0.0.4, 127.0.0.5, 127.0.0.6, "
        "127.0.0.7 and 2 more: loopback addresses never leave the host",
    )


def test_render_text_aligns_columns() -> None:
    report = evaluate(
        [
            ok("10.0.0.10", "eth0", "198.51.100.1"),
            ok("10.0.1.123", "ens6", "198.51.100.22", route="eth0"),
            AddressResult(eg("10.0.0.11"), error="no answer within 10 s"),
        ]
    )
    text = render_text(report, "https://checkip.example")
    lines = text.splitlines()
    assert lines[0] == "INTERFACE  LOCAL ADDRESS  PUBLIC ADDRESS  LATENCY  STATUS"
    status_at = lines[0].index("STATUS")
    public_at = lines[0].index("PUBLIC ADDRESS")
    assert lines[1][status_at:] == "ok"
    assert lines[2][status_at:].startswith("WRONG ROUTE: leaves by eth0")
    assert lines[3][status_at:] == "FAILED: no answer within 10 s"
    assert lines[1][public_at:].startswith("198.51.100.1 ")
    assert lines[3][public_at:].startswith("- ")
    assert lines[1].endswith("  12 ms  ok")  # whole milliseconds from 10 ms up
    assert "3 address(es) checked against https://checkip.example: 1 ok, 1 failed, " in text
    assert "  ip rule add from 10.0.1.123 lookup 101" in text


def test_to_json() -> None:
    report = evaluate(
        [ok("10.0.0.10", "eth0", "198.51.100.1"), ok("10.0.0.11", "eth0", "198.51.100.1")]
    )
    doc = report.to_json("https://checkip.example")
    assert doc["url"] == "https://checkip.example"
    assert doc["ok"] is True
    assert doc["addresses"][0] == {
        "interface": "eth0",
        "address": "10.0.0.10",
        "public_address": "198.51.100.1",
        "latency_ms": 12.5,
        "usable": True,
        "flags": ["shared"],
        "status": "SHARED with 10.0.0.11",
        "error": None,
        "shared_with": ["10.0.0.11"],
        "route_device": "eth0",
        "route_note": None,
        "not_checked": None,
    }
    assert doc["fix"] == [] and doc["notes"] == []


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path", "authority"),
    [
        ("https://checkip.amazonaws.com", "https", "checkip.amazonaws.com", 443, "/", None),
        ("http://127.0.0.1:8080/ip?x=1", "http", "127.0.0.1", 8080, "/ip?x=1", "127.0.0.1:8080"),
        ("http://[2001:db8::1]/", "http", "2001:db8::1", 80, "/", "[2001:db8::1]"),
        ("HTTPS://Example.com:443/a", "https", "example.com", 443, "/a", "example.com"),
    ],
)
def test_parse_target(
    url: str, scheme: str, host: str, port: int, path: str, authority: str | None
) -> None:
    target = parse_target(url)
    assert (target.scheme, target.host, target.port, target.path) == (scheme, host, port, path)
    assert target.authority == (authority or host)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "http://", "example.com", "http://h:99999/", "http://u:p@h/"]
)
def test_parse_target_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_target(url)


# ---------------------------------------------------------------------------------------------
# Addresses of a family the URL's host has no address of: not checked, not failed.

NO_V6 = "the URL has no IPv6 address (127.0.0.1 is an IPv4 address)"


def test_not_checked_is_neither_ok_nor_failed() -> None:
    report = evaluate(
        [
            ok("127.0.0.2", "lo", "127.0.0.2"),
            AddressResult(eg("::1", "lo"), not_checked=NO_V6),
        ]
    )
    good, skipped = report.rows
    assert good.flags == () and good.status == "ok"
    assert skipped.flags == (NOT_CHECKED,)
    assert skipped.status == f"NOT CHECKED: {NO_V6}"
    assert not skipped.usable and not skipped.checked
    assert report.ok  # the one address checked works: exit status 0
    assert not report.nothing_checked
    summary = report.summary()
    assert (summary["ok"], summary["failed"], summary["not_checked"]) == (1, 0, 1)
    row = report.to_json("http://127.0.0.1:1/")["addresses"][1]
    assert row["flags"] == ["not-checked"]
    assert row["usable"] is None  # not known either way
    assert row["error"] is None
    assert row["not_checked"] == NO_V6
    text = render_text(report, "http://127.0.0.1:1/")
    lines = text.splitlines()
    assert lines[1].endswith("  ok")
    assert lines[2].split()[:4] == ["lo", "::1", "-", "-"]
    assert lines[2].endswith(f"  NOT CHECKED: {NO_V6}")
    assert "2 address(es) checked against http://127.0.0.1:1/: 1 ok, 1 not checked; " in text


def test_not_checked_does_not_hide_a_failure() -> None:
    report = evaluate(
        [
            AddressResult(eg("127.0.0.2", "lo"), error="connection refused by 127.0.0.1:1"),
            AddressResult(eg("::1", "lo"), not_checked=NO_V6),
        ]
    )
    assert [row.flags for row in report.rows] == [(FAILED,), (NOT_CHECKED,)]
    assert not report.ok
    assert not report.nothing_checked


def test_nothing_checked_is_not_ok() -> None:
    report = evaluate([AddressResult(eg("::1", "lo"), not_checked=NO_V6)])
    assert report.nothing_checked
    assert not report.ok
    assert report.summary()["failed"] == 0
    assert report.to_json("http://127.0.0.1:1/")["ok"] is False


def _fake_getaddrinfo(
    answers: dict[int, list[str] | int],
) -> Callable[..., list[tuple[Any, ...]]]:
    def getaddrinfo(host: str, port: int, family: int, kind: int) -> list[tuple[Any, ...]]:
        answer = answers[family]
        if isinstance(answer, int):
            raise socket.gaierror(answer, f"error {answer}")
        return [(family, kind, 6, "", (a, port)) for a in answer]

    return getaddrinfo


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8080/", {V4: ["127.0.0.1"], V6: []}),
        ("http://[::1]:8080/", {V4: [], V6: ["::1"]}),
        ("http://[::ffff:127.0.0.1]:8080/", {V4: ["127.0.0.1"], V6: []}),  # reached over IPv4
    ],
)
def test_resolve_an_ip_literal(url: str, expected: dict[int, list[str]]) -> None:
    assert resolve_target(parse_target(url), [V4, V6]) == expected


@pytest.mark.parametrize("code", [socket.EAI_NONAME, socket.EAI_NODATA])
def test_a_name_with_ipv4_only_has_no_ipv6_to_check(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo({V4: ["192.0.2.7"], V6: code}))
    target = parse_target("http://v4only.test/")
    assert resolve_target(target, [V4, V6]) == {V4: ["192.0.2.7"], V6: []}
    # With IPv6 egress alone, the IPv4 lookup still tells "no AAAA" from "no such name".
    assert resolve_target(target, [V6]) == {V6: []}
    assert probe_now(eg("::1", "lo"), target, []).not_checked == (
        "the URL has no IPv6 address (v4only.test has only IPv4 addresses)"
    )


def test_an_unknown_name_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    no = socket.EAI_NONAME
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo({V4: no, V6: no}))
    out = resolve_target(parse_target("http://nowhere.test/"), [V4, V6])
    assert out == {
        V4: f"cannot resolve nowhere.test to an IPv4 address: error {no}",
        V6: f"cannot resolve nowhere.test to an IPv6 address: error {no}",
    }


def test_a_failed_lookup_is_not_a_missing_family(monkeypatch: pytest.MonkeyPatch) -> None:
    again = socket.EAI_AGAIN  # a resolver that did not answer: the AAAA may well exist
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo({V4: ["192.0.2.7"], V6: again}))
    out = resolve_target(parse_target("http://flaky.test/"), [V4, V6])
    assert out[V4] == ["192.0.2.7"]
    assert out[V6] == f"cannot resolve flaky.test to an IPv6 address: error {again}"


def probe_now(egress: Egress, target: Any, addresses: list[str] | str) -> Any:
    return asyncio.run(probe(egress, target, addresses, None, 1.0))


def test_probe_without_addresses_of_its_family_is_not_checked() -> None:
    target = parse_target("http://127.0.0.1:1/")
    result = probe_now(eg("::1", "lo"), target, [])
    assert result.not_checked == NO_V6
    assert result.error is None and result.public is None
