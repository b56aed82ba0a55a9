"""Our own exceptions: a small hierarchy, each error carrying the HTTP status it maps to.

One error contract per boundary (as h11 and httpcore do): the HTTP/1 layer raises only
`ProtocolError` (client side) or `UpstreamError` (server side), the upstream layer
translates `OSError`/`ssl.SSLError` into `UpstreamError` at one place with
`raise ... from exc`, and the server turns any `ProxyError` into a plain-text response
carrying `status` and `reason`.
"""

from __future__ import annotations


class DemuxError(Exception):
    """Base class for every error demux-proxy raises on purpose."""


class ConfigError(DemuxError):
    """A bad option, file or environment at start: reported as one line, then exit
    status `exit_status`: 2, retrying cannot fix it."""

    exit_status = 2


class HostNotReady(ConfigError):
    """What start needs of the host is not there, and may yet come: the listen port is in
    use, an egress address or interface is not (yet) on the host, as at boot before the
    cloud's agent assigned secondary addresses. Exit status 75 (EX_TEMPFAIL), which a
    service manager may retry (deploy/demux-proxy.service does)."""

    exit_status = 75


class ServeError(DemuxError):
    """Serving, once started, ended in failure (workers kept dying): exit status 1, so
    that a service manager restarts the proxy (systemd's Restart=on-failure)."""


class ProxyError(DemuxError):
    """An error answered to the client with `status` and a plain-text `reason`."""

    status = 500

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class ProtocolError(ProxyError):
    """The client sent something that is not HTTP/1.1 as RFC 9112 defines it.

    The connection is closed after the answer: once framing is in doubt, nothing that
    follows on that connection can be trusted (RFC 9112 section 11.2, request smuggling).
    """

    status = 400


class BodyCut(ProtocolError):
    """The client's connection ended before the body it announced did. Answered 400 (a
    client that only half-closed reads it), and counted as the client's going away
    (metrics kind `client_lost`): most often it gave up (a timeout, Ctrl-C)."""


class Forbidden(ProxyError):
    """The destination is refused by policy (private, loopback, link-local...)."""

    status = 403


class LoopDetected(ProxyError):
    """The request would come back to this proxy (RFC 8470's 508 Loop Detected)."""

    status = 508


class Unavailable(ProxyError):
    """No egress address may send to the host in time (budgets, cooldowns): 503."""

    status = 503

    def __init__(self, reason: str, *, retry_after_s: int) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class UpstreamError(ProxyError):
    """The upstream refused, reset, failed TLS verification or answered malformed HTTP."""

    status = 502


class UpstreamReset(UpstreamError):
    """The upstream ended a connection (reset or closed) before any byte of its answer.
    On a connection just opened from an address, that is how many sites refuse an
    address they have banned: the (address, host) pair cools, and an idempotent request
    without a body goes again from another address."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer in time."""

    status = 504


class EgressFailure(UpstreamError):
    """The egress address itself failed (gone from the host, unroutable, cannot bind):
    the scheduler rests it and the request may go from another."""


class EgressUnreachable(EgressFailure):
    """The kernel has no route from this egress address to the host (ENETUNREACH,
    EHOSTUNREACH). It may be the address (a missing source route), but it may as well be
    the destination a client named: as a timeout does, it cools the (address, host) pair,
    so that no client can take an address away from every other by naming one."""


class EgressRefused(EgressUnreachable):
    """The host reset a connection from this egress address before a request was sent
    (mid TLS handshake): how many sites refuse an address they have banned. The pair
    cools, as for no route, and the request goes from another address."""


class EgressTimeout(EgressFailure, UpstreamTimeout):
    """A connect (TCP or TLS handshake) from this egress address to the host timed out.

    Most often the destination's doing (down, blackholing, or tarpitting this address),
    so the (address, host) pair cools down, not the address: one unreachable host must
    not take addresses away from every other. The request may go from another address.
    """

    status = 504


class NoEgressLeft(UpstreamError):
    """Every egress address was tried (or excluded) for this request."""


# Connection-level conditions of `stream.Stream`, not answers to a client. They live
# here, outside the compiled modules: mypyc cannot compile a subclass of ConnectionError.
class StreamClosed(ConnectionError):
    """The peer went away (reset or closed) while we still needed it."""


class TLSTruncated(StreamClosed):
    """A TLS peer ended the TCP connection without close_notify: whatever the close was
    to delimit is cut short (RFC 9112 9.8), though nothing was reset."""


class SinkClosed(StreamClosed):
    """During `Stream.splice`, the stream we were writing to went away."""


class SinkStalled(SinkClosed):
    """The stream we were writing to took nothing for the idle timeout (`Stream.drain`,
    `Stream.splice`): it is given up as if it had gone."""


class PeerGone(StreamClosed):
    """While we waited on this stream, the one it serves (`Stream.watcher`) went away:
    the client of an upstream wait reset its connection."""


class SpliceUnavailable(Exception):
    """`Stream.splice` could not start (no descriptors to spare): nothing was moved, the
    caller copies instead."""
