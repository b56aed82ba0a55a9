"""Which egress address the next request leaves from: round-robin, as the original did."""

from __future__ import annotations

from collections.abc import Sequence

from demux_proxy.egress import Egress


class RoundRobin:
    """Each `pick` returns the next address in turn; `family` skips to the next of a family.

    Skipping still advances the counter past the address taken, so a request that must
    use IPv6 does not make the next IPv4 request repeat an address.
    """

    def __init__(self, egress: Sequence[Egress]) -> None:
        if not egress:
            raise ValueError("RoundRobin needs at least one egress address")
        self._egress = tuple(egress)
        self._next = 0
        self.families = frozenset(e.family for e in self._egress)

    def pick(self, family: int | None = None) -> Egress | None:
        n = len(self._egress)
        for step in range(n):
            i = (self._next + step) % n
            egress = self._egress[i]
            if family is None or egress.family == family:
                self._next = (i + 1) % n
                return egress
        return None

    def __repr__(self) -> str:
        return f"<RoundRobin {len(self._egress)} addresses, next={self._next}>"
