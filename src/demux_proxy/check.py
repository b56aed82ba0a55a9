"""`demux-proxy check`: does every egress address work and show its own public address?

Three parts, in three modules, so the judgement can be tested without a network:

* `check_report.evaluate` (pure): per-address results in, a `Report` out: which
  addresses failed, which could not be checked (the URL has no address of their family),
  which share a public address with another, which leave by an interface that does not
  own them, and the `ip rule` / `ip route` lines that fix those.
* `check_probe.run_probes` (asyncio I/O): one HTTP/1.1 GET per egress address, on a
  socket bound to it; the response body (stripped) is the public address seen.
* `check_routes.inspect_routes` (netlink through pyroute2): `ip route get DEST from SRC`
  per address, plus what the fix lines need (tables in use, gateways, subnets).

The probe URL is the operator's own, so the destination policy (`policy.refusal`) does not
apply to it: checking against a server on a private network is legitimate here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence

from demux_proxy.check_probe import Probe, Target, parse_target, probe, resolve_target, run_probes
from demux_proxy.check_report import (
    DEFAULT_URL,
    FAILED,
    NOT_CHECKED,
    SHARED,
    WRONG_ROUTE,
    AddressResult,
    InterfaceRouting,
    Report,
    Row,
    evaluate,
    render_text,
)
from demux_proxy.check_routes import RouteCheck, RouteInspection, inspect_routes
from demux_proxy.egress import Egress

__all__ = [
    "DEFAULT_URL",
    "FAILED",
    "NOT_CHECKED",
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
                not_checked=p.not_checked,
            )
        )
    return evaluate(results, routes.interfaces, taken_tables=routes.taken_tables)
