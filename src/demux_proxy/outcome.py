"""What one exchange did: filled in by both its sides (`outbound`, `exchange`), read for
its log line, its metrics and its cleanup."""

from __future__ import annotations

from demux_proxy.egress import Egress


class Outcome:
    """A plain class, not a dataclass: the compiled module constructs it natively."""

    def __init__(self, request_done: bool) -> None:
        self.status = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.response_started = False
        self.request_done = request_done
        self.egress: Egress | None = None  # the address picked, kept when the exchange fails
        self.queued_ms = 0.0
        self.cooldown_s: float | None = None
