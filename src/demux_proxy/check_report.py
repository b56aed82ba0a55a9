"""`demux-proxy check`, the judgement (pure): per-address results in, a Report out."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from demux_proxy.egress import Egress

DEFAULT_URL = "https://checkip.amazonaws.com"

FAILED = "failed"  # the request did not produce a public address: the address is unusable
SHARED = "shared"  # another egress address showed the same public address: it adds nothing
WRONG_ROUTE = "wrong-route"  # the kernel sends it out of another interface: unusable on a VPC
# Not probed: the URL's host has no address of its family. Not a failure, but not a pass.
NOT_CHECKED = "not-checked"

# Tables 100 + n for the n-th interface, as cloud-init numbers them on EC2 (100 + NIC index).
TABLE_BASE = 100
# Kernel-reserved tables: main, local, default (and "unspec").
RESERVED_TABLES = frozenset({0, 253, 254, 255})


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
    not_checked: str | None = None  # why it was not probed at all (not its fault)


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
        """Failed and wrong-route addresses are unusable; a shared one works, adding nothing.

        A not-checked one is not known to be usable: False here, null in the JSON."""
        return not any(flag in self.flags for flag in (FAILED, WRONG_ROUTE, NOT_CHECKED))

    @property
    def checked(self) -> bool:
        return NOT_CHECKED not in self.flags

    @property
    def status(self) -> str:
        if not self.flags:
            return "ok"
        parts = []
        r = self.result
        if NOT_CHECKED in self.flags:
            parts.append(f"NOT CHECKED: {r.not_checked}")
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
        """Whether every address checked is usable, and one was (the exit status of `check`).

        Addresses the URL has no address for (IPv6 ones, for an IPv4 URL) count neither way;
        when that is all of them, nothing was shown to work: not ok.
        """
        checked = [row for row in self.rows if row.checked]
        return all(row.usable for row in checked) and (bool(checked) or not self.rows)

    @property
    def nothing_checked(self) -> bool:
        """Every address was left unchecked: the URL has no address of any of their families."""
        return bool(self.rows) and not any(row.checked for row in self.rows)

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
            "not_checked": self.count(NOT_CHECKED),
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
                    "usable": row.usable if row.checked else None,
                    "flags": list(row.flags),
                    "status": row.status,
                    "error": row.result.error,
                    "shared_with": list(row.shared_with),
                    "route_device": row.result.route_device,
                    "route_note": row.result.route_note,
                    "not_checked": row.result.not_checked,
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
    * wrong-route: the kernel routes it out of an interface other than the one owning it;
    * not-checked: not probed, as the URL's host has no address of its family (the only flag
      such an address gets, whatever else is recorded).

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
        if r.public is not None and r.error is None and r.not_checked is None:
            by_public.setdefault(r.public, []).append(r.egress.address)

    rows = []
    for r in results:
        flags = []
        shared: tuple[str, ...] = ()
        if r.not_checked is not None:
            rows.append(Row(r, (NOT_CHECKED,)))
            continue
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
        while number in used or number in RESERVED_TABLES:
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
    if s["not_checked"]:
        parts.append(f"{s['not_checked']} not checked")
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
