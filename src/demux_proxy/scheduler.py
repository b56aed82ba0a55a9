"""Which egress address the next request leaves from: round-robin, as the original did.

The position in the rotation is a `Cursor`. With one process it is a plain integer; with
`--workers N` it is one integer in shared memory behind a process-shared lock, so the
rotation is global: consecutive requests leave from consecutive addresses whichever
worker serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from typing import Protocol

from demux_proxy.egress import Egress


class Cursor(Protocol):
    def take(self, n: int, accept: Callable[[int], bool]) -> int | None:
        """The first index i (from the current position, modulo n) with accept(i), moving
        the position past it; None when no index in one full turn is accepted."""


def _scan(start: int, n: int, accept: Callable[[int], bool]) -> int | None:
    for step in range(n):
        i = (start + step) % n
        if accept(i):
            return i
    return None


class LocalCursor:
    def __init__(self) -> None:
        self.position = 0

    def take(self, n: int, accept: Callable[[int], bool]) -> int | None:
        i = _scan(self.position, n, accept)
        if i is not None:
            self.position = (i + 1) % n
        return i


class SharedCursor:
    """A position shared by forked worker processes (created before the fork).

    An uncontended process-shared semaphore costs well under a microsecond, far below a
    request's cost; contention is bounded by the number of workers.
    """

    def __init__(self, context: BaseContext) -> None:
        self._value = context.RawValue("Q", 0)
        self._lock = context.Lock()

    def take(self, n: int, accept: Callable[[int], bool]) -> int | None:
        with self._lock:
            i = _scan(self._value.value % n, n, accept)
            if i is not None:
                self._value.value = (i + 1) % n
            return i


class RoundRobin:
    """Each `pick` returns the next address in turn; `family` skips to the next of a family.

    Skipping still advances the position past the address taken, so a request that must
    use IPv6 does not make the next IPv4 request repeat an address.
    """

    def __init__(self, egress: Sequence[Egress], cursor: Cursor | None = None) -> None:
        if not egress:
            raise ValueError("RoundRobin needs at least one egress address")
        self._egress = tuple(egress)
        self._cursor: Cursor = cursor if cursor is not None else LocalCursor()
        self.families = frozenset(e.family for e in self._egress)

    def pick(self, family: int | None = None) -> Egress | None:
        egress = self._egress
        if family is None:
            i = self._cursor.take(len(egress), _any)
        else:
            i = self._cursor.take(len(egress), lambda j: egress[j].family == family)
        return None if i is None else egress[i]

    def __repr__(self) -> str:
        return f"<RoundRobin {len(self._egress)} addresses>"


def _any(_: int) -> bool:
    return True
