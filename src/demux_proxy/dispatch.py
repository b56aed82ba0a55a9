"""Which address a request goes from, and when: the scheduler's decisions put to work.

`Dispatcher` turns a request into an egress address: the pin or sticky session it
names, a wait in the host's FIFO queue when no address has budget (`--queue-timeout`),
and what the server's answer teaches (cooldowns, resting a failing address). The
bytes themselves move in exchange.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Final

from demux_proxy import log
from demux_proxy.auth import session_of
from demux_proxy.config import Config
from demux_proxy.egress import Egress
from demux_proxy.errors import (
    EgressFailure,
    EgressTimeout,
    NoEgressLeft,
    ProtocolError,
    Unavailable,
)
from demux_proxy.http1.headers import get
from demux_proxy.http1.parser import RequestHead, ResponseHead
from demux_proxy.limits import parse_retry_after, session_egress
from demux_proxy.metrics import Recorder
from demux_proxy.route import Route
from demux_proxy.scheduler import Scheduler

_PIN: Final = b"x-demux-egress"
_SESSION: Final = b"x-demux-session"
_CREDENTIALS: Final = b"proxy-authorization"
# Final names are C statics in the compiled module: no module-dict lookup per field.
_PIN_LEN: Final = len(_PIN)
_SESSION_LEN: Final = len(_SESSION)
_CREDENTIALS_LEN: Final = len(_CREDENTIALS)


class Dispatcher:
    def __init__(
        self, config: Config, scheduler: Scheduler, events: log.EventLog, metrics: Recorder
    ) -> None:
        self._config = config
        self.scheduler = scheduler
        self._events = events
        self._metrics = metrics
        self._queues: dict[str, asyncio.Lock] = {}  # per host: FIFO for budget
        self._queued: dict[str, int] = {}  # per host: requests in that queue
        self.retries = config.retries
        self._cooling_statuses = frozenset({429, 503, *config.ban_status})
        self._loop: asyncio.AbstractEventLoop | None = None

    def _clock(self) -> asyncio.AbstractEventLoop:
        """The loop this dispatcher serves on, taken once: on Python 3.11 every
        asyncio.get_running_loop() is a getpid() syscall, and this runs per request."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def affinity(self, req: RequestHead, route: Route) -> str | None:
        """The address this request must use: X-Demux-Egress, else its sticky session."""
        pinned = session = None
        credentials = False
        # One pass for the three fields that may name an address; a length check first
        # spares a lower() for every other field (this runs on every request).
        for field, value in req.headers:
            size = len(field)
            if size == _PIN_LEN and pinned is None and field.lower() == _PIN:
                pinned = value
            elif size == _SESSION_LEN and session is None and field.lower() == _SESSION:
                session = value
            elif size == _CREDENTIALS_LEN and field.lower() == _CREDENTIALS:
                credentials = True
        if pinned is not None:
            address = pinned.decode("latin-1").strip()
            if address not in self.scheduler.in_flight:
                raise ProtocolError(f"X-Demux-Egress {address!r} is not an egress address")
            return address
        name = session.decode("latin-1").strip() if session is not None else route.session
        if not name and credentials:
            name = session_of(req.headers)
        if not name:
            return None
        scheduler = self.scheduler
        everyone = scheduler.addresses()
        now = self._clock().time()
        healthy = [a for a in everyone if not scheduler.health.cooling(a, "", now)]
        chosen = session_egress(name, healthy or everyone)
        home = session_egress(name, everyone)
        if chosen != home:
            self._events.warning(
                "session moved: its address is resting", session=name, home=home, now=chosen
            )
        return chosen

    def acquire_now(self, route: Route, exclude: list[str], only: str | None) -> Egress | None:
        """An egress with budget for the host now, when nobody queues for it; else None,
        and `acquire` queues. Not a coroutine: most requests need no wait, and a coroutine
        call costs about as much as the choice itself."""
        host = route.host
        if host in self._queued:  # others wait: no overtaking them
            return None
        got = self.scheduler.acquire(host, self._clock().time(), exclude=exclude, only=only)
        if isinstance(got, Egress):
            return got
        if got is None:
            raise NoEgressLeft(f"no egress address left to try for {host}")
        return None

    async def acquire(
        self, route: Route, exclude: list[str], only: str | None
    ) -> tuple[Egress, float]:
        """(An egress with budget for the host, ms queued), after `acquire_now` found none:
        in the host's FIFO queue until one has."""
        scheduler, host = self.scheduler, route.host
        loop = self._clock()
        lock = self._queues.setdefault(host, asyncio.Lock())
        self._queued[host] = self._queued.get(host, 0) + 1
        queued = loop.time()
        ready_at = 0.0  # when the last check said an address would have budget
        rule = scheduler.rules.match(host) if scheduler.rules else None
        label = rule.pattern if rule is not None else "cooldown"
        self._metrics.queued(label, 1)
        try:
            async with asyncio.timeout(self._config.queue_timeout_s), lock:
                while True:
                    got = scheduler.acquire(host, loop.time(), exclude=exclude, only=only)
                    if isinstance(got, Egress):
                        return got, round((loop.time() - queued) * 1000, 1)
                    if got is None:
                        raise NoEgressLeft(f"no egress address left to try for {host}")
                    ready_at = loop.time() + got
                    await asyncio.sleep(got)
        except TimeoutError:
            raise Unavailable(
                f"no egress address may send to {host} within "
                f"{self._config.queue_timeout_s:g} s (--host-rate budgets or cooldowns)",
                retry_after_s=max(1, math.ceil(ready_at - loop.time())),  # what is left
            ) from None
        finally:
            self._metrics.queued(label, -1)
            self._queued[host] -= 1
            if not self._queued[host]:  # the last one out takes the queue away
                del self._queued[host]
                del self._queues[host]

    def rest(self, egress: Egress, exc: EgressFailure) -> None:
        now = self._clock().time()
        seconds = self.scheduler.rest(egress.address, now)
        self._events.warning(
            "egress address resting",
            interface=egress.address,
            device=egress.interface,
            error=exc.reason,
            rest_s=round(seconds, 3),
        )

    def timed_out(self, egress: Egress, host: str, exc: EgressTimeout) -> None:
        """A connect to `host` timed out: cool this (address, host) pair down with backoff,
        as a cooling status would, and leave the address to every other host."""
        now = self._clock().time()
        seconds = self.scheduler.cooldowns.cool(egress.address, host, now, None)
        self._events.warning(
            "egress address cooling",
            interface=egress.address,
            device=egress.interface,
            host=host,
            error=exc.reason,
            cooldown_s=round(seconds, 3),
        )

    def learn(self, address: str, host: str, resp: ResponseHead) -> tuple[int | None, float | None]:
        """Cool (address, host) down on 429/503/--ban-status: (the Retry-After to relay,
        the cooldown applied), both None for other statuses."""
        cooldowns = self.scheduler.cooldowns
        if resp.status not in self._cooling_statuses:
            if resp.status < 400:
                cooldowns.ok(address, host)
            return None, None
        now = self._clock().time()
        told = parse_retry_after(get(resp.headers, b"retry-after"), time.time())
        applied = cooldowns.cool(address, host, now, told)
        soonest = cooldowns.soonest(self.scheduler.addresses(), host, now)
        return max(1, math.ceil(soonest)), applied

    def another_address_free(self, host: str, address: str) -> bool:
        now = self._clock().time()
        others = [a for a in self.scheduler.addresses() if a != address]
        return bool(others) and self.scheduler.cooldowns.soonest(others, host, now) == 0
