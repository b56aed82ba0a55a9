"""Which egress address a request leaves from. Pure decisions; the clock is passed in.

- A `Strategy` orders the candidates: `round-robin` (the original's), `random`,
  `least-busy` (fewest requests in flight on this worker). It only has to implement
  `choose(n, accept)`: the first index it prefers among those `accept` allows.
- `Scheduler.acquire` filters candidates by family, health of the pair (cooling after a
  429/503/ban status), an optional pin (session or X-Demux-Egress) and the per-host budget
  (`--host-rate`), then lets the strategy choose. When no address may send now it says
  how long to wait; the exchange queues the request (FIFO per host) that long.

Round-robin's position is a `Cursor`: a plain integer with one process, an integer in
shared memory behind a process-shared lock with `--workers N`, so rotation is global.
Budgets likewise: with `--workers N` the buckets of the addresses known at start live in
shared memory (`SharedBuckets`), so an address never sends more than RATE (nor BURST at
once) to a host, however clients spread over the workers. Addresses that re-discovery
adds later get per-worker buckets of RATE/N (and at least one token each).
"""

from __future__ import annotations

import math
import random
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from demux_proxy.egress import Egress
from demux_proxy.limits import (
    PROBE_LEASE_S,
    Cooldowns,
    HostRate,
    RateRules,
    TokenBucket,
    bucket_wait_s,
    refilled,
    spent_late,
    taken,
)

if TYPE_CHECKING:  # only --workers N > 1 imports multiprocessing
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Lock

STRATEGIES: Final = ("round-robin", "random", "least-busy")
# One rotation position per lane: requests any address may serve, and those a host's
# one address family confines (mixed egress). With one position, IPv4 and IPv6 requests
# in turn each moved it back past the same addresses: the second of each family never
# sent.
LANES: Final = 3


def lane_of(family: int | None) -> int:
    return 0 if family is None else 1 if family == socket.AF_INET else 2


class Cursor(Protocol):
    def take(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
        """The first index i (from the lane's position, modulo n) with accept(i), moving
        the position past it; None when no index in one full turn is accepted."""


def _scan(start: int, n: int, accept: Callable[[int], bool]) -> int | None:
    for step in range(n):
        i = (start + step) % n
        if accept(i):
            return i
    return None


def _any(i: int) -> bool:
    return True


def _first(n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
    """The one index a request bound to an address may take: the rotation's position
    is not the bound request's to move (the next unbound one would skip an address)."""
    return _scan(0, n, accept)


class LocalCursor:
    def __init__(self) -> None:
        self.positions = [0] * LANES

    def take(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
        i = _scan(self.positions[lane], n, accept)
        if i is not None:
            self.positions[lane] = (i + 1) % n
        return i


def release_if_stuck(lock: Lock, wait_s: float) -> bool:
    """Release a process-shared lock that a dead worker held, if it did.

    A worker killed inside a critical section (SIGKILL, the OOM killer) never releases
    the lock, and every other worker would block on it for good. The sections last
    microseconds, so a lock still not free after wait_s is held by the dead: the
    supervisor, which reaped it, lets the others go on. True when it released one.
    """
    if lock.acquire(timeout=wait_s):
        lock.release()
        return False
    lock.release()
    return True


class SharedCursor:
    """A position shared by forked worker processes (created before the fork).

    An uncontended process-shared semaphore costs well under a microsecond, far below a
    request's cost; contention is bounded by the number of workers.
    """

    def __init__(self, context: BaseContext) -> None:
        self._positions = context.RawArray("Q", LANES)
        self._lock = context.Lock()

    def take(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
        positions = self._positions
        with self._lock:
            i = _scan(positions[lane] % n, n, accept)
            if i is not None:
                positions[lane] = (i + 1) % n
            return i

    def release_if_stuck(self, wait_s: float) -> bool:
        return release_if_stuck(self._lock, wait_s)


class Bucket(Protocol):
    def take(self, now: float) -> bool: ...
    def wait_s(self, now: float) -> float: ...
    def spend_late(self, now: float) -> None: ...


class SharedBuckets:
    """Token buckets in shared memory (created before the fork), one per (address, rule
    pattern) given: every worker takes from the same bucket. Behind one process-shared
    lock, as the cursor is; only requests to hosts with a --host-rate rule touch it."""

    def __init__(self, context: BaseContext, keys: Sequence[tuple[str, str]]) -> None:
        self._slots = {key: i for i, key in enumerate(keys)}
        # (tokens, last refill) per bucket; NaN tokens: not used yet (starts full)
        self._state = context.RawArray("d", 2 * max(1, len(keys)))
        for i in range(len(keys)):
            self._state[2 * i] = math.nan
        self._lock = context.Lock()

    def bucket(self, key: tuple[str, str], rate_per_s: float, burst: int) -> Bucket | None:
        slot = self._slots.get(key)
        return None if slot is None else _SharedBucket(self, slot, rate_per_s, burst)

    def _tokens(self, slot: int, now: float, rate_per_s: float, burst: int) -> float:
        """The slot's tokens at `now` (caller holds the lock), stored back refilled."""
        tokens, last = self._state[2 * slot], self._state[2 * slot + 1]
        tokens = (
            float(burst) if math.isnan(tokens) else refilled(tokens, last, now, rate_per_s, burst)
        )
        self._state[2 * slot] = tokens
        self._state[2 * slot + 1] = max(last, now)  # 0.0 until first used
        return tokens

    def take(self, slot: int, now: float, rate_per_s: float, burst: int) -> bool:
        with self._lock:
            left = taken(self._tokens(slot, now, rate_per_s, burst))
            if left is None:
                return False
            self._state[2 * slot] = left
            return True

    def wait_s(self, slot: int, now: float, rate_per_s: float, burst: int) -> float:
        with self._lock:
            return bucket_wait_s(self._tokens(slot, now, rate_per_s, burst), rate_per_s)

    def spend_late(self, slot: int, now: float, rate_per_s: float, burst: int) -> None:
        with self._lock:
            tokens = self._tokens(slot, now, rate_per_s, burst)
            self._state[2 * slot] = spent_late(tokens, burst)

    def release_if_stuck(self, wait_s: float) -> bool:
        return release_if_stuck(self._lock, wait_s)


class _SharedBucket:
    """One slot of `SharedBuckets`, with the `TokenBucket` interface."""

    __slots__ = ("_burst", "_rate", "_slot", "_store")

    def __init__(self, store: SharedBuckets, slot: int, rate_per_s: float, burst: int) -> None:
        self._store = store
        self._slot = slot
        self._rate = rate_per_s
        self._burst = burst

    def take(self, now: float) -> bool:
        return self._store.take(self._slot, now, self._rate, self._burst)

    def wait_s(self, now: float) -> float:
        return self._store.wait_s(self._slot, now, self._rate, self._burst)

    def spend_late(self, now: float) -> None:
        self._store.spend_late(self._slot, now, self._rate, self._burst)


class Strategy(Protocol):
    def choose(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None: ...


class RoundRobinStrategy:
    def __init__(self, cursor: Cursor) -> None:
        self._cursor = cursor

    def choose(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
        return self._cursor.take(n, accept, lane)


class RandomStrategy:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
        if accept is _any:
            return self._rng.randrange(n)
        # Uniform over those accepted: a walk from a random start would favour the
        # index after each refused one.
        allowed = [i for i in range(n) if accept(i)]
        return self._rng.choice(allowed) if allowed else None


class LeastBusyStrategy:
    """Fewest requests in flight (on this worker); ties broken round-robin."""

    def __init__(self, in_flight: Callable[[int], int], cursor: Cursor) -> None:
        self._in_flight = in_flight
        self._cursor = cursor

    def choose(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
        allowed = [i for i in range(n) if accept(i)]
        if not allowed:
            return None
        fewest = min(self._in_flight(i) for i in allowed)
        best = {i for i in allowed if self._in_flight(i) == fewest}
        return self._cursor.take(n, best.__contains__, lane)


class Scheduler:
    def __init__(
        self,
        egress: Sequence[Egress],
        *,
        strategy: str = "round-robin",
        cursor: Cursor | None = None,
        rules: RateRules | None = None,
        cooldowns: Cooldowns | None = None,
        workers: int = 1,
        buckets: SharedBuckets | None = None,
    ) -> None:
        if not egress:
            raise ValueError("Scheduler needs at least one egress address")
        self.egress = tuple(egress)
        self.families = frozenset(e.family for e in self.egress)
        self.in_flight: dict[str, int] = {e.address: 0 for e in self.egress}
        cursor = cursor if cursor is not None else LocalCursor()
        self._strategy: Strategy
        if strategy == "random":
            self._strategy = RandomStrategy()
        elif strategy == "least-busy":
            self._strategy = LeastBusyStrategy(
                lambda i: self.in_flight.get(self.egress[i].address, 0), cursor
            )
        else:
            self._strategy = RoundRobinStrategy(cursor)
        self.rules = rules if rules is not None else RateRules(())
        self.cooldowns = cooldowns if cooldowns is not None else Cooldowns(probe_s=PROBE_LEASE_S)
        self._workers = max(1, workers)
        self._shared = buckets
        self._buckets: dict[tuple[str, str], Bucket] = {}
        # Addresses whose connects fail (gone from the host, unroutable): rested with
        # backoff, then probed back in by the next request that may use them.
        self.health = Cooldowns(base_s=1.0, max_s=60.0)

    def _bucket(self, address: str, rule: HostRate, now: float) -> Bucket:
        key = (address, rule.pattern)
        bucket = self._buckets.get(key)
        if bucket is None:
            shared = self._shared
            found = shared.bucket(key, rule.rate_per_s, rule.burst) if shared else None
            if found is not None:
                bucket = found
            else:  # one process, or an address added after the fork: this worker's share
                bucket = TokenBucket(
                    rule.rate_per_s / self._workers, max(1, rule.burst // self._workers), now
                )
            self._buckets[key] = bucket
        return bucket

    def sent_late(self, address: str, host: str, now: float) -> None:
        """A request admitted earlier from `address` to `host` leaves only now (it waited
        for a new connection): its budget token counts from now, so that two requests
        reach the host no closer than 1/RATE apart however long the connect took."""
        rule = self.rules.match(host) if self.rules else None
        if rule is not None:
            self._bucket(address, rule, now).spend_late(now)

    def pick(self, family: int | None = None) -> Egress | None:
        """The next address by strategy alone, no host, budget or cooldown considered."""
        egress = self.egress
        i = self._strategy.choose(
            len(egress), lambda j: family is None or egress[j].family == family, lane_of(family)
        )
        return None if i is None else egress[i]

    def acquire(
        self,
        host: str,
        now: float,
        *,
        exclude: Sequence[str] = (),
        only: str | None = None,
        family: int | None = None,
        port: int = 0,
    ) -> Egress | float | None:
        """An address that may send to `host` (on `port`) now (its budget token taken),
        else the seconds until one may, else None when no address could ever (all
        excluded, or none of `family`, the one address family the host has when egress
        is mixed)."""
        egress = self.egress
        rule = self.rules.match(host) if self.rules else None
        cooldowns = self.cooldowns
        if (
            rule is None
            and not exclude
            and only is None
            and family is None
            and not cooldowns
            and not self.health
        ):
            # Nothing cools, no budget, no constraint (most requests): every address may
            # send, the strategy alone picks.
            i = self._strategy.choose(len(egress), _any)
            if i is not None:
                return egress[i]

        def possible(i: int) -> bool:
            e = egress[i]
            return (
                e.address not in exclude
                and (only is None or e.address == only)
                and (family is None or e.family == family)
            )

        lost: list[int] = []  # looked ready, but another worker took the token first

        def ready(i: int) -> bool:
            if not possible(i) or i in lost:
                return False
            address = egress[i].address
            if cooldowns.cooling(address, host, now, port) or self.health.cooling(address, "", now):
                return False
            return rule is None or self._bucket(address, rule, now).wait_s(now) == 0

        choose = self._strategy.choose if only is None else _first
        lane = lane_of(family)
        while (i := choose(len(egress), ready, lane)) is not None:
            # The look and the take are two steps under a shared bucket's lock: the take
            # decides. (One step would not do: least-busy looks at every address.)
            if rule is None or self._bucket(egress[i].address, rule, now).take(now):
                if cooldowns:  # the first request after a cooldown is its probe
                    cooldowns.sent(egress[i].address, host, now, port)
                return egress[i]
            lost.append(i)
        waits = [
            max(
                cooldowns.remaining(e.address, host, now, port),
                self.health.remaining(e.address, "", now),
                self._bucket(e.address, rule, now).wait_s(now) if rule is not None else 0.0,
            )
            for j, e in enumerate(egress)
            if possible(j)
        ]
        return min(waits) if waits else None

    def started(self, address: str) -> None:
        """One more request in flight from `address` (re-discovery may have removed it)."""
        n = self.in_flight.get(address)
        if n is not None:
            self.in_flight[address] = n + 1

    def finished(self, address: str) -> None:
        n = self.in_flight.get(address)
        if n:
            self.in_flight[address] = n - 1

    def rest(self, address: str, now: float) -> float:
        """The address failed to connect: keep it out for a growing while."""
        return self.health.cool(address, "", now, None)

    def healthy(self, address: str) -> None:
        self.health.ok(address, "")

    def update(self, egress: Sequence[Egress]) -> tuple[list[str], list[str]]:
        """Take a new address list (re-discovery): (added, removed). Sessions on the
        addresses that stay keep them; in-flight counts of those carry over."""
        if not egress:
            raise ValueError("Scheduler needs at least one egress address")
        before = set(self.in_flight)
        self.egress = tuple(egress)
        self.families = frozenset(e.family for e in self.egress)
        self.in_flight = {e.address: self.in_flight.get(e.address, 0) for e in self.egress}
        after = set(self.in_flight)
        return sorted(after - before), sorted(before - after)

    def addresses(self) -> list[str]:
        return [e.address for e in self.egress]

    def __repr__(self) -> str:
        return f"<Scheduler {len(self.egress)} addresses, {self.cooldowns!r}>"
