"""The admin listener (`--admin HOST:PORT`): /metrics, /status, /status.json, /healthz.

Off by default; loopback only unless proxy authentication is configured, and then the
same credentials are asked for (Basic `Authorization`). Every worker listens on the
admin port too (SO_REUSEPORT) and any of them answers with the numbers of all, summed
from prometheus-client's multiprocess files. Not on the hot path: asyncio streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import orjson

from demux_proxy import __version__, log
from demux_proxy.auth import ClientPolicy
from demux_proxy.egress import Egress
from demux_proxy.errors import Forbidden, ProtocolError
from demux_proxy.http1 import writer
from demux_proxy.http1.headers import Headers
from demux_proxy.http1.parser import find_head_end, parse_request_head
from demux_proxy.metrics import scrape

_MAX_HEAD = 16 * 1024
_TIMEOUT_S = 10.0
_PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def status_document(
    families: Sequence[Any], egress: Sequence[Egress], *, started: float, workers: int
) -> dict[str, Any]:
    """Per-address and total counts from the scraped metric families (pure)."""
    rows: dict[str, dict[str, Any]] = {
        e.address: {
            "address": e.address,
            "interface": e.interface,
            "requests": 0,
            "status": {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0},
            "bytes_down": 0,
            "bytes_up": 0,
            "connections_opened": 0,
            "connections_reused": 0,
            "connections_idle": 0,
            "cooling_hosts": 0,
            "latency_sum_s": 0.0,
            "latency_count": 0,
        }
        for e in egress
    }
    errors: dict[str, int] = {}
    totals = {"requests": 0, "errors": 0, "bytes_down": 0, "bytes_up": 0}
    queues: dict[str, int] = {}
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            row = rows.get(labels.get("egress", ""))
            value = sample.value
            # Totals count everything, also requests refused before an address was picked.
            if sample.name == "demux_requests_total":
                totals["requests"] += int(value)
                if labels["status_class"] == "5xx":
                    totals["errors"] += int(value)
            elif sample.name == "demux_body_bytes_total":
                totals["bytes_" + labels["direction"]] += int(value)
            if row is None:
                if sample.name == "demux_errors_total":
                    errors[labels["kind"]] = errors.get(labels["kind"], 0) + int(value)
                elif sample.name == "demux_queue_depth":
                    queues[labels["rule"]] = queues.get(labels["rule"], 0) + int(value)
                continue
            if sample.name == "demux_requests_total":
                row["status"][labels["status_class"]] += int(value)
                row["requests"] += int(value)
            elif sample.name == "demux_body_bytes_total":
                row["bytes_" + labels["direction"]] += int(value)
            elif sample.name == "demux_upstream_connections_total":
                row["connections_" + labels["how"]] += int(value)
            elif sample.name == "demux_upstream_connections_idle":
                row["connections_idle"] += int(value)
            elif sample.name == "demux_cooling_hosts":
                row["cooling_hosts"] += int(value)
            elif sample.name == "demux_request_duration_seconds_sum":
                row["latency_sum_s"] += value
            elif sample.name == "demux_request_duration_seconds_count":
                row["latency_count"] += int(value)
    addresses = list(rows.values())
    for row in addresses:
        count = row.pop("latency_count")
        total = row.pop("latency_sum_s")
        row["mean_latency_ms"] = round(total / count * 1000, 2) if count else None
        row["errors"] = row["status"]["5xx"]
    return {
        "version": __version__,
        "time": time.time(),
        "uptime_s": round(time.time() - started, 1),
        "workers": workers,
        "addresses": addresses,
        "totals": totals,
        "errors_by_kind": errors,
        "queue_depth": queues,
    }


class AdminServer:
    def __init__(
        self,
        egress: Callable[[], Sequence[Egress]],
        policy: ClientPolicy,
        events: log.EventLog,
        *,
        require_auth: bool,
        workers: int,
    ) -> None:
        self._egress = egress  # the addresses now (re-discovery changes them)
        self._policy = policy
        self._events = events
        self._require_auth = require_auth
        self._workers = workers
        self._started = time.time()
        self._page = resources.files("demux_proxy").joinpath("status.html").read_bytes()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_address=True, reuse_port=self._workers > 1
        )
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer_: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if find_head_end(head, _MAX_HEAD, request=True) < 0:
                raise ProtocolError("incomplete request head")
            req = parse_request_head(head)
            # /healthz says "ok" and nothing else: open, for load balancers' checks.
            public = req.target.split(b"?", 1)[0] == b"/healthz"
            if not public and not self._client_allowed(writer_):
                raise Forbidden("this client's address is outside --allow-client")
            allowed = public or not self._require_auth or await self._authorized(req.headers)
            writer_.write(self._answer(req.method, req.target, allowed))
            await writer_.drain()
        except (ProtocolError, Forbidden) as exc:
            writer_.write(writer.plain_response(exc.status, exc.reason, close=True))
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that says nothing complete gets nothing
        except ConnectionError:
            pass
        finally:
            writer_.close()

    def _client_allowed(self, writer_: asyncio.StreamWriter) -> bool:
        """--allow-client holds here as on the proxy's port (for all but /healthz)."""
        peer = writer_.get_extra_info("peername")
        return bool(peer) and self._policy.client_allowed(peer[0])

    def _answer(self, method: bytes, target: bytes, allowed: bool) -> bytes:
        if method not in (b"GET", b"HEAD"):
            return writer.plain_response(405, "the admin listener only answers GET", close=True)
        if not allowed:
            body = b"authentication required\n"
            return (
                writer.response_head(
                    401,
                    b"Unauthorized",
                    [
                        (b"WWW-Authenticate", b'Basic realm="demux-proxy admin", charset="UTF-8"'),
                        (b"Content-Type", b"text/plain; charset=utf-8"),
                        (b"Content-Length", b"%d" % len(body)),
                        (b"Connection", b"close"),
                    ],
                )
                + body
            )
        path = target.split(b"?", 1)[0]
        if path == b"/healthz":
            body, kind = b"ok\n", b"text/plain; charset=utf-8"
        elif path == b"/metrics":
            body, kind = scrape()[0], _PROMETHEUS_TYPE
        elif path == b"/status.json":
            doc = status_document(
                scrape()[1], self._egress(), started=self._started, workers=self._workers
            )
            body, kind = orjson.dumps(doc), b"application/json"
        elif path in (b"/status", b"/"):
            body, kind = self._page, b"text/html; charset=utf-8"
        else:
            known = "/metrics, /status, /status.json, /healthz"
            return writer.plain_response(404, f"not found; try {known}", close=True)
        head = writer.response_head(
            200,
            b"OK",
            [
                (b"Content-Type", kind),
                (b"Content-Length", b"%d" % len(body)),
                (b"Cache-Control", b"no-store"),
                (b"Connection", b"close"),
            ],
        )
        return head if method == b"HEAD" else head + body

    async def _authorized(self, headers: Headers) -> bool:
        # Same credentials as the proxy: Authorization here, Proxy-Authorization there.
        as_proxy = [
            (b"Proxy-Authorization", v) for n, v in headers if n.lower() == b"authorization"
        ]
        if self._policy.would_block(as_proxy):  # a first bcrypt check: off the loop
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._policy.check, as_proxy) is not None
        return self._policy.check(as_proxy) is not None
