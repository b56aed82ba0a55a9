"""Forward one request: its upstream side from `outbound`, then both bodies and the answer.

The per-request path. `Forwarder.forward` is called by the server for every request
head it parsed, plain or inside an intercepted tunnel, and returns whether the client
connection can carry another request. It retries from another address where that is
safe, relays the response (1xx, re-framing; the bodies move in `bodies`, a 101 goes
on in `relay.switch`), returns the connection to the pool and logs the "inbound
response" line.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from itertools import count
from typing import Final

from demux_proxy import log
from demux_proxy.bodies import raise_upload_error, reap, relay_body, upload_body, upstream_lost
from demux_proxy.config import Config
from demux_proxy.dispatch import Dispatcher
from demux_proxy.errors import (
    BodyCut,
    EgressFailure,
    EgressRefused,
    EgressTimeout,
    EgressUnreachable,
    Forbidden,
    LoopDetected,
    NoEgressLeft,
    PeerGone,
    ProtocolError,
    ProxyError,
    StreamClosed,
    Unavailable,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from demux_proxy.http1 import writer
from demux_proxy.http1.framing import (
    BodyDecoder,
    CloseDelimitedDecoder,
    request_decoder,
    response_decoder,
)
from demux_proxy.http1.headers import end_to_end, replace
from demux_proxy.http1.parser import (
    RequestHead,
    ResponseHead,
    find_head_end,
    parse_response_head,
    response_has_body,
)
from demux_proxy.metrics import NoMetrics, Recorder
from demux_proxy.outbound import IDEMPOTENT, Outbound
from demux_proxy.outcome import Outcome
from demux_proxy.policy import DestinationPolicy
from demux_proxy.pool import Pool
from demux_proxy.relay import switch
from demux_proxy.route import Route
from demux_proxy.scheduler import Scheduler
from demux_proxy.stream import Stream
from demux_proxy.upstream import UpstreamConnection

# Error kinds for metrics: a fixed, small set of label values.
_KIND: Final[dict[type[ProxyError], str]] = {
    EgressFailure: "egress",
    EgressRefused: "egress",
    EgressTimeout: "egress",
    EgressUnreachable: "egress",
    ProtocolError: "bad_request",
    BodyCut: "client_lost",
    Forbidden: "forbidden",
    LoopDetected: "loop",
    UpstreamError: "upstream",
    UpstreamReset: "upstream",
    UpstreamTimeout: "upstream_timeout",
}


def error_kind(exc: ProxyError) -> str:
    """The `kind` label of demux_errors_total for `exc`."""
    return _KIND.get(type(exc), "proxy_error")


# More than any server has a reason to send before its answer (100, a few 103s).
MAX_INTERIM_RESPONSES: Final = 32
_RETRY: Final = object()  # _respond's answer when the exchange should go again elsewhere


class Forwarder:
    def __init__(
        self,
        config: Config,
        scheduler: Scheduler,
        pool: Pool[UpstreamConnection],
        upstream_tls: ssl.SSLContext,
        events: log.EventLog,
        policy: DestinationPolicy,
        sessions: Iterator[int] | None = None,
        *,
        recorder: Recorder | None = None,
    ) -> None:
        self._metrics: Recorder = recorder if recorder is not None else NoMetrics()
        self._dispatch = Dispatcher(config, scheduler, events, self._metrics)
        self._outbound = Outbound(
            config, self._dispatch, scheduler, pool, upstream_tls, events, policy, self._metrics
        )
        self._config = config
        self._scheduler = scheduler
        self._pool = pool
        self._events = events
        self._sessions = sessions if sessions is not None else count(1)
        self.closing = False  # set at shutdown: answers then carry Connection: close

    def _mixed(self) -> bool:
        return len(self._scheduler.families) > 1

    def pin(self, value: bytes) -> str:
        """The egress address an X-Demux-Egress value names (400 when none)."""
        return self._dispatch.pin(value)

    def answered_here(self, status: int, kind: str | None) -> None:
        """Counts a request the server answered before any exchange (a malformed head,
        a 407, a refused CONNECT, Max-Forwards 0): from no egress address, as a refused
        exchange is."""
        self._metrics.request(None, status, 0.0, 0, 0)
        if kind is not None:
            self._metrics.error(kind)

    def shed_idle(self) -> int:
        """Out of descriptors: close some idle upstream connections (Pool.shed)."""
        return self._pool.shed()

    async def forward(self, client: Stream, req: RequestHead, route: Route) -> bool:
        """Relay `req` to `route`; True when the client connection may continue."""
        sid = next(self._sessions)
        started = time.perf_counter()
        method = req.method.decode("latin-1")
        body = request_decoder(req.content_length, req.chunked)
        out = Outcome(body.done)
        error: str | None = None
        kind: str | None = None
        keep = False
        # Replaying is safe for idempotent requests whose body is not streamed (none).
        replayable = body.done and req.method in IDEMPOTENT and not req.upgrade
        tried: list[str] = []
        failure: EgressFailure | None = None  # why the last address tried failed
        try:
            # Mixed IPv4/IPv6 egress: addresses of a family the host has, sessions too.
            family = await self._outbound.family(route) if self._mixed() else None
            only = self._dispatch.affinity(req, route, family)
            while True:
                try:
                    conn, egress = await self._outbound.open(
                        client, req, route, body, out, sid, method, tried, only, family
                    )
                except NoEgressLeft:
                    if failure is None:
                        raise
                    raise failure from None  # the client is told what failed, not this
                except EgressFailure as exc:
                    # Nothing reached the server: any request may go from another address.
                    failed = out.egress
                    if failed is None:
                        raise
                    if isinstance(exc, EgressRefused):
                        # As for a reset after the request (`_respond`): never the last
                        # address free for the host.
                        if self._dispatch.another_address_free(route, failed.address):
                            self._dispatch.cool_pair(failed, route, exc)
                    elif isinstance(exc, (EgressTimeout, EgressUnreachable)):
                        self._dispatch.cool_pair(failed, route, exc)
                    else:
                        self._dispatch.rest(failed, exc)
                    if len(tried) >= self._dispatch.retries or only is not None:
                        raise
                    tried.append(failed.address)
                    self._scheduler.finished(failed.address)
                    out.egress = None
                    failure = exc
                    continue
                out.egress = egress
                result = await self._respond(
                    client,
                    conn,
                    req,
                    route,
                    body,
                    out,
                    only,
                    # A pinned request cannot move to another address: its answer stands.
                    replayable and only is None and len(tried) < self._dispatch.retries,
                )
                if result is not _RETRY:
                    keep = result is True
                    break
                tried.append(egress.address)
                self._scheduler.finished(egress.address)
                out.egress = None
        except ProxyError as exc:
            error = exc.reason
            kind = error_kind(exc)
            if out.response_started:
                # The status the client got stays the one logged; `error` says it was cut.
                client.abort()  # a truncated body must not look complete
            else:
                out.status = exc.status
                keep = out.request_done and req.keep_alive and not self.closing
                extra = (
                    [(b"Retry-After", b"%d" % exc.retry_after_s)]
                    if isinstance(exc, Unavailable)
                    else []
                )
                client.write(
                    writer.plain_response(exc.status, exc.reason, close=not keep, extra=extra)
                )
        except (StreamClosed, TimeoutError) as exc:
            # A PeerGone says so itself (and why): no second "client connection lost".
            if isinstance(exc, PeerGone):
                error = str(exc)
            elif isinstance(exc, TimeoutError):  # a read of the request's body
                error = f"client sent nothing for {self._config.idle_timeout_s:g} s mid-body"
            else:
                error = f"client connection lost: {exc}"
            kind = "client_lost"
            client.abort()
        except asyncio.CancelledError:
            # Cut (the shutdown grace period ran out).
            error = "cut short: the proxy is stopping"
            kind = "cut"
            if out.response_started or client.closed or client.transport.is_closing():
                # A reset, not a clean close, so that a body cut short never looks
                # complete (close-delimited, above all).
                client.abort()
            else:  # nothing of the answer went: the client can be told why
                out.status = 503
                client.write(writer.plain_response(503, "the proxy is stopping", close=True))
                client.close()
            raise
        except Exception as exc:
            # A bug of ours: the server logs it with its traceback and resets the client;
            # this request's line says so too, rather than a clean status 0 at info.
            error = f"internal error: {type(exc).__name__}"
            kind = "internal"
            raise
        finally:
            elapsed = time.perf_counter() - started
            used = out.egress
            # Keys inserted in sorted order, as the log shows them (emit's in_order).
            fields: dict[str, object] = {
                "bytes": out.bytes_down,
                "bytes_sent": out.bytes_up,
                "client": client.peer[0],
            }
            if out.cooldown_s is not None:
                fields["cooldown"] = round(out.cooldown_s, 3)
            fields["duration_ms"] = round(elapsed * 1000, 3)
            if error is not None:
                fields["error"] = error
            if used is not None:
                self._scheduler.finished(used.address)
                if kind == "forbidden" or kind == "loop":  # refused before anything left
                    used = None
                else:
                    fields["interface"] = used.address
            fields["method"] = method
            if tried:
                fields["retried_from"] = tried
            fields["session_id"] = sid
            fields["status_code"] = out.status
            fields["type"] = "response"
            fields["url"] = route.url
            level = log.INFO if error is None else log.WARNING
            self._events.emit(level, "inbound response", fields, in_order=True)
            self._metrics.request(
                used.address if used is not None else None,
                out.status,
                elapsed,
                out.bytes_down,
                out.bytes_up,
            )
            if kind is not None:
                self._metrics.error(kind)
        return keep

    # --- relaying --------------------------------------------------------------------

    async def _respond(
        self,
        client: Stream,
        conn: UpstreamConnection,
        req: RequestHead,
        route: Route,
        body: BodyDecoder,
        out: Outcome,
        only: str | None,
        may_retry: bool,
    ) -> bool | object:
        """Relay the answer; `_RETRY` when it cooled the address and another may go."""
        up = conn.stream
        upload = None
        failed: BaseException | None = None
        if not body.done:
            idle = self._config.idle_timeout_s
            sending = upload_body(client, up, body, req.chunked, out, idle, self._events)
            upload = asyncio.create_task(sending)
        try:
            resp = self._head_in(up)  # usually there with the first byte: no coroutine
            if resp is None:
                resp = await self._read_head(up, upload, client, True)
            interim = 0
            while 100 <= resp.status < 200 and resp.status != 101:
                # Interim responses (100 Continue, 103) go to 1.1 clients (RFC 9110 15.2),
                # at the pace the client takes them, and only so many: an endless run of
                # them would hold the request forever and fill our memory.
                interim += 1
                if interim > MAX_INTERIM_RESPONSES:
                    raise UpstreamError(
                        f"upstream sent over {MAX_INTERIM_RESPONSES} interim (1xx) responses"
                    )
                if req.version == b"1.1":
                    headers = end_to_end(resp.headers, resp.connection, drop_length=True)
                    client.write(writer.response_head(resp.status, resp.reason, headers))
                    await client.drain(self._config.idle_timeout_s)
                resp = await self._read_head(up, upload, client, False)
            out.status = resp.status
            if resp.status == 101:
                await switch(
                    client, conn.stream, req, resp, out, upload, self._config.idle_timeout_s
                )
                return False  # the connection ended with the new protocol
            retry_after, cooled = self._dispatch.learn(conn.egress.address, route, resp, only)
            if cooled is not None:  # kept across a retry: the log says what happened
                out.cooldown_s = cooled
            if (
                retry_after is not None
                and may_retry
                and upload is None
                and self._dispatch.another_address_free(route, conn.egress.address)
            ):
                conn.drop()  # its body is unread: the connection is not reusable
                return _RETRY
            keep = await self._relay_response(client, up, req, resp, out, upload, retry_after)
        except BaseException as exc:
            conn.drop()  # mid-message: no TLS shutdown that reads on for the rest
            if upload is None:
                if (
                    isinstance(exc, UpstreamReset)
                    and conn.requests == 1
                    and self._dispatch.another_address_free(route, conn.egress.address)
                ):
                    # A fresh connection refused by the host: this address, most likely
                    # (a ban by reset), and one request in N would fail for good. Never
                    # the last address free for the host: a host that resets every
                    # address is failing, and its clients get the 502, not a queue.
                    self._dispatch.cool_pair(conn.egress, route, exc)
                    if may_retry:
                        return _RETRY
                raise
            failed = exc  # the upload is reaped below, outside the except block
        if failed is not None or resp is None:
            assert upload is not None and failed is not None
            await reap(upload)
            raise failed
        reusable = resp.keep_alive and out.request_done
        if upload is not None and not out.request_done:
            # The server answered before reading the whole body (e.g. 413): neither
            # connection is at a message boundary any more. The upload may have ended
            # already, failed (the server closed): reaped either way, its error retrieved.
            await reap(upload)
            keep = reusable = False
        if reusable and conn.usable():
            conn.stream.resume()  # a large body may have left reading paused
            server_idle_s = resp.idle_s
            if server_idle_s is not None:
                # Retired before the server closes it: reused at the last moment, it
                # would meet the close (a 502 for a POST, which is never replayed).
                conn.max_idle_s = server_idle_s - 1.0 if server_idle_s >= 2 else server_idle_s / 2
            self._pool.checkin(conn)
        else:
            conn.close()
        return keep and out.request_done

    def _head_in(self, up: Stream, checked: int = 0) -> ResponseHead | None:
        """The response head, if `up.buffer` holds all of it (taken off the buffer);
        `checked`: how much of the buffer an earlier call looked at."""
        end = find_head_end(up.buffer, self._config.max_head_bytes, request=False, checked=checked)
        if end < 0:
            return None
        head = bytes(up.buffer[:end])
        del up.buffer[:end]
        return parse_response_head(head)

    async def _read_head(
        self, up: Stream, upload: asyncio.Task[None] | None, client: Stream, first: bool
    ) -> ResponseHead:
        """The next response head from `up`. A client that resets meanwhile ends the
        wait (PeerGone): its upstream connection is not held to --response-timeout. The
        `first` head's connection ending before any byte of it is an UpstreamReset."""
        timeout = self._config.response_timeout_s
        # Once a head has begun, all of it must arrive within the timeout: an upstream
        # sending a byte at a time would otherwise hold the request for 64 KiB of them.
        deadline = 0.0
        checked = 0
        # The wait for an answer begins once the request is all sent: a slow, steady
        # upload is bounded by --idle-timeout, not by this (an early answer still ends
        # it). `sent` holds when the upload ended, if it was still running here.
        sent: list[float] = []
        if upload is not None and not upload.done():
            upload.add_done_callback(lambda _: sent.append(up.loop.time()))
        while (resp := self._head_in(up, checked)) is None:
            checked = len(up.buffer)
            wait = timeout
            if not up.buffer:
                deadline = 0.0  # nothing begun (or only 1xx heads, relayed and gone)
                if sent:
                    wait = sent[0] + timeout - up.loop.time()
            elif deadline == 0.0:
                deadline = up.loop.time() + timeout
            else:
                wait = deadline - up.loop.time()
            try:
                if wait <= 0:
                    raise TimeoutError
                if client.closed:
                    raise PeerGone("client connection lost while waiting for the upstream")
                client.watcher = up
                try:
                    more = await up.fill(wait)
                finally:
                    client.watcher = None
            except PeerGone:
                raise  # the client's loss, not the upstream's: the exchange ends
            except StreamClosed as exc:
                raise_upload_error(upload)
                lost = upstream_lost(exc, mid_body=False)
                if first and not up.buffer:
                    raise UpstreamReset(lost.reason) from exc
                raise lost from exc
            except TimeoutError as exc:
                raise_upload_error(upload)
                if not up.buffer and (
                    (upload is not None and not upload.done())
                    or (sent and sent[0] + timeout > up.loop.time())
                ):
                    continue  # the wait began when the upload ended, or has not yet
                raise UpstreamTimeout(f"no response from upstream within {timeout:g} s") from exc
            if not more:
                raise_upload_error(upload)
                why = "upstream closed the connection without a response"
                raise UpstreamReset(why) if first and not up.buffer else UpstreamError(why)
        return resp

    async def _relay_response(
        self,
        client: Stream,
        up: Stream,
        req: RequestHead,
        resp: ResponseHead,
        out: Outcome,
        upload: asyncio.Task[None] | None,
        retry_after: int | None = None,
    ) -> bool:
        has_body = response_has_body(req.method, resp.status)
        decoder = response_decoder(has_body, resp.content_length, resp.chunked)
        # A 204 never carries Content-Length (RFC 9110 8.6), whatever the upstream sent.
        headers = end_to_end(resp.headers, resp.connection, drop_length=resp.status == 204)
        if retry_after is not None:
            # Every address is cooling for this host: the client hears when one is free.
            headers = replace(headers, b"retry-after", b"Retry-After", b"%d" % retry_after)
        keep = req.keep_alive and not self.closing
        to_chunked = False
        if has_body and resp.content_length is None:
            if resp.codings and req.version != b"1.1":
                raise UpstreamError(
                    "upstream used a transfer coding an HTTP/1.0 client cannot receive"
                )
            if req.version == b"1.1" and (resp.chunked or not resp.codings):
                # Codings other than chunked (gzip...) describe the body: they pass on.
                codings = b", ".join([*resp.codings, b"chunked"])
                headers.append((b"Transfer-Encoding", codings))
                to_chunked = True
            else:
                # Delimited by the close, as the upstream sent it: an HTTP/1.0 client, or
                # codings without chunked (a client seeing "gzip, chunked" here would
                # read a framing the upstream never chose).
                if resp.codings:
                    headers.append((b"Transfer-Encoding", b", ".join(resp.codings)))
                keep = False
        if upload is not None and (not upload.done() or not out.request_done):
            keep = False  # the body is not all read (or its upload failed): we close
        if not keep:
            headers.append((b"Connection", b"close"))
        elif req.version == b"1.0":
            headers.append((b"Connection", b"keep-alive"))
        head = writer.response_head(resp.status, resp.reason, headers)
        try:
            idle = self._config.idle_timeout_s
            await relay_body(client, up, decoder, to_chunked, out, head, idle, self._events)
        except UpstreamError:
            raise_upload_error(upload)  # our failed upload aborted the upstream: say so
            raise
        if isinstance(decoder, CloseDelimitedDecoder):
            up.close()
        return keep
