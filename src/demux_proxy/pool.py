"""Idle upstream connections, keyed by (egress address, scheme, host, port, TLS name).

Rotation would otherwise cost a TCP (and TLS) handshake per request: with one idle
connection per key kept warm, request N+1 from address A reuses what request N from A
left. Pure bookkeeping: the pool decides which connections to drop and the caller's
`close()` (or `drop()`) does the I/O, as httpcore's pool does. The clock is injected
for tests.

Bounded per key and in all (`max_idle`, least recently used first out): every idle
connection holds a descriptor, and a crawl over many hosts and addresses would
otherwise fill the process's table with them. `shed` gives some back at once when the
table is full anyway (EMFILE on an accept, a connect or a certificate's memory file).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

# The TLS name is part of the key: a connection is reused only for the name its
# certificate was verified against. (A tunnel to one host whose SNI names another has
# its upstream verified as that other name; without the name in the key, a later tunnel
# to the host would reuse that connection unverified for its own name.)
PoolKey = tuple[str, str, str, int, str]  # (egress address, scheme, host, port, TLS name)


class Pooled(Protocol):
    key: PoolKey
    idle_since: float
    # How long its server keeps it idle, as its Keep-Alive field says (less a margin
    # for the race with the server's own close): the pool's `idle_s` where shorter.
    max_idle_s: float

    def usable(self) -> bool: ...
    def close(self) -> None: ...
    def drop(self) -> None: ...  # close now, its descriptor free at once (no TLS goodbye)


C = TypeVar("C", bound=Pooled)


def _alive(conn: Pooled, now: float, deadline: float) -> bool:
    """Whether an idle connection may serve again: idle since `deadline` or later (the
    pool's `idle_s`), within its server's own idle limit, and healthy."""
    return conn.idle_since >= deadline and now - conn.idle_since < conn.max_idle_s and conn.usable()


SHED_AT_LEAST: Final = 4


class Pool(Generic[C]):
    def __init__(
        self,
        *,
        max_idle_per_key: int,
        idle_s: float,
        max_idle: int = 1 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle: dict[PoolKey, deque[C]] = {}
        self._lru: dict[C, None] = {}  # every idle connection, least recently used first
        self._max = max_idle_per_key
        self._max_total = max_idle
        self._idle_s = idle_s
        self._clock = clock
        self.reused = 0
        self.created = 0

    def checkout(self, key: PoolKey) -> C | None:
        """The most recently used live idle connection for `key` (LIFO keeps few warm)."""
        conns = self._idle.get(key)
        if not conns:
            return None
        now = self._clock()
        deadline = now - self._idle_s
        # An emptied deque stays under its key for the next checkin (one connection
        # going back and forth is the common case); prune() drops empty ones.
        while conns:
            conn = conns.pop()
            del self._lru[conn]
            if _alive(conn, now, deadline):
                self.reused += 1
                return conn
            conn.close()
        return None

    def checkin(self, conn: C) -> None:
        conn.idle_since = self._clock()
        conns = self._idle.get(conn.key)
        if conns is None:
            conns = self._idle[conn.key] = deque()
        conns.append(conn)
        self._lru[conn] = None
        if len(conns) > self._max:
            oldest = conns.popleft()
            del self._lru[oldest]
            oldest.close()
        if len(self._lru) > self._max_total:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        oldest = next(iter(self._lru))
        del self._lru[oldest]
        conns = self._idle[oldest.key]
        conns.remove(oldest)
        if not conns:
            del self._idle[oldest.key]
        # Evicted to bound descriptors: a TLS close would hold this one until the server
        # answers its close_notify (up to 30 s with uvloop), so dropped outright instead.
        oldest.drop()

    def shed(self) -> int:
        """Close the least recently used quarter of the idle connections, and at least
        SHED_AT_LEAST of them (or all there are): the process is out of descriptors, and
        what it tries next may need a few at once (a leaf certificate's memory file and
        the path ssl opens it by; a lookup in the hashed trust store). How many closed."""
        n = min(len(self._lru), max(SHED_AT_LEAST, (len(self._lru) + 3) // 4))
        for _ in range(n):
            self._evict_oldest()
        return n

    def prune(self) -> int:
        """Close connections idle longer than `idle_s` (or their own `max_idle_s`) or
        closed by their server."""
        now = self._clock()
        deadline = now - self._idle_s
        closed = 0
        for key in list(self._idle):
            conns = self._idle[key]
            keep = deque(c for c in conns if _alive(c, now, deadline))
            if len(keep) < len(conns):
                for c in conns:
                    if c not in keep:
                        del self._lru[c]
                        c.close()
                        closed += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return closed

    def close_all(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
        self._lru.clear()

    def idle_by_egress(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key, conns in self._idle.items():
            if conns:
                counts[key[0]] = counts.get(key[0], 0) + len(conns)
        return counts

    def __len__(self) -> int:
        return len(self._lru)

    def __repr__(self) -> str:
        return (
            f"<Pool idle={len(self)} keys={len(self._idle)} "
            f"created={self.created} reused={self.reused}>"
        )
