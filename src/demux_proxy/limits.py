"""Per-host request rates, server-requested cooldowns and sticky sessions: pure decisions.

Nothing here awaits, opens a socket or reads a clock: every time-related call takes `now`
(monotonic seconds, or epoch seconds for `parse_retry_after`) so callers inject the clock and
tests drive it. State lives in small objects the caller owns (no module state).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

from demux_proxy.errors import ConfigError

__all__ = [
    "Cooldowns",
    "HostRate",
    "RateRules",
    "TokenBucket",
    "bucket_wait_s",
    "parse_host_rate",
    "parse_retry_after",
    "refilled",
    "session_egress",
    "spent_late",
    "taken",
]

RETRY_AFTER_CAP_S: Final = 3600.0
# A probe's answer is awaited this long before another request may probe; meanwhile a
# queue looks again every PROBE_POLL_S (the answer wakes nobody: it is looked for).
PROBE_LEASE_S: Final = 5.0
PROBE_POLL_S: Final = 0.05
_UNITS: Final = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)/([a-z]+)")
_NAME: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class HostRate:
    pattern: str  # "api.example.com" or "*.example.com" (lower case, no trailing dot)
    rate_per_s: float
    burst: int = 1  # bucket size


def _norm(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _ipv6(text: str) -> str | None:
    """`text` ("::1", "[0::1]") as a request's host shows an IPv6 literal, canonical; None
    when it is none (a name with a port, say)."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def parse_host_rate(text: str) -> HostRate:
    """Parse a "--host-rate HOST=RATE[:BURST]" value, e.g. "*.example.com=300/min:10"."""

    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"--host-rate {text!r}: {what} (expected HOST=RATE[:BURST], e.g. "
            f"'api.example.com=5/s' or '*.example.com=300/min:10')"
        )

    host, eq, spec = text.strip().partition("=")
    if not eq:
        raise bad("missing '='")
    pattern = _norm(host)
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if ":" in pattern:
        literal = _ipv6(pattern)
        if literal is None:  # "api.example.com:443" would never match: hosts have no port
            raise bad(f"bad host {host.strip()!r}: a budget is per host, whatever the port")
        pattern = literal
    elif not _NAME.fullmatch(name) or ".." in name:
        raise bad(f"bad host {host.strip()!r}")
    rate_text, colon, burst_text = spec.strip().lower().partition(":")
    m = _RATE.fullmatch(rate_text.strip())
    if m is None:
        raise bad(f"bad rate {rate_text.strip()!r}")
    if m.group(2) not in _UNITS:
        raise bad(f"unknown unit {m.group(2)!r} (use s, min or h)")
    rate = float(m.group(1)) / _UNITS[m.group(2)]
    if not (rate > 0 and math.isfinite(rate)):
        raise bad("rate must be positive")
    burst = 1
    if colon:
        if not burst_text.strip().isdigit() or int(burst_text) < 1:
            raise bad(f"burst {burst_text.strip()!r} is not a positive integer")
        burst = int(burst_text)
    return HostRate(pattern, rate, burst)


class RateRules:
    """Which `HostRate` applies to a host: the exact name, else the longest wildcard suffix."""

    def __init__(self, rules: Sequence[HostRate]) -> None:
        self._exact: dict[str, HostRate] = {}
        self._suffix: dict[str, HostRate] = {}  # "example.com" for "*.example.com"
        for rule in rules:
            pattern = _norm(rule.pattern)
            table, key = (
                (self._suffix, pattern[2:]) if pattern.startswith("*.") else (self._exact, pattern)
            )
            if key in table:
                raise ConfigError(f"--host-rate {rule.pattern!r} is given twice")
            table[key] = rule

    def match(self, host: str) -> HostRate | None:
        name = _norm(host)
        if ":" in name:  # an IPv6 literal, as the rule's was: canonical ("0::1" is "::1")
            name = _ipv6(name) or name
        rule = self._exact.get(name)
        if rule is not None or not self._suffix:
            return rule
        labels = name.split(".")
        for i in range(1, len(labels)):  # longest proper suffix first
            rule = self._suffix.get(".".join(labels[i:]))
            if rule is not None:
                return rule
        return None

    def __bool__(self) -> bool:
        return bool(self._exact or self._suffix)


BUCKET_EPS: Final = 1e-9  # float slack: waiting exactly wait_s() always lets take() succeed


def refilled(tokens: float, last: float, now: float, rate_per_s: float, burst: int) -> float:
    """A token bucket's tokens at `now`, from `tokens` at `last` (a clock that goes back
    adds nothing). The one refill rule, for `TokenBucket` and buckets kept elsewhere."""
    if now > last:
        return min(burst, tokens + (now - last) * rate_per_s)
    return tokens


def taken(tokens: float) -> float | None:
    """A bucket's tokens after giving one, or None when it holds none to give."""
    return max(0.0, tokens - 1.0) if tokens >= 1.0 - BUCKET_EPS else None


def spent_late(tokens: float, burst: int) -> float:
    """A bucket's tokens once the token it gave a while ago is spent only now (the request
    waited for a new connection): what it would hold had it given the token now. The
    refill since then is kept but for what the cap would have cut: with a burst of 1,
    the next token comes 1/rate after the request left, not after it was admitted."""
    return min(tokens, burst - 1.0)


def bucket_wait_s(tokens: float, rate_per_s: float) -> float:
    """Seconds until a bucket holding `tokens` has one to give."""
    missing = 1.0 - tokens
    return 0.0 if missing <= BUCKET_EPS else missing / rate_per_s


class TokenBucket:
    """rate_per_s tokens per second, at most `burst`; starts full."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)) or burst < 1:
            raise ValueError("TokenBucket needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        self._tokens = refilled(self._tokens, self._last, now, self.rate_per_s, self.burst)
        self._last = max(self._last, now)

    def take(self, now: float) -> bool:
        self._refill(now)
        left = taken(self._tokens)
        if left is None:
            return False
        self._tokens = left
        return True

    def wait_s(self, now: float) -> float:
        self._refill(now)
        return bucket_wait_s(self._tokens, self.rate_per_s)

    def spend_late(self, now: float) -> None:
        """The token taken earlier is spent only at `now` (see `spent_late`)."""
        self._refill(now)
        self._tokens = spent_late(self._tokens, self.burst)


def parse_retry_after(value: bytes | str | None, now_epoch: float) -> float | None:
    """Seconds to wait from a Retry-After value (RFC 9110 10.2.3), in [0, 3600]; None if unusable.

    `now_epoch` is wall-clock seconds (an HTTP-date is absolute)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return min(float(int(text)), RETRY_AFTER_CAP_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no claim about local time
        when = when.replace(tzinfo=UTC)
    return min(max(when.timestamp() - now_epoch, 0.0), RETRY_AFTER_CAP_S)


@dataclass(frozen=True, slots=True)
class _Cool:
    until: float
    strikes: int
    probe: float = 0.0  # until when the one request sent since the cooldown ended is out


def _keys(egress: str, host: str, port: int) -> tuple[tuple[str, str, int], ...]:
    """The entries that hold for (host, port): the host's, for every port, and the port's."""
    name = _norm(host)
    return ((egress, name, 0), (egress, name, port)) if port else ((egress, name, 0),)


class Cooldowns:
    """(egress address, host) pairs the server told to back off (429/503/ban status), and
    (egress address, host, port) triples a connect to that port failed on.

    A cooling status speaks for the site (its limit is per client address, whatever the
    port): it cools the pair for every port (`port` 0). A network fault (timeout, no
    route, reset before any answer) speaks for one port: a firewalled 8443 leaves 443 to
    the address. An address is cooling for (host, port) when either is.

    Strikes outlive the cooldown by `max_s` so that backoff keeps growing while a server
    keeps refusing; `prune` forgets a pair after that (or once expired with no strikes).

    With `probe_s`, a cooldown that ends lets one request through (`sent`), the probe:
    until its answer (`ok`, `cool`, `settled`) or `probe_s`, the pair still cools, so
    that the requests queued for it do not all meet the server's refusal together.
    """

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        max_s: float = 300.0,
        rng: random.Random | None = None,
        max_entries: int = 100_000,
        probe_s: float | None = None,
    ) -> None:
        if not (0 < base_s <= max_s) or max_entries < 1:
            raise ValueError("Cooldowns needs 0 < base_s <= max_s and max_entries >= 1")
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng if rng is not None else random.Random()
        self._max_entries = max_entries
        self._probe_s = probe_s
        # insertion order = last update
        self._pairs: dict[tuple[str, str, int], _Cool] = {}

    def cool(
        self, egress: str, host: str, now: float, retry_after_s: float | None, port: int = 0
    ) -> float:
        """Start (or extend) a cooldown; returns the seconds the pair now stays cooling."""
        key = (egress, _norm(host), port)
        old = self._pairs.pop(key, None)
        strikes = (old.strikes if old is not None else 0) + 1
        if retry_after_s is not None:
            delay = max(retry_after_s, 0.0)
        else:
            full = min(self.max_s, self.base_s * 2.0 ** min(strikes - 1, 64))
            delay = full * self._rng.uniform(0.5, 1.0)
        until = now + delay if old is None else max(old.until, now + delay)
        self._pairs[key] = _Cool(until, strikes)
        while len(self._pairs) > self._max_entries:
            del self._pairs[next(iter(self._pairs))]
        return until - now

    def cooling_by_egress(self, now: float) -> dict[str, int]:
        """How many hosts each address is cooling for now (for metrics and /status)."""
        hosts: dict[str, set[str]] = {}
        for (egress, host, _), cool in self._pairs.items():
            if cool.until > now:
                hosts.setdefault(egress, set()).add(host)
        return {egress: len(names) for egress, names in hosts.items()}

    def ok(self, egress: str, host: str, port: int = 0) -> None:
        """A success resets the strikes, the host's and its port's (a cooldown the server
        asked for still runs out)."""
        if not self._pairs:
            return  # the common case, asked on every response
        pairs = self._pairs
        for key in _keys(egress, host, port):
            old = pairs.get(key)
            if old is not None:
                pairs[key] = _Cool(old.until, 0)

    def remaining(self, egress: str, host: str, now: float, port: int = 0) -> float:
        """Seconds until the address may send to (host, port); while a probe is out, a
        short while to look again."""
        if not self._pairs:
            return 0.0  # the common case, asked per address on every request
        pairs = self._pairs
        wait = 0.0
        for key in _keys(egress, host, port):
            entry = pairs.get(key)
            if entry is not None:
                if entry.until - now > wait:
                    wait = entry.until - now
                elif entry.probe > now and wait < PROBE_POLL_S:
                    wait = min(entry.probe - now, PROBE_POLL_S)
        return wait

    def sent(self, egress: str, host: str, now: float, port: int = 0) -> None:
        """A request leaves from `egress` for (host, port): if a cooldown of the pair has
        ended with no success since, it is the probe (see the class)."""
        if self._probe_s is None or not self._pairs:
            return
        pairs = self._pairs
        for key in _keys(egress, host, port):
            old = pairs.get(key)
            if old is not None and old.strikes and old.until <= now and old.probe <= now:
                pairs[key] = _Cool(old.until, old.strikes, now + self._probe_s)

    def settled(self, egress: str, host: str, port: int = 0) -> None:
        """The probe was answered, neither a success nor a refusal (a 404): the pair is
        free again, its strikes kept."""
        if not self._pairs:
            return
        pairs = self._pairs
        for key in _keys(egress, host, port):
            old = pairs.get(key)
            if old is not None and old.probe:
                pairs[key] = _Cool(old.until, old.strikes)

    def __bool__(self) -> bool:
        """Whether any (address, host) pair is remembered: cooling, or with strikes."""
        return bool(self._pairs)

    def cooling(self, egress: str, host: str, now: float, port: int = 0) -> bool:
        if not self._pairs:
            return False  # the common case, asked for each address a request may take
        return self.remaining(egress, host, now, port) > 0.0

    def soonest(self, egresses: Iterable[str], host: str, now: float, port: int = 0) -> float:
        """The smallest remaining cooldown over `egresses` (0 if any is free or none given)."""
        return min((self.remaining(e, host, now, port) for e in egresses), default=0.0)

    def prune(self, now: float) -> None:
        self._pairs = {
            key: c
            for key, c in self._pairs.items()
            if now < c.until or (c.strikes and now < c.until + self.max_s)
        }
        while len(self._pairs) > self._max_entries:
            del self._pairs[next(iter(self._pairs))]

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"<Cooldowns {len(self._pairs)} cooling>"


def session_egress(session_id: str, candidates: Sequence[str]) -> str | None:
    """The address a session sticks to: rendezvous (highest random weight) hashing.

    Stable for as long as the address stays among `candidates`; removing an address moves
    only its own sessions. blake2b keeps it the same across processes and restarts.
    """

    def weight(address: str) -> tuple[int, str]:
        digest = hashlib.blake2b(
            f"{session_id}\0{address}".encode("utf-8", "surrogatepass"), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big"), address

    return max(candidates, key=weight, default=None)
