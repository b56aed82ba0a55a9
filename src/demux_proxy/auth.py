"""Who may use the proxy: Basic Proxy-Authorization and client source networks. Pure.

`ClientPolicy.from_options` turns `--auth USER:PASS`, `--auth-file FILE` and
`--allow-client CIDR` into one immutable policy (ConfigError on anything wrong); the
server asks `client_allowed(peer address)` once per connection and `check(headers)` per
request, and answers `challenge_response()` (407) when `check` returns None.

Credentials follow RFC 9110 section 11.7.2 and RFC 7617: `Proxy-Authorization: Basic
base64(user-id ":" password)`, the scheme case-insensitive, the base64 strict and
canonical, the user-id without ':' (the password may hold one), both UTF-8 as the
challenge announces with `charset="UTF-8"`.

Secrets are never logged, never in an exception message and never in a repr. Plain
passwords are compared as SHA-256 digests with `hmac.compare_digest`, so neither content
nor length leaks through timing. bcrypt and argon2 hashes cost about 100 ms per check by
design, so successful checks are remembered in a small LRU keyed by an HMAC-SHA-256 of
user and password under a per-policy random key: the cache holds no password, nor an
unsalted digest of one that could be attacked offline. Failures are never cached. Once
any user has a hash, every refusal of offered credentials costs one hash verification
(unknown user, wrong plain password, over-long password alike), so timing does not tell
which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from demux_proxy.errors import ConfigError
from demux_proxy.http1.headers import Headers
from demux_proxy.http1.writer import response_head

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_REALM = "demux-proxy"
# Successful hash verifications remembered: one entry per (user, password) in use.
DEFAULT_CACHE_SIZE = 1024

SESSION_MARK = "-session-"
SESSION_PREFIX = "session-"
_TTL = re.compile(r"^(?P<id>.+)-ttl-(?P<ttl>[1-9][0-9]{0,8})$")

# bcrypt: $2a$, $2b$ or $2y$, a two-digit cost 04..31, then 22 salt + 31 hash characters.
_BCRYPT = re.compile(r"^\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_BCRYPT_MAX_PASSWORD = 72  # bytes; bcrypt refuses (5.0) or ignores (older) the rest
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")
# What looks like a modular-crypt or LDAP-style hash ($apr1$, $1$, $5$, $6$, $2x$, {SHA}):
# refused rather than silently taken as a literal password.
_OTHER_HASH = re.compile(r"^(?:\$[0-9A-Za-z-]{1,16}\$|\{[A-Z0-9-]{2,16}\})")

_BASIC = b"basic"
_PROXY_AUTHORIZATION = b"proxy-authorization"
_DUMMY_DIGEST = hashlib.sha256(b"demux-proxy: no such user").digest()

Kind = Literal["plain", "bcrypt", "argon2"]


@dataclass(frozen=True, slots=True)
class Verifier:
    """How one user's password is checked: a SHA-256 digest (plain) or a bcrypt/argon2 hash."""

    kind: Kind
    secret: bytes = field(repr=False)

    @property
    def slow(self) -> bool:
        return self.kind != "plain"


@dataclass(frozen=True, repr=False)
class Credentials:
    """User name -> Verifier, read-only. The repr names neither users' secrets nor users."""

    users: Mapping[str, Verifier] = field(default_factory=lambda: MappingProxyType({}))

    def __repr__(self) -> str:
        return f"Credentials({len(self.users)} users)"


class ClientPolicy:
    """Which clients may use the proxy: source networks, then Basic credentials.

    `check` may be called from executor threads (the LRU is locked), so a server can move
    a slow bcrypt/argon2 verification off its event loop when `would_block` says so.
    With a hashed user configured, a refusal also verifies the offered password against
    `_dummy` (see `_dummy_verifier`), so an unknown name costs what a known one does.
    """

    __slots__ = (
        "_cache",
        "_cache_key",
        "_cache_size",
        "_dummy",
        "_lock",
        "auth_required",
        "credentials",
        "networks",
        "restricted",
    )

    def __init__(
        self,
        credentials: Credentials | None = None,
        networks: Sequence[IPNetwork] = (),
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.credentials = credentials if credentials is not None else Credentials()
        self.networks: tuple[IPNetwork, ...] = tuple(networks)
        self.auth_required: bool = bool(self.credentials.users)
        self.restricted: bool = self.auth_required or bool(self.networks)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._cache_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._dummy = _dummy_verifier(self.credentials.users.values())

    @classmethod
    def from_options(
        cls, auth: Sequence[str], auth_file: Path | None, allow_client: Sequence[str]
    ) -> ClientPolicy:
        """Build the policy from the `start` options. Raises ConfigError, never echoing a secret."""
        users: dict[str, Verifier] = {}
        origin: dict[str, str] = {}
        for index, item in enumerate(auth, 1):
            where = f"--auth #{index}"
            user, sep, password = item.partition(":")
            if not sep:
                raise ConfigError(f"{where}: expected USER:PASS")
            _add(users, origin, user, _plain(password, where), where)
        if auth_file is not None:
            for where, user, verifier in _read_auth_file(auth_file):
                _add(users, origin, user, verifier, where)
        networks = [_parse_network(text) for text in allow_client]
        return cls(Credentials(MappingProxyType(users)), networks)

    def __repr__(self) -> str:
        nets = ", ".join(str(n) for n in self.networks)
        return f"ClientPolicy(users={len(self.credentials.users)}, allow_client=[{nets}])"

    # --- source address -------------------------------------------------------------

    def client_allowed(self, address: str) -> bool:
        """Is a client at `address` (a peername host) inside an `--allow-client` network?

        True when none was given. An IPv4-mapped IPv6 peer (a dual-stack listener) is
        judged as its IPv4 address; an IPv6 zone (`%eth0`) is ignored; anything that is
        not an IP address is refused.
        """
        if not self.networks:
            return True
        ip = _client_ip(address)
        if ip is None:
            return False
        return any(ip in net for net in self.networks if net.version == ip.version)

    # --- credentials ----------------------------------------------------------------

    def check(self, headers: Headers) -> str | None:
        """The authenticated user (the name before any `-session-`), or None.

        None when the Proxy-Authorization field is missing, repeated, not Basic, not
        strict base64, not UTF-8, or names an unknown user or a wrong password.
        Always "" when no credentials are configured.
        """
        if not self.auth_required:
            return ""
        offered = self._offered(headers)
        if offered is None:
            return None
        user, secret, verifier = offered
        if verifier is None:
            if self._dummy is None:
                # Same work as a plain user, so an unknown name is not told apart by timing.
                hmac.compare_digest(hashlib.sha256(secret).digest(), _DUMMY_DIGEST)
            else:
                self._refusal_cost(secret)
            return None
        if verifier.kind == "plain":
            if _plain_matches(verifier, secret):
                return user
            self._refusal_cost(secret)
            return None
        key = self._key(user, secret)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return user
        if not _verify_hash(verifier, secret):
            return None
        with self._lock:
            self._cache[key] = None
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return user

    def would_block(self, headers: Headers) -> bool:
        """Would `check` run a bcrypt/argon2 verification (~100 ms) rather than a cached one?

        Lets the server call `check` in an executor only when it is slow: a hashed user's
        first success or any failure, and, once a hashed user exists, the dummy
        verification of an unknown user or of a plain user's wrong password.
        """
        if not self.auth_required:
            return False
        offered = self._offered(headers)
        if offered is None:
            return False
        user, secret, verifier = offered
        if verifier is None:
            return self._dummy is not None
        if not verifier.slow:
            return self._dummy is not None and not _plain_matches(verifier, secret)
        key = self._key(user, secret)
        with self._lock:
            return key not in self._cache

    def _offered(self, headers: Headers) -> tuple[str, bytes, Verifier | None] | None:
        """(user, password bytes, that user's verifier or None) from the credentials the
        request offers, or None when it offers no well-formed Basic credentials."""
        basic = basic_credentials(headers)
        if basic is None:
            return None
        username, password = basic
        user = split_session(username)[0]
        return user, password.encode("utf-8"), self.credentials.users.get(user)

    def _refusal_cost(self, secret: bytes) -> None:
        """Verify `secret` against the dummy only to spend the time a hashed user's refusal
        takes. The result is ignored: the dummy is another user's hash, and a match under
        this name must never authenticate."""
        if self._dummy is not None:
            _verify_hash(self._dummy, secret)

    def _key(self, user: str, secret: bytes) -> bytes:
        message = user.encode("utf-8") + b":" + secret
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()


def basic_credentials(headers: Headers) -> tuple[str, str] | None:
    """(user-id, password) from the one Basic Proxy-Authorization field, or None.

    RFC 7617: `Basic` (any case), one or more spaces, a token68 in canonical base64
    (padding required, nothing outside the alphabet), decoding to UTF-8 `user-id:password`
    with a non-empty user-id; the first ':' splits them. A repeated field is refused.
    Also what the server reads a `session-<id>` from when auth is off.
    """
    value: bytes | None = None
    for name, field_value in headers:
        if name.lower() == _PROXY_AUTHORIZATION:
            if value is not None:
                return None
            value = field_value
    if value is None:
        return None
    scheme, _, token = value.strip(b" \t").partition(b" ")
    if scheme.lower() != _BASIC:
        return None
    token = token.lstrip(b" ")
    if not token:
        return None
    try:
        decoded = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded) != token:  # non-zero padding bits, missing padding...
        return None
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None
    username, sep, password = text.partition(":")
    if not sep or not username:
        return None
    return username, password


def challenge_response(realm: str = DEFAULT_REALM, *, close: bool = False) -> bytes:
    """A complete `407 Proxy Authentication Required` asking for Basic credentials.

    Framed by Content-Length and, unless `close`, without `Connection: close`: a client
    may answer the challenge on the same connection (RFC 9110 11.7.1), as curl does.
    `close` is for a request whose body was not read: the connection ends after it, and
    the answer says so (RFC 9112 9.6).
    """
    return _challenge(realm, close)


@lru_cache(maxsize=8)
def _challenge(realm: str, close: bool) -> bytes:
    if any(unicodedata.category(c) == "Cc" for c in realm):
        raise ValueError("realm must not contain control characters")
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8")
    body = b"Proxy authentication required\n"
    headers: Headers = [
        (b"Proxy-Authenticate", b'Basic realm="' + quoted + b'", charset="UTF-8"'),
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return response_head(407, b"Proxy Authentication Required", headers) + body


def split_session(username: str) -> tuple[str, str | None, int | None]:
    """(user, session id, ttl seconds) from `<user>-session-<id>[-ttl-<seconds>]`.

    `session-<id>[-ttl-<seconds>]` alone gives user "" (the form used when auth is off).
    The user is what precedes the first `-session-`; a ttl is 1 to 9 digits, not 0, else
    it stays part of the id. An empty id is no session: the name is returned unchanged,
    so `alice-session-` authenticates as nobody rather than silently as alice.
    """
    if username.startswith(SESSION_PREFIX):
        user, rest = "", username[len(SESSION_PREFIX) :]
    else:
        user, sep, rest = username.partition(SESSION_MARK)
        if not sep:
            return username, None, None
    if not rest:
        return username, None, None
    match = _TTL.match(rest)
    if match is None:
        return user, rest, None
    return user, match["id"], int(match["ttl"])


def public_listen_refusal(listen_host: str, policy: ClientPolicy) -> str | None:
    """Why `start` must refuse to listen on `listen_host`, or None.

    Listening beyond loopback (127.0.0.0/8, ::1, localhost) with neither credentials nor
    `--allow-client` would run an open proxy. `--allow-client 0.0.0.0/0` is the explicit
    way to do that on purpose.
    """
    if policy.restricted or is_loopback(listen_host):
        return None
    shown = listen_host or "every address"
    return (
        f"refusing to listen on {shown} without access control (an open proxy is abused "
        "quickly): add --auth USER:PASS, --auth-file FILE or --allow-client CIDR, "
        "or listen on 127.0.0.1"
    )


def start_refusal(
    listen: tuple[str, int],
    admin: tuple[str, int] | None,
    policy: ClientPolicy,
    ca_cert: Path | None,
    ca_key: Path | None,
) -> str | None:
    """Why `start` must refuse these settings taken together, each fine on its own, or
    None (`start` and `config` both ask, so they say it in the same words): an open
    listener; an admin endpoint beyond loopback, which asks for the proxy's credentials,
    without any; an admin endpoint on the proxy's own port; half a CA."""
    refusal = public_listen_refusal(listen[0], policy)
    if refusal is not None:
        return refusal
    if admin is not None and _same_port(listen, admin):
        # With --workers > 1 every listener has SO_REUSEPORT, and the kernel would share
        # the clients out between the proxy and the admin endpoint.
        return f"--admin {admin[0]}:{admin[1]} is the --listen address: give it a port of its own"
    if admin is not None and not policy.auth_required and not is_loopback(admin[0]):
        return (
            f"--admin {admin[0]}:{admin[1]} is not loopback: "
            "set --auth or --auth-file, whose credentials it will then ask for"
        )
    if (ca_cert is None) != (ca_key is None):
        return "--ca-cert and --ca-key go together: give both or neither"
    return None


# --- helpers ----------------------------------------------------------------------------


def _same_port(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether listening on both would take one port twice: the same port, not 0 (any
    free one), on the same address or where either is the wildcard."""
    if a[1] == 0 or a[1] != b[1]:
        return False
    one, other = _ip(a[0]), _ip(b[0])
    return one == other or one.is_unspecified or other.is_unspecified


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)


def _add(
    users: dict[str, Verifier], origin: dict[str, str], user: str, verifier: Verifier, where: str
) -> None:
    problem = _user_problem(user)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    if user in users:
        raise ConfigError(f"{where}: user {user!r} is already defined ({origin[user]})")
    users[user] = verifier
    origin[user] = where


def _user_problem(user: str) -> str | None:
    if not user:
        return "empty user name"
    if any(unicodedata.category(c) == "Cc" for c in user):
        return "user name contains a control character"
    if user != user.strip():
        return "user name has leading or trailing whitespace"
    if SESSION_MARK in user or user.startswith(SESSION_PREFIX):
        return f"user name may not contain {SESSION_MARK!r} or start with {SESSION_PREFIX!r}"
    return None


def _plain(password: str, where: str) -> Verifier:
    if not password:
        raise ConfigError(f"{where}: empty password")
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise ConfigError(f"{where}: password contains a control character")
    return Verifier("plain", hashlib.sha256(password.encode("utf-8")).digest())


def _read_auth_file(path: Path) -> Iterable[tuple[str, str, Verifier]]:
    """(where, user, verifier) per entry line of `path`. Messages name path:line only."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --auth-file {path}: {exc.strerror or exc}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    entries: list[tuple[str, str, Verifier]] = []
    for number, raw in enumerate(data.splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not valid UTF-8") from None
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        if not sep:
            raise ConfigError(f"{where}: malformed line, expected user:password or user:hash")
        entries.append((where, user, _file_verifier(secret, where)))
    return entries


def _file_verifier(secret: str, where: str) -> Verifier:
    candidate = secret.strip()
    if candidate.startswith(("$2a$", "$2b$", "$2y$")):
        if not _BCRYPT.match(candidate):
            raise ConfigError(f"{where}: malformed bcrypt hash")
        return Verifier("bcrypt", candidate.encode("ascii"))
    if candidate.startswith(_ARGON2_PREFIXES):
        import argon2  # imported only where an auth file holds such hashes (1.3 MB of RSS)

        try:
            argon2.extract_parameters(candidate)
        except argon2.exceptions.InvalidHashError:
            raise ConfigError(f"{where}: malformed argon2 hash") from None
        return Verifier("argon2", candidate.encode("ascii"))
    if _OTHER_HASH.match(candidate):
        raise ConfigError(
            f"{where}: unsupported password hash (bcrypt $2a$/$2b$/$2y$ and argon2 are)"
        )
    return _plain(secret, where)


def _dummy_verifier(verifiers: Iterable[Verifier]) -> Verifier | None:
    """The hashed verifier refusals are checked against, or None when no user is hashed.

    A configured user's own (kind and secret), so start-up hashes nothing and a refusal
    costs what a real verification does: the costliest bcrypt by its cost field (the
    first of equals), else the first argon2, so an unknown name is never the quickest
    answer. Mixed costs still tell users' costs apart; one cost for all hides everything.
    """
    hashed = [v for v in verifiers if v.slow]
    bcrypts = [v for v in hashed if v.kind == "bcrypt"]
    if bcrypts:
        return max(bcrypts, key=_bcrypt_cost)
    return hashed[0] if hashed else None


def _bcrypt_cost(verifier: Verifier) -> int:
    cost = verifier.secret[4:6]  # $2b$12$...
    return int(cost) if cost.isdigit() else 0


def _plain_matches(verifier: Verifier, secret: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha256(secret).digest(), verifier.secret)


def _verify_hash(verifier: Verifier, secret: bytes) -> bool:
    if verifier.kind == "bcrypt":
        import bcrypt

        try:
            if len(secret) > _BCRYPT_MAX_PASSWORD:
                # Refused, never truncated; still hashed (the result ignored) so that a
                # long password costs what any other refusal does.
                bcrypt.checkpw(secret[:_BCRYPT_MAX_PASSWORD], verifier.secret)
                return False
            return bcrypt.checkpw(secret, verifier.secret)
        except ValueError:  # a hash bcrypt cannot read: refused
            return False
    import argon2

    try:
        # verify() reads the parameters from each hash: a default hasher does for all.
        return argon2.PasswordHasher().verify(verifier.secret, secret)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _parse_network(text: str) -> IPNetwork:
    value = text.strip()
    try:
        net: IPNetwork = ipaddress.ip_network(value)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"--allow-client wants an address or CIDR, got {text!r}") from None
        raise ConfigError(
            f"--allow-client {value} has host bits set (did you mean {loose}?)"
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d/104 is the IPv4 network a.b.c.d/8
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _client_ip(address: str) -> IPAddress | None:
    try:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(host: str) -> bool:
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.lower().rstrip(".") == "localhost":
        return True
    ip = _client_ip(name)
    return ip is not None and ip.is_loopback


def session_of(headers: Headers) -> str | None:
    """The sticky-session key named in the proxy user name, or None.

    With a `-ttl-<seconds>` part the key also carries the current TTL window, so the
    session may move to another address at most once per TTL (the mapping is stateless:
    every worker computes the same answer without sharing anything).
    """
    basic = basic_credentials(headers)
    if basic is None:
        return None
    _, session, ttl = split_session(basic[0])
    if not session:
        return None
    if ttl:
        return f"{session}@{int(time.time() // ttl)}"
    return session
