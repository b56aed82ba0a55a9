"""Pure decisions: request targets, destination policy, the round-robin, the pool."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demux_proxy import route
from demux_proxy.egress import Egress
from demux_proxy.errors import ProtocolError
from demux_proxy.limits import RateRules
from demux_proxy.policy import refusal
from demux_proxy.pool import Pool, PoolKey
from demux_proxy.route import Tunnel, parse_authority, route_for
from demux_proxy.scheduler import Scheduler

# --- route -------------------------------------------------------------------------


def test_absolute_form_gives_origin_form_and_host() -> None:
    r = route_for(b"http://Example.COM:8080/a/b?c=1#frag", None)
    assert (r.scheme, r.host, r.port, r.target) == ("http", "example.com", 8080, b"/a/b?c=1")
    assert r.host_header == b"example.com:8080"
    assert r.url == "http://example.com:8080/a/b?c=1"


def test_default_port_is_left_out_of_host_and_ipv6_is_bracketed() -> None:
    assert route_for(b"https://a.test/", None).host_header == b"a.test"
    r = route_for(b"http://[::1]:81/", None)
    assert (r.host, r.port, r.host_header) == ("::1", 81, b"[::1]:81")
    assert r.url == "http://[::1]:81/"
    assert route_for(b"http://a.test", None).target == b"/"


def test_an_empty_port_is_the_default_one() -> None:
    """RFC 3986 3.2.3 allows "host:" (port = *DIGIT), and RFC 9110 4.2.3 makes it the
    scheme's default; llhttp refused it (a 400)."""
    route._ORIGINS.clear()
    for _ in range(2):  # parsed, then from the memo of origins
        r = route_for(b"http://a.test:/p?q", None)
        assert (r.host, r.port, r.target, r.host_header) == ("a.test", 80, b"/p?q", b"a.test")
    assert route_for(b"https://[::1]:?q", None).port == 443
    assert route_for(b"http://u@a.test:", None).target == b"/"
    for bad in (b"http://a.test::/", b"http://a.test:x/"):
        with pytest.raises(ProtocolError, match="invalid request target"):
            route_for(bad, None)


def test_a_fully_qualified_name_is_verified_without_its_dot() -> None:
    """The name goes upstream as the client wrote it (Host, resolving); SNI and the
    certificate check take it without the trailing dot, as certificates name hosts."""
    route._ORIGINS.clear()
    for _ in range(2):  # parsed, then from the memo of origins
        r = route_for(b"https://A.Test.:8443/x", None)
        assert (r.host, r.host_header, r.tls_name) == ("a.test.", b"a.test.:8443", "a.test")
    assert route_for(b"https://a.test.", None, options=True).tls_name == "a.test"
    assert route.tls_name("a.test") == "a.test"
    assert route.tls_name(".") == "."


def _fields(r: route.Route) -> tuple[object, ...]:
    return (r.scheme, r.host, r.port, r.target, r.host_header, r.tls_name, r.session, r.url)


_AUTHORITIES = st.sampled_from(
    [
        b"a.test",
        b"A.Test:80",
        b"a.test:8080",
        b"[::1]:81",
        b"u@a.test",
        b"u:p@b.test:81",
        b"1.2.3.4",
        b"a.test.:443",
    ]
)
_PATHS = st.sampled_from(
    [b"", b"/", b"/x", b"/x?y=1", b"/x#f", b"?q=/z", b"/a@b/c", b"/%41?#", b"/A?B=C"]
)


@settings(max_examples=200, deadline=None)
@given(
    scheme=st.sampled_from([b"http", b"https", b"ws", b"HTTP"]),
    authority=_AUTHORITIES,
    first=_PATHS,
    second=_PATHS,
)
def test_a_remembered_origin_routes_as_a_fresh_parse_does(
    scheme: bytes, authority: bytes, first: bytes, second: bytes
) -> None:
    """The memo of "scheme://authority" prefixes never changes what a target means."""
    target = scheme + b"://" + authority + second
    route._ORIGINS.clear()
    fresh = _fields(route_for(target, None))
    route_for(scheme + b"://" + authority + first, None)  # may remember the prefix
    assert _fields(route_for(target, None)) == fresh
    assert _fields(route_for(target, None)) == fresh


@pytest.mark.parametrize(
    "target", [b"/just/a/path", b"*", b"ftp://a.test/", b"http:///nohost", b"garbage"]
)
def test_targets_a_proxy_cannot_forward(target: bytes) -> None:
    with pytest.raises(ProtocolError):
        route_for(target, None)


def test_inside_a_tunnel_the_connect_authority_decides() -> None:
    tunnel = Tunnel("https", "a.test", 8443, "sni.test")
    r = route_for(b"/x?y", tunnel)
    assert (r.scheme, r.host, r.port, r.target, r.host_header, r.tls_name) == (
        "https",
        "a.test",
        8443,
        b"/x?y",
        None,
        "sni.test",
    )
    assert route_for(b"https://other.test/z", tunnel).host == "a.test"


def test_a_fragment_never_goes_upstream_in_a_tunnel() -> None:
    """RFC 9112 3.2.1: a request-target has no fragment; absolute-form already lost it."""
    tunnel = Tunnel("https", "a.test", 443, "a.test")
    for target, origin in [(b"/x?y#f", b"/x?y"), (b"/#", b"/"), (b"/a#b#c", b"/a")]:
        assert route_for(target, tunnel).target == origin
        assert route_for(b"https://a.test" + target, tunnel).target == origin


def test_an_https_target_in_a_tunnel_without_tls_is_refused() -> None:
    """It would go on in clear text, while the client asked for https."""
    plain = Tunnel("http", "a.test", 80, "a.test")
    with pytest.raises(ProtocolError, match="without TLS"):
        route_for(b"https://a.test/x", plain)
    assert route_for(b"http://a.test/x", plain).target == b"/x"
    tls = Tunnel("https", "a.test", 443, "a.test")
    assert route_for(b"http://a.test/x", tls).scheme == "https"  # TLS all the same


def test_connect_authority() -> None:
    assert parse_authority(b"a.test:443") == ("a.test", 443)
    assert parse_authority(b"[2001:db8::1]:443") == ("2001:db8::1", 443)
    for bad in (b"a.test", b"a.test:0", b"a.test:70000", b":443", b"a b:443"):
        with pytest.raises(ProtocolError):
            parse_authority(bad)


def test_an_ip_literal_is_known_by_one_name() -> None:
    """fd00:6:0::2 and fd00:6::2 were two hosts to budgets, cooldowns and the pool, and
    ::ffff:192.0.2.100 (sent over IPv4) escaped the --host-rate of 192.0.2.100."""
    assert parse_authority(b"[FD00:6:0::2]:443") == ("fd00:6::2", 443)
    assert parse_authority(b"[::ffff:192.0.2.100]:443") == ("192.0.2.100", 443)
    r = route_for(b"http://[::ffff:192.0.2.100]:8080/x", None)
    assert (r.host, r.host_header, r.url) == (
        "192.0.2.100",
        b"192.0.2.100:8080",
        "http://192.0.2.100:8080/x",
    )
    assert route_for(b"https://[2001:DB8:0::1]/", None).host == "2001:db8::1"
    assert route_for(b"https://[2001:DB8:0::1]/", None).tls_name == "2001:db8::1"


def test_a_connect_target_brackets_an_ipv6_address_and_nothing_else() -> None:
    """CONNECT fd00:6::2:8080 was read as fd00:6::2 port 8080 (it may as well be no port);
    [both.test]:8080 and [[fd00:6::2]]:8080 were answered 200, the second then 502."""
    for bad in (b"fd00:6::2:8080", b"[both.test]:8080", b"[[fd00:6::2]]:8080", b"[1.2.3.4]:80"):
        with pytest.raises(ProtocolError) as info:
            parse_authority(bad)
        assert info.value.status == 400, bad


def test_a_connect_targets_userinfo_is_refused_unrepeated() -> None:
    """The 400 and its log line echoed `user:s3cret@127.0.0.1`."""
    with pytest.raises(ProtocolError) as info:
        parse_authority(b"user:s3cret@127.0.0.1:443")
    assert info.value.status == 400 and "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "target",
    [
        b"http://127.0.0.1:0/",
        b"http://a.test:00/x",
        b"https://a.test:0",
        b"http://a.test:0?q=1",
        b"http://[::1]:0/",
        b"ws://a.test:0/ws",
    ],
)
def test_port_0_in_absolute_form_is_invalid(target: bytes) -> None:
    """`url.port or default` read ":0" as no port: the request went to port 80 / 443."""
    route._ORIGINS.clear()
    for _ in range(2):  # and the memo of prefixes never learns it either
        with pytest.raises(ProtocolError, match="invalid port") as info:
            route_for(target, None)
        assert info.value.status == 400
    # Inside a tunnel the CONNECT authority decides, but the target must still be valid.
    with pytest.raises(ProtocolError, match="invalid port"):
        route_for(target, Tunnel("https", "a.test", 443, "a.test"))
    for port in (1, 65535):  # the bounds themselves stay valid
        assert route_for(b"http://a.test:%d/" % port, None).port == port


@pytest.mark.parametrize(
    "target", [b"a.test:0", b"a.test:00", b"[::1]:0", b"a.test:65536", b"a.test:" + b"9" * 5000]
)
def test_connect_port_out_of_range_is_an_invalid_port(target: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid port") as info:
        parse_authority(target)
    assert info.value.status == 400
    assert parse_authority(b"a.test:1") == ("a.test", 1)
    assert parse_authority(b"a.test:65535") == ("a.test", 65535)
    assert parse_authority(b"a.test:000443") == ("a.test", 443)


# --- policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "fd00:ec2::254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_private_loopback_and_metadata_addresses_are_refused(address: str) -> None:
    assert refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::1", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(address) is None


# --- scheduler ---------------------------------------------------------------------

V4 = [Egress(f"127.0.0.{i}", "lo", socket.AF_INET) for i in (2, 3, 4)]
V6 = Egress("2001:db8::1", "eth0", socket.AF_INET6)


def test_round_robin_cycles_in_order() -> None:
    rr = Scheduler(V4)
    assert [rr.pick() for _ in range(7)] == [*V4, *V4, V4[0]]


@pytest.mark.parametrize("strategy", ["round-robin", "least-busy"])
def test_a_request_bound_to_one_address_leaves_the_rotation_where_it_was(strategy: str) -> None:
    """A pinned or session request (`only`) moved the shared position past its own
    address, so the unbound requests between such requests kept landing on the address
    after it: one address got them all."""
    rr = Scheduler(V4, strategy=strategy)
    seen = []
    for _ in range(2 * len(V4)):
        assert rr.acquire("a.test", 0.0, only=V4[0].address) == V4[0]
        seen.append(rr.acquire("a.test", 0.0))
    assert seen == [*V4, *V4]


def test_family_pick_skips_to_the_next_of_that_family() -> None:
    rr = Scheduler([V4[0], V6, V4[1]])
    assert rr.pick(socket.AF_INET6) == V6
    assert rr.pick() == V4[0]  # a lane of its own: the family's pick did not move it
    assert rr.pick(socket.AF_INET) == V4[0]
    assert rr.pick(socket.AF_INET) == V4[1]
    assert rr.pick(socket.AF_INET6) == V6
    assert Scheduler(V4).pick(socket.AF_INET6) is None
    assert "3 addresses" in repr(rr)


# --- pool --------------------------------------------------------------------------


class FakeConn:
    """Only bookkeeping is under test here; real connections are exercised end to end."""

    def __init__(self, key: PoolKey, alive: bool = True) -> None:
        self.key = key
        self.idle_since = 0.0
        self.max_idle_s = float("inf")
        self.alive = alive
        self.closed = False
        self.dropped = False  # closed at once, to bound descriptors

    def usable(self) -> bool:
        return self.alive and not self.closed

    def close(self) -> None:
        self.closed = True

    def drop(self) -> None:
        self.closed = self.dropped = True


KEY: PoolKey = ("127.0.0.2", "https", "a.test", 443, "a.test")


def test_pool_reuses_most_recent_and_drops_dead() -> None:
    now = [0.0]
    pool: Pool[FakeConn] = Pool(max_idle_per_key=4, idle_s=10, clock=lambda: now[0])
    a, b, dead = FakeConn(KEY), FakeConn(KEY), FakeConn(KEY)
    for c in (a, b, dead):
        pool.checkin(c)
    dead.alive = False
    assert pool.checkout(KEY) is b  # `dead` was newest: closed and skipped
    assert dead.closed
    assert pool.checkout(KEY) is a
    assert pool.checkout(KEY) is None
    assert pool.checkout(("127.0.0.3", "https", "a.test", 443, "a.test")) is None


def test_pool_hands_out_a_connection_only_for_the_name_it_was_verified_for() -> None:
    pool: Pool[FakeConn] = Pool(max_idle_per_key=4, idle_s=10, clock=lambda: 0.0)
    verified_as_a = FakeConn(KEY)
    pool.checkin(verified_as_a)
    assert pool.checkout(("127.0.0.2", "https", "a.test", 443, "b.test")) is None
    assert pool.checkout(KEY) is verified_as_a


def test_pool_expires_idle_and_caps_per_key() -> None:
    now = [0.0]
    pool: Pool[FakeConn] = Pool(max_idle_per_key=2, idle_s=10, clock=lambda: now[0])
    conns = [FakeConn(KEY) for _ in range(3)]
    for c in conns:
        pool.checkin(c)
    assert conns[0].closed and len(pool) == 2  # over the cap: the oldest goes
    now[0] = 11.0
    assert pool.prune() == 2
    assert len(pool) == 0 and all(c.closed for c in conns)
    assert "idle=0" in repr(pool)


def test_websocket_schemes_map_to_http_and_https() -> None:
    assert route_for(b"ws://a.test/ws", None).scheme == "http"
    r = route_for(b"wss://a.test/ws", None)
    assert (r.scheme, r.port) == ("https", 443)


def test_shared_cursor_rotation_is_global_across_processes() -> None:
    """Two forked processes picking in turn see one rotation, not one each."""
    import multiprocessing

    from demux_proxy.scheduler import SharedCursor

    ctx = multiprocessing.get_context("fork")
    cursor = SharedCursor(ctx)
    rr = Scheduler(V4, cursor=cursor)
    assert rr.pick() == V4[0]
    child = ctx.Process(target=rr.pick)  # the child takes V4[1]
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert rr.pick() == V4[2]


def test_shared_buckets_hold_one_budget_across_processes() -> None:
    """Two forked processes with a burst of 1 between them: one token, not one each."""
    import multiprocessing

    from demux_proxy.limits import HostRate
    from demux_proxy.scheduler import SharedBuckets

    ctx = multiprocessing.get_context("fork")
    rule = HostRate("a.test", rate_per_s=1 / 60, burst=1)
    buckets = SharedBuckets(ctx, [("127.0.0.2", "a.test"), ("127.0.0.3", "a.test")])
    workers = [Scheduler(V4, rules=RateRules([rule]), workers=2, buckets=buckets)]
    took = ctx.Value("i", 0)

    def child() -> None:
        other = Scheduler(V4, rules=RateRules([rule]), workers=2, buckets=buckets)
        got = other.acquire("a.test", 100.0, exclude=[], only="127.0.0.2")
        took.value = 1 if isinstance(got, Egress) else 2

    assert isinstance(workers[0].acquire("a.test", 100.0, exclude=[], only="127.0.0.2"), Egress)
    proc = ctx.Process(target=child)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 0
    assert took.value == 2  # the child found the one token spent: it must wait
    # 127.0.0.3's bucket is its own; and after 60 s the shared one has a token again.
    assert isinstance(workers[0].acquire("a.test", 100.0, exclude=[], only="127.0.0.3"), Egress)
    assert isinstance(workers[0].acquire("a.test", 161.0, exclude=[], only="127.0.0.2"), Egress)
    # Sent only at 162 (a new connection): the shared bucket's next token is 60 s after.
    workers[0].sent_late("127.0.0.2", "a.test", 162.0)
    assert workers[0].acquire("a.test", 221.5, exclude=[], only="127.0.0.2") == pytest.approx(0.5)


def test_random_is_uniform_over_the_addresses_that_may_send() -> None:
    """With one address out (cooling, excluded), each of the others gets a third: a
    permutation walk from a random start gave the one after it half again as many."""
    import random

    from demux_proxy.scheduler import RandomStrategy

    strategy = RandomStrategy(random.Random(7))
    picks = Counter(strategy.choose(4, lambda i: i != 0) for _ in range(6000))
    assert set(picks) == {1, 2, 3}
    assert all(1800 <= picks[i] <= 2200 for i in (1, 2, 3)), picks
    assert strategy.choose(4, lambda i: False) is None


def test_a_token_another_worker_takes_meanwhile_is_not_given_twice() -> None:
    """The look at a bucket and the take are two steps: another worker may take the last
    token in between. This one then gets another address, or a wait: never that token."""
    import multiprocessing

    from demux_proxy.limits import HostRate
    from demux_proxy.scheduler import SharedBuckets

    ctx = multiprocessing.get_context("fork")
    rule = HostRate("a.test", rate_per_s=1 / 60, burst=1)
    keys = [(e.address, "a.test") for e in V4]
    buckets = SharedBuckets(ctx, keys)
    other = Scheduler(V4, rules=RateRules([rule]), workers=1, buckets=buckets)

    class RacedCursor:
        """The other worker takes its pick's token right after this one looked."""

        def take(self, n: int, accept: Callable[[int], bool], lane: int = 0) -> int | None:
            i = next((j for j in range(n) if accept(j)), None)
            if i is not None:
                assert isinstance(other.acquire("a.test", 100.0, only=V4[i].address), Egress)
            return i

    this = Scheduler(V4, cursor=RacedCursor(), rules=RateRules([rule]), workers=1, buckets=buckets)
    got = this.acquire("a.test", 100.0)
    # Every address looked free to it and each went to the other worker first.
    assert isinstance(got, float) and 59 < got <= 60, got
    # Nothing was granted twice: every bucket is empty, for both.
    assert all(isinstance(other.acquire("a.test", 100.0, only=e.address), float) for e in V4)


def _die_holding(ctx: Any, lock: Any) -> None:
    """A forked process takes `lock` and is SIGKILLed holding it (a worker the OOM
    killer took inside a critical section)."""
    import signal

    holding = ctx.Event()

    def hold() -> None:
        lock.acquire()
        holding.set()
        time.sleep(60)

    proc = ctx.Process(target=hold)
    proc.start()
    assert holding.wait(10)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("which", ["cursor", "buckets"])
def test_a_lock_held_by_a_killed_process_is_released(which: str) -> None:
    """A worker SIGKILLed inside a critical section leaves the lock taken: the
    supervisor's release_if_stuck frees it, and only then (never a free lock)."""
    import multiprocessing

    from demux_proxy.scheduler import SharedBuckets, SharedCursor

    ctx = multiprocessing.get_context("fork")
    shared = SharedCursor(ctx) if which == "cursor" else SharedBuckets(ctx, [("a", "b")])
    lock = shared._lock
    assert shared.release_if_stuck(0.05) is False  # free: left alone
    _die_holding(ctx, lock)
    assert not lock.acquire(timeout=0.1)  # what every worker would block on, for good
    assert shared.release_if_stuck(0.05) is True
    if isinstance(shared, SharedCursor):
        assert Scheduler(V4, cursor=shared).pick() == V4[0]
    else:
        assert shared.take(0, 100.0, 1.0, 1) is True
    assert lock.acquire(timeout=1)
    assert not lock.acquire(timeout=0.05)  # released once, not twice: still a lock
    lock.release()
    assert shared.release_if_stuck(0.05) is False


def test_a_live_worker_waiting_inside_the_rotation_keeps_its_lock() -> None:
    """A worker died holding the buckets' lock while a live one, holding the rotation's,
    waited for it: the rotation's was looked at first, seemed stuck, and was released
    under the live worker, whose own release then failed ("released too many times")."""
    import multiprocessing

    from demux_proxy.scheduler import SharedBuckets, SharedCursor
    from demux_proxy.workers import release_dead_locks

    ctx = multiprocessing.get_context("fork")
    cursor, buckets = SharedCursor(ctx), SharedBuckets(ctx, [("a", "b")])
    waiting, outcome = ctx.Event(), ctx.Queue()
    _die_holding(ctx, buckets._lock)  # what the live worker will wait for, inside

    def live() -> None:
        try:
            with cursor._lock:
                waiting.set()
                with buckets._lock:
                    pass
            outcome.put("ok")
        except Exception as exc:
            outcome.put(repr(exc))

    worker = ctx.Process(target=live)
    worker.start()
    assert waiting.wait(10)
    assert release_dead_locks(cursor, buckets, 0.5) == ["host-rate"]
    assert outcome.get(timeout=10) == "ok"
    worker.join(10)
    assert cursor._lock.acquire(timeout=1)  # one lock still: taken, then not again
    assert not cursor._lock.acquire(timeout=0.05)
    cursor._lock.release()


def test_a_request_in_flight_may_outlive_its_address() -> None:
    """Re-discovery removed the address mid-request: its end must not raise (it was a
    KeyError) nor bring the address's count back."""
    sched = Scheduler(V4)
    gone = V4[1].address
    sched.started(gone)
    sched.update([V4[0], V4[2]])
    sched.finished(gone)
    sched.started(gone)  # a dial that picked it before the update
    assert gone not in sched.in_flight
    sched.started(V4[0].address)
    sched.finished(V4[0].address)
    sched.finished(V4[0].address)  # never below zero
    assert sched.in_flight[V4[0].address] == 0


def test_pool_counts_idle_connections_per_egress() -> None:
    pool: Pool[FakeConn] = Pool(max_idle_per_key=4, idle_s=10, clock=lambda: 0.0)
    other: PoolKey = ("127.0.0.3", "http", "b.test", 80, "b.test")
    for key in (KEY, KEY, other):
        pool.checkin(FakeConn(key))
    assert pool.idle_by_egress() == {"127.0.0.2": 2, "127.0.0.3": 1}
    assert pool.checkout(other) is not None  # emptied: its key is kept for the checkin
    assert pool.idle_by_egress() == {"127.0.0.2": 2}
    assert "keys=2 " in repr(pool)
    pool.checkin(FakeConn(other))
    assert pool.checkout(other) is not None
    assert pool.prune() == 0  # and dropped by the next prune
    assert "keys=1 " in repr(pool) and len(pool) == 2


def test_pool_bounds_idle_connections_in_all_least_recently_used_first() -> None:
    """Many hosts x many addresses: the total stays bounded, whatever the per-key cap."""
    pool: Pool[FakeConn] = Pool(max_idle_per_key=4, idle_s=10, max_idle=3, clock=lambda: 0.0)
    keys: list[PoolKey] = [("127.0.0.2", "http", f"h{i}.test", 80, f"h{i}.test") for i in range(5)]
    conns = [FakeConn(k) for k in keys]
    for c in conns:
        pool.checkin(c)
    assert len(pool) == 3
    assert [c.dropped for c in conns] == [True, True, False, False, False]
    # A checkout and checkin makes a connection the most recently used: h2 outlives h3.
    assert pool.checkout(keys[2]) is conns[2]
    pool.checkin(conns[2])
    pool.checkin(FakeConn(keys[0]))
    assert conns[3].closed and not conns[2].closed
    assert pool.checkout(keys[3]) is None and pool.checkout(keys[1]) is None
    assert sorted(pool.idle_by_egress().values()) == [3]


def test_a_connection_leaves_the_pool_before_its_servers_keep_alive_timeout() -> None:
    """Keep-Alive: timeout=5 (Apache, Node): kept the pool's 30 s, the connection met
    the server's close when reused, and a POST on it was a 502."""
    now = [0.0]
    pool: Pool[FakeConn] = Pool(max_idle_per_key=4, idle_s=30, clock=lambda: now[0])
    short, plain = FakeConn(KEY), FakeConn(("127.0.0.3", "http", "b.test", 80, "b.test"))
    short.max_idle_s = 4.0
    pool.checkin(short)
    pool.checkin(plain)
    now[0] = 3.9
    assert pool.checkout(KEY) is short
    pool.checkin(short)
    now[0] = 7.85
    assert pool.prune() == 0
    now[0] = 7.9
    assert pool.prune() == 1 and short.closed and not plain.closed
    other = FakeConn(KEY)
    other.max_idle_s = 4.0
    pool.checkin(other)
    now[0] = 12.0
    assert pool.checkout(KEY) is None and other.closed


def test_pool_shed_closes_the_oldest_quarter_and_prune_keeps_the_order() -> None:
    now = [0.0]
    pool: Pool[FakeConn] = Pool(max_idle_per_key=8, idle_s=10, clock=lambda: now[0])
    assert pool.shed() == 0
    conns = []
    for i in range(8):
        c = FakeConn(KEY if i % 2 else ("127.0.0.3", "http", "b.test", 80, "b.test"))
        c.idle_since = now[0] = float(i)
        pool.checkin(c)
        conns.append(c)
    conns[5].alive = False
    assert pool.prune() == 1 and len(pool) == 7
    assert pool.shed() == 4  # a quarter of 7 is 2, but at least SHED_AT_LEAST
    assert [c.closed for c in conns] == [True, True, True, True, False, True, False, False]
    assert [c.dropped for c in conns] == [True, True, True, True, False, False, False, False]
    assert len(pool) == 3  # conns[5] was pruned (its server closed it): closed, not dropped
    assert pool.checkout(KEY) is conns[7]
    assert pool.shed() == 2  # fewer left than SHED_AT_LEAST: all of them
    assert len(pool) == 0 and pool.checkout(KEY) is None
    big: Pool[FakeConn] = Pool(max_idle_per_key=100, idle_s=10, clock=lambda: now[0])
    for _ in range(40):
        big.checkin(FakeConn(KEY))
    assert big.shed() == 10 and len(big) == 30  # a quarter
    big.close_all()
    assert len(big) == 0


def test_the_first_request_after_a_cooldown_is_its_one_probe() -> None:
    """A cooldown that ended let every queued request through at once, to meet the
    server's refusal together: one goes, the rest wait for its answer."""
    s = Scheduler(V4[:1])
    address = V4[0].address
    s.cooldowns.cool(address, "a.test", 0.0, 10.0)
    assert s.acquire("a.test", 5.0) == pytest.approx(5.0)
    probe = s.acquire("a.test", 10.0)
    assert isinstance(probe, Egress)
    held = s.acquire("a.test", 10.01)  # a short look again, not the 5 s lease
    assert isinstance(held, float) and 0 < held <= 0.05, held
    assert isinstance(s.acquire("other.test", 10.01), Egress)  # only that host waits
    s.cooldowns.cool(address, "a.test", 10.02, 10.0)  # refused again: 10 s more
    assert s.acquire("a.test", 10.03) == pytest.approx(9.99)
    assert isinstance(s.acquire("a.test", 20.02), Egress)  # the next probe
    s.cooldowns.ok(address, "a.test")  # answered: everyone goes
    assert all(isinstance(s.acquire("a.test", 20.03), Egress) for _ in range(3))
    # An answer that is neither (a 404) ends the probe too; its strikes are kept.
    s.cooldowns.cool(address, "b.test", 30.0, 1.0)
    assert isinstance(s.acquire("b.test", 31.0), Egress)
    assert isinstance(s.acquire("b.test", 31.0), float)
    s.cooldowns.settled(address, "b.test")
    assert isinstance(s.acquire("b.test", 31.0), Egress)
    assert s.cooldowns.cool(address, "b.test", 40.0, None) >= 1.0  # second strike: 1-2 s
    # A probe never answered (its client gone, its connection lost) holds 5 s at most.
    assert isinstance(s.acquire("b.test", 43.0), Egress)
    assert isinstance(s.acquire("b.test", 47.9), float)
    assert isinstance(s.acquire("b.test", 48.1), Egress)


@pytest.mark.parametrize("shared", [False, True])
def test_each_family_rotates_over_its_own_addresses(shared: bool) -> None:
    """IPv4-only and IPv6-only hosts in turn: one rotation position, moved by both,
    went back past the same addresses, and the second of each family never sent."""
    import multiprocessing

    from demux_proxy.scheduler import LocalCursor, SharedCursor

    mixed = [
        Egress("192.0.2.1", "eth0", socket.AF_INET),
        Egress("192.0.2.2", "eth0", socket.AF_INET),
        Egress("2001:db8::1", "eth0", socket.AF_INET6),
        Egress("2001:db8::2", "eth0", socket.AF_INET6),
    ]
    cursor = SharedCursor(multiprocessing.get_context("fork")) if shared else LocalCursor()
    s = Scheduler(mixed, cursor=cursor)
    sent: Counter[str] = Counter()
    either: Counter[str] = Counter()
    for _ in range(10):
        for host, family in (("v4.test", socket.AF_INET), ("v6.test", socket.AF_INET6)):
            got = s.acquire(host, 0.0, family=family)
            assert isinstance(got, Egress) and got.family == family
            sent[got.address] += 1
        both = s.acquire("both.test", 0.0)  # either family: the third lane
        assert isinstance(both, Egress)
        either[both.address] += 1
    assert sent == dict.fromkeys(sent, 5) and len(sent) == 4, sent
    assert sorted(either.values()) == [2, 2, 3, 3], either
    assert [s.pick(socket.AF_INET6).address for _ in range(2)] == ["2001:db8::1", "2001:db8::2"]
