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
from demux_proxy.egress import Egress, parse_addresses
from demux_proxy.errors import (
    ConfigError,
    EgressFailure,
    NoEgressLeft,
    PeerGone,
    ProtocolError,
    Unavailable,
    UpstreamError,
)
from demux_proxy.http1.headers import get
from demux_proxy.http1.parser import RequestHead, ResponseHead
from demux_proxy.limits import parse_retry_after, session_egress
from demux_proxy.metrics import Recorder
from demux_proxy.route import Route
from demux_proxy.scheduler import Scheduler
from demux_proxy.stream import Stream

_PIN: Final = b"x-demux-egress"
_SESSION: Final = b"x-demux-session"
_CREDENTIALS: Final = b"proxy-authorization"
# Final names are C statics in the compiled module: no module-dict lookup per field.
_PIN_LEN: Final = len(_PIN)
_SESSION_LEN: Final = len(_SESSION)
_CREDENTIALS_LEN: Final = len(_CREDENTIALS)


class _HostQueue:
    """The requests of one host waiting for an address with budget, in FIFO order."""

    __slots__ = ("lock", "ready_at", "waiting")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.ready_at = 0.0  # when the head of the queue last expected an address free


# The clock of budgets and of the cooldowns they are checked with: CLOCK_MONOTONIC, as
# the loop's, but read when the token is taken: the loop's time is the millisecond its
# iteration began, and a token taken by it may leave up to a millisecond or more early
# (an exact limiter at the site counted 3 requests in a second at 2/s). One clock
# across workers too (shared buckets).
_budget_now: Final = time.monotonic


class Dispatcher:
    def __init__(
        self, config: Config, scheduler: Scheduler, events: log.EventLog, metrics: Recorder
    ) -> None:
        self._config = config
        self.scheduler = scheduler
        self._events = events
        self._metrics = metrics
        # FIFO for budget per host, and apart per host and address for the requests
        # bound to one (pinned, or a sticky session): those wait for their own address,
        # and must not hold up the rest, which any address may serve.
        # Per port too: a port whose every address cools (a connect timeout) must not
        # hold up the host's other ports.
        self._queues: dict[tuple[str, int, str | None], _HostQueue] = {}
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

    def affinity(self, req: RequestHead, route: Route, family: int | None) -> str | None:
        """The address this request must use: X-Demux-Egress, else its sticky session
        (among the addresses of `family`, the one the host has, when egress is mixed)."""
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
        if pinned is None and route.pin is not None:
            pinned = route.pin.encode("latin-1")  # named on CONNECT
        if pinned is not None:
            address = self.pin(pinned)
            if family is not None and self._family_of(address) != family:
                raise UpstreamError(
                    f"X-Demux-Egress {address} cannot reach {route.host}: "
                    "it has no address of that family"
                )
            return address
        name = session.decode("latin-1").strip() if session is not None else route.session
        if not name and credentials:
            name = session_of(req.headers)
        if not name:
            return None
        scheduler = self.scheduler
        everyone = scheduler.addresses()
        if family is not None:
            everyone = [e.address for e in scheduler.egress if e.family == family]
        now = _budget_now()
        healthy = [a for a in everyone if not scheduler.health.cooling(a, "", now)]
        chosen = session_egress(name, healthy or everyone)
        home = session_egress(name, everyone)
        if chosen != home:
            self._events.warning(
                "session moved: its address is resting", session=name, home=home, now=chosen
            )
        return chosen

    def _family_of(self, address: str) -> int | None:
        return next((e.family for e in self.scheduler.egress if e.address == address), None)

    def pin(self, value: bytes) -> str:
        """The egress address an X-Demux-Egress value names, however it is spelt (as
        --egress takes it: "[FD00::1]" is fd00::1); 400 if it names none."""
        address = value.decode("latin-1").strip()
        if address not in self.scheduler.in_flight:
            try:
                spelt = parse_addresses([address])
            except ConfigError:
                spelt = []
            if len(spelt) != 1 or spelt[0] not in self.scheduler.in_flight:
                raise ProtocolError(f"X-Demux-Egress {address!r} is not an egress address")
            address = spelt[0]
        return address

    def acquire_now(
        self, route: Route, exclude: list[str], only: str | None, family: int | None
    ) -> Egress | None:
        """An egress with budget for the host now, when nobody queues for it; else None,
        and `acquire` queues. Not a coroutine: most requests need no wait, and a coroutine
        call costs about as much as the choice itself."""
        host = route.host
        if (host, route.port, only) in self._queues:  # others wait: no overtaking them
            return None
        got = self.scheduler.acquire(
            host, _budget_now(), exclude=exclude, only=only, family=family, port=route.port
        )
        if isinstance(got, Egress):
            return got
        if got is None:
            raise NoEgressLeft(f"no egress address left to try for {host}")
        return None

    def connected(self, address: str, route: Route) -> None:
        """A new connection from `address` is ready for the request admitted before it
        was opened: the request's budget counts from now (`Scheduler.sent_late`)."""
        if self.scheduler.rules:
            self.scheduler.sent_late(address, route.host, _budget_now())

    async def acquire(
        self,
        client: Stream,
        route: Route,
        exclude: list[str],
        only: str | None,
        family: int | None,
    ) -> tuple[Egress, float]:
        """(An egress with budget for the host, ms queued), after `acquire_now` found none:
        in the host's FIFO queue until one has.

        A client that closes its connection meanwhile (a crawler's own timeout) gives up
        its place at once (PeerGone): the budget goes to the next request instead of to
        an answer nobody reads."""
        scheduler, host = self.scheduler, route.host
        loop = self._clock()
        key = (host, route.port, only)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _HostQueue()
        queue.waiting += 1
        queued = loop.time()
        rule = scheduler.rules.match(host) if scheduler.rules else None
        label = rule.pattern if rule is not None else "cooldown"
        self._metrics.queued(label, 1)
        try:
            if client.gone:
                raise _left_the_queue()
            async with asyncio.timeout(self._config.queue_timeout_s) as limit:
                # A client gone ends its wait then, also behind others (waiting for the
                # lock), rather than at the queue timeout with a 503 logged for nobody.
                client.on_end = lambda: limit.reschedule(loop.time())
                async with queue.lock:
                    while True:
                        got = scheduler.acquire(
                            host,
                            _budget_now(),
                            exclude=exclude,
                            only=only,
                            family=family,
                            port=route.port,
                        )
                        if isinstance(got, Egress):
                            return got, round((loop.time() - queued) * 1000, 1)
                        if got is None:
                            raise NoEgressLeft(f"no egress address left to try for {host}")
                        queue.ready_at = loop.time() + got
                        await asyncio.sleep(got)
        except TimeoutError:
            if client.gone:  # on_end cut the wait short
                raise _left_the_queue() from None
            # What is left of the head's wait, also for those that never reached the head.
            raise Unavailable(
                f"no egress address may send to {host} within "
                f"{self._config.queue_timeout_s:g} s (--host-rate budgets or cooldowns)",
                retry_after_s=max(1, math.ceil(queue.ready_at - loop.time())),
            ) from None
        finally:
            client.on_end = None
            self._metrics.queued(label, -1)
            queue.waiting -= 1
            if not queue.waiting:  # the last one out takes the queue away
                del self._queues[key]

    def rest(self, egress: Egress, exc: EgressFailure) -> None:
        now = _budget_now()
        seconds = self.scheduler.rest(egress.address, now)
        self._events.warning(
            "egress address resting",
            interface=egress.address,
            device=egress.interface,
            error=exc.reason,
            rest_s=round(seconds, 3),
        )

    def cool_pair(self, egress: Egress, route: Route, exc: UpstreamError) -> None:
        """A connect to the host's port timed out, or had no route, or a fresh connection
        was reset before any answer: cool this (address, host, port) down with backoff, as
        a cooling status would, and leave the address to every other host and port."""
        now = _budget_now()
        seconds = self.scheduler.cooldowns.cool(egress.address, route.host, now, None, route.port)
        self._events.warning(
            "egress address cooling",
            interface=egress.address,
            device=egress.interface,
            host=route.host,
            port=route.port,
            error=exc.reason,
            cooldown_s=round(seconds, 3),
        )

    def _peers(self, address: str, only: str | None) -> list[str]:
        """The addresses a request sent from `address` could go from instead: itself when
        pinned, else every address of its family (the host is reachable in that one)."""
        if only is not None:
            return [only]
        scheduler = self.scheduler
        if len(scheduler.families) == 1:
            return scheduler.addresses()
        family = self._family_of(address)
        return [e.address for e in scheduler.egress if e.family == family]

    def learn(
        self, address: str, route: Route, resp: ResponseHead, only: str | None
    ) -> tuple[int | None, float | None]:
        """Cool (address, host) down on 429/503/--ban-status, on every port (the site's
        limit is per client address): (the Retry-After to relay, the cooldown applied),
        both None for other statuses."""
        cooldowns, host = self.scheduler.cooldowns, route.host
        if resp.status not in self._cooling_statuses:
            if resp.status < 400:
                cooldowns.ok(address, host, route.port)
            else:  # answered, and not refused: a probe's end
                cooldowns.settled(address, host, route.port)
            return None, None
        self._metrics.cooled(address, resp.status)
        now = _budget_now()
        told = parse_retry_after(get(resp.headers, b"retry-after"), time.time())
        applied = cooldowns.cool(address, host, now, told)
        soonest = cooldowns.soonest(self._peers(address, only), host, now, route.port)
        return max(1, math.ceil(soonest)), applied

    def another_address_free(self, route: Route, address: str) -> bool:
        now = _budget_now()
        others = [a for a in self._peers(address, None) if a != address]
        return bool(others) and not self.scheduler.cooldowns.soonest(
            others, route.host, now, route.port
        )


def _left_the_queue() -> PeerGone:
    return PeerGone("client connection lost: it closed while its request waited in the queue")
