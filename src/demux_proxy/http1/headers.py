"""Header lists and the hop-by-hop rules of RFC 9110 section 7.6.1.

Headers stay a list of (name, value) byte pairs: order and case pass through unchanged,
as the issue asks, and bytes avoid a decode/encode per field on the hot path.
"""

from __future__ import annotations

from typing import Final

Headers = list[tuple[bytes, bytes]]

# A bounded memo (no state beyond what a call would compute again): Connection values
# repeat from request to request ("keep-alive", "close"), and one dict lookup costs less
# than splitting, stripping and lower-casing them again. Past the bound, nothing is added.
_TOKENS: Final[dict[bytes, frozenset[bytes]]] = {}
_MEMO_MAX: Final = 1024
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()

# Lengths compared as native ints (the module is compiled): a set of boxed ints would
# cost a hash lookup per field. Asserted below against the names they stand for.
_CONNECTION_LEN: Final = 10
_PROXY_CONNECTION_LEN: Final = 16

# Fields that describe one connection, never the message (RFC 9110 7.6.1), plus the
# framing fields we always recompute (Transfer-Encoding, RFC 9112 6.1) and the proxy's
# own credentials (Proxy-Authorization is consumed by the proxy it is addressed to).
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",  # (Trailer is end-to-end: RFC 9110 6.6.2, the trailers pass on)
        b"transfer-encoding",
        b"upgrade",
        # Our own controls (sticky session, pinned egress): for the proxy, never upstream.
        b"x-demux-session",
        b"x-demux-egress",
    }
)


def _tokens(value: bytes) -> frozenset[bytes]:
    """The lower-cased tokens of one Connection value, memoized."""
    tokens = _TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(t for t in (part.strip().lower() for part in value.split(b",")) if t)
        if len(_TOKENS) < _MEMO_MAX:
            _TOKENS[value] = tokens
    return tokens


# Connection tokens that name no field beyond HOP_BY_HOP: "close", "keep-alive"...
HOP_BY_HOP_TOKENS: Final[frozenset[bytes]] = HOP_BY_HOP | {b"close"}

# Fields a Connection token never removes: the message's own framing and its Host. A
# sender that names them there ("Connection: content-length") would otherwise have us
# forward a body without its length, which the next hop reads as the start of another
# message (request smuggling, RFC 9112 11.2), or a request without a Host.
_KEPT_DESPITE_TOKENS: Final[frozenset[bytes]] = frozenset({b"content-length", b"host"})


def _maybe_hop(size: int) -> bool:
    """Whether a field name of `size` bytes can be hop-by-hop or Content-Length.

    The lengths of those names are 2, 7, 10 and 14 to 19 (asserted below); a name of any
    other length is forwarded without being lower-cased.
    """
    return size == 2 or size == 7 or size == 10 or 14 <= size <= 19


assert all(_maybe_hop(len(n)) for n in HOP_BY_HOP | {b"content-length"})
assert (len(b"connection"), len(b"proxy-connection")) == (_CONNECTION_LEN, _PROXY_CONNECTION_LEN)


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased tokens of every Connection (and legacy Proxy-Connection) field."""
    tokens = _NO_TOKENS
    for name, value in headers:
        size = len(name)
        if size != _CONNECTION_LEN and size != _PROXY_CONNECTION_LEN:
            continue  # spares a lower() for nearly every field
        lname = name.lower()
        if lname == b"connection" or lname == b"proxy-connection":
            tokens = tokens | _tokens(value) if tokens else _tokens(value)
    return tokens


def response_connection(headers: Headers) -> tuple[frozenset[bytes], float | None]:
    """`connection_tokens`, and the `timeout=N` of a Keep-Alive field (RFC 2068 19.7.1,
    as Apache, Node and others send it: how many seconds the server keeps the connection
    idle; None without one that reads as whole seconds), in one pass: the field names
    are both 10 bytes long, the one length lowered."""
    tokens = _NO_TOKENS
    idle_s: float | None = None
    for name, value in headers:
        size = len(name)
        if size != _CONNECTION_LEN and size != _PROXY_CONNECTION_LEN:
            continue
        lname = name.lower()
        if lname == b"connection" or lname == b"proxy-connection":
            tokens = tokens | _tokens(value) if tokens else _tokens(value)
        elif lname == b"keep-alive":
            idle_s = _keep_alive_timeout(value)
    return tokens, idle_s


def _keep_alive_timeout(value: bytes) -> float | None:
    for param in value.split(b","):
        key, _, number = param.partition(b"=")
        if key.strip().lower() == b"timeout":
            number = number.strip().strip(b'"')
            if number.isdigit() and len(number) <= 6:
                return float(number)
    return None


def end_to_end(headers: Headers, tokens: frozenset[bytes], *, drop_length: bool) -> Headers:
    """The fields a proxy forwards: everything but hop-by-hop ones and those Connection
    names (except Content-Length and Host, which no Connection token removes).

    `drop_length` removes Content-Length too, for messages the caller re-frames.
    """
    out: Headers = []
    if not tokens <= HOP_BY_HOP_TOKENS:  # Connection names a field of its own
        named = tokens - _KEPT_DESPITE_TOKENS
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in named:
                continue
            if drop_length and lname == b"content-length":
                continue
            out.append((name, value))
        return out
    # The usual case: only fields of fixed names go, and most fields have a length none
    # of those names has (a len() spares the lower-casing).
    for name, value in headers:
        if _maybe_hop(len(name)):
            lname = name.lower()
            if lname in HOP_BY_HOP or (drop_length and lname == b"content-length"):
                continue
        out.append((name, value))
    return out


def forwarded_trailers(trailers: Headers) -> Headers:
    """The trailer fields a proxy passes on: what `end_to_end` keeps of a head, less the
    fields a trailer must not carry (RFC 9110 6.5.1: framing, routing). Proxy-Authorization
    (hop-by-hop) never reaches the upstream from a trailer either."""
    if not trailers:
        return trailers
    kept = end_to_end(trailers, _NO_TOKENS, drop_length=True)
    return [(n, v) for n, v in kept if len(n) != 4 or n.lower() != b"host"]


def get(headers: Headers, lname: bytes) -> bytes | None:
    """The first value of the field named `lname` (lower case), or None."""
    # Comparing lengths first spares a lower() (an allocation) for nearly every field.
    size = len(lname)
    for name, value in headers:
        if len(name) == size and name.lower() == lname:
            return value
    return None


def websocket_upgrade(headers: Headers) -> bytes | None:
    """The WebSocket protocol among the Upgrade field's, as the client wrote it, or None.
    The only upgrade relayed: after any other (h2c...) the connection would be a blind
    relay whose requests nobody rotates, judges or logs."""
    value = get(headers, b"upgrade")
    if value is None:
        return None
    for token in value.split(b","):
        token = token.strip()
        if token.partition(b"/")[0].lower() == b"websocket":
            return token
    return None


def replace(headers: Headers, lname: bytes, name: bytes, value: bytes) -> Headers:
    """Set `name: value` at the position of the first `lname` field, dropping later ones."""
    out: Headers = []
    done = False
    size = len(lname)
    for item in headers:
        if len(item[0]) == size and item[0].lower() == lname:
            if not done:
                out.append((name, value))
                done = True
            continue
        out.append(item)
    if not done:
        out.insert(0, (name, value))
    return out
