from __future__ import annotations

import random
from collections import Counter
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demux_proxy.errors import ConfigError
from demux_proxy.limits import (
    Cooldowns,
    HostRate,
    RateRules,
    TokenBucket,
    parse_host_rate,
    parse_retry_after,
    session_egress,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api.example.com=5/s", HostRate("api.example.com", 5.0, 1)),
        ("*.Example.COM.=300/min:10", HostRate("*.example.com", 5.0, 10)),
        ("a.example=0.5/s", HostRate("a.example", 0.5, 1)),
        ("host=3600/h:2", HostRate("host", 1.0, 2)),
        ("10.0.0.1=.5/s", HostRate("10.0.0.1", 0.5, 1)),
        ("::1=1/s", HostRate("::1", 1.0, 1)),
        ("[2001:DB8:0::1]=1/s", HostRate("2001:db8::1", 1.0, 1)),
    ],
)
def test_parse_host_rate(text: str, expected: HostRate) -> None:
    assert parse_host_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("api.example.com", "missing '='"),
        ("=5/s", "bad host"),
        ("a..b=5/s", "bad host"),
        ("*=5/s", "bad host"),
        ("a b=5/s", "bad host"),
        ("api.example.com:443=5/s", "a budget is per host, whatever the port"),
        ("[::1]:443=5/s", "a budget is per host"),
        ("h=5", "bad rate"),
        ("h=five/s", "bad rate"),
        ("h=-1/s", "bad rate"),
        ("h=5/day", "unknown unit"),
        ("h=0/s", "positive"),
        ("h=5/s:0", "burst"),
        ("h=5/s:x", "burst"),
        ("h=5/s:", "burst"),
    ],
)
def test_parse_host_rate_rejects(text: str, what: str) -> None:
    with pytest.raises(ConfigError, match=what) as info:
        parse_host_rate(text)
    assert repr(text) in str(info.value)


def test_match_precedence() -> None:
    exact = HostRate("api.example.com", 1.0)
    wide = HostRate("*.example.com", 2.0)
    narrow = HostRate("*.b.example.com", 3.0)
    rules = RateRules([wide, exact, narrow])
    assert rules
    assert not RateRules([])
    assert rules.match("API.Example.com.") is exact
    assert rules.match("a.example.com") is wide
    assert rules.match("x.a.example.com") is wide
    assert rules.match("x.b.example.com") is narrow
    assert rules.match("b.example.com") is wide
    assert rules.match("example.com") is None
    assert rules.match("other.org") is None
    literal = HostRate("2001:db8::1", 1.0)
    assert RateRules([literal]).match("2001:DB8:0:0::1") is literal  # as a request has it
    with pytest.raises(ConfigError, match="twice"):
        RateRules([wide, HostRate("*.EXAMPLE.com", 1.0)])


def test_bucket_starts_full_and_refills() -> None:
    bucket = TokenBucket(2.0, 3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s(100.0) == pytest.approx(0.5)
    assert bucket.wait_s(100.25) == pytest.approx(0.25)
    assert not bucket.take(100.4)
    assert bucket.take(100.5)
    assert bucket.wait_s(110.0) == 0.0
    assert [bucket.take(110.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_a_token_spent_late_counts_from_when_the_request_left() -> None:
    """Admitted at 0, the request waited 0.1 s for a connection: at 2/s the next one
    leaves 0.5 s after it (0.6), not after its admission (0.5), which an exact limiter
    at the site answered with a 429. A burst keeps what the cap would not have cut."""
    bucket = TokenBucket(2.0, 1, now=0.0)
    assert bucket.take(0.0)
    bucket.spend_late(0.1)
    assert not bucket.take(0.55)
    assert bucket.wait_s(0.55) == pytest.approx(0.05)
    assert bucket.take(0.6)
    burst = TokenBucket(2.0, 3, now=0.0)
    assert burst.take(0.0)  # 2 left
    burst.spend_late(1.0)  # refilled to the cap (3) meanwhile: as if taken at 1.0
    assert [burst.take(1.0) for _ in range(3)] == [True, True, False]
    partial = TokenBucket(2.0, 3, now=0.0)
    assert [partial.take(0.0) for _ in range(3)] == [True] * 3
    partial.spend_late(0.25)  # 0.5 refilled, under the cap: nothing is taken back
    assert partial.wait_s(0.25) == pytest.approx(0.25)


def test_bucket_wait_is_exact() -> None:
    bucket = TokenBucket(1 / 3, 1, now=0.0)
    now = 0.0
    for _ in range(50):
        assert bucket.take(now)
        wait = bucket.wait_s(now)
        assert wait == pytest.approx(3.0)
        assert not bucket.take(now + wait * 0.99)
        now += wait
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1, now=0.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.01, 1000.0),
    burst=st.integers(1, 50),
    steps=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=200),
)
def test_bucket_never_exceeds_rate(rate: float, burst: int, steps: list[float]) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    takes = 0
    for step in steps:
        now += step
        while bucket.take(now):
            takes += 1
    assert takes <= burst + rate * now + 1e-6


def test_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(b"120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("99999", now) == 3600.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now) == pytest.approx(90.0)
    assert parse_retry_after(formatdate(now + 90_000, usegmt=True), now) == 3600.0
    for garbage in (None, "", "-5", "1.5", "soon", b"\xff\xfe", "Wed, 99 Foo 2015"):
        assert parse_retry_after(garbage, now) is None


def test_cooldown_honours_retry_after() -> None:
    cd = Cooldowns()
    assert cd.cool("10.0.0.1", "h", 10.0, 30.0) == 30.0
    assert cd.cooling("10.0.0.1", "H.", 20.0)
    assert cd.remaining("10.0.0.1", "h", 20.0) == pytest.approx(20.0)
    assert not cd.cooling("10.0.0.1", "h", 40.0)
    assert not cd.cooling("10.0.0.2", "h", 20.0)
    assert cd.remaining("10.0.0.1", "other", 20.0) == 0.0
    assert repr(cd) == "<Cooldowns 1 cooling>"


def test_a_port_cools_apart_from_its_host() -> None:
    """A network fault cools (address, host, port); a cooling status (port 0) the host's
    every port. Each port sees both; a success resets both strikes."""
    cd = Cooldowns(base_s=1.0, max_s=100.0, rng=random.Random(5))
    cd.cool("e", "h", 0.0, 30.0, 8443)
    assert cd.cooling("e", "h", 1.0, 8443) and not cd.cooling("e", "h", 1.0, 443)
    assert not cd.cooling("e", "h", 1.0)  # the host as such is not cooling
    assert cd.soonest(["e"], "h", 1.0, 443) == 0.0
    assert cd.soonest(["e"], "h", 1.0, 8443) == pytest.approx(29.0)
    cd.cool("e", "h", 0.0, 60.0)  # a 429: every port
    assert cd.remaining("e", "h", 1.0, 443) == pytest.approx(59.0)
    assert cd.remaining("e", "h", 1.0, 8443) == pytest.approx(59.0)  # the longer of two
    assert cd.cooling_by_egress(1.0) == {"e": 1}  # one host, however many ports
    for t in range(1, 6):
        cd.cool("e", "h", t * 200.0, None, 8443)
        cd.cool("e", "h", t * 200.0, None)
    cd.ok("e", "h", 8443)
    assert cd.cool("e", "h", 2000.0, None, 8443) <= 1.0
    assert cd.cool("e", "h", 2000.0, None) <= 1.0


def test_backoff_grows_caps_and_jitters() -> None:
    cd = Cooldowns(base_s=1.0, max_s=16.0, rng=random.Random(7))
    for strike in range(1, 10):
        full = min(16.0, 2.0 ** (strike - 1))
        now = strike * 20.0  # the previous cooldown has run out, its strike is kept
        applied = cd.cool("e", "h", now, None)
        assert 0.5 * full <= applied <= full
    # same seed, same sequence
    a, b = Cooldowns(rng=random.Random(1)), Cooldowns(rng=random.Random(1))
    assert [a.cool("e", "h", t, None) for t in range(5)] == [
        b.cool("e", "h", t, None) for t in range(5)
    ]


def test_ok_resets_strikes() -> None:
    cd = Cooldowns(base_s=1.0, max_s=100.0, rng=random.Random(3))
    for t in range(6):
        cd.cool("e", "h", float(t * 100), None)
    assert cd.cool("e", "h", 700.0, None) >= 32.0
    cd.ok("e", "h")
    assert cd.cool("e", "h", 1000.0, None) <= 1.0


def test_soonest() -> None:
    cd = Cooldowns()
    cd.cool("a", "h", 0.0, 10.0)
    cd.cool("b", "h", 0.0, 5.0)
    assert cd.soonest(["a", "b"], "h", 1.0) == pytest.approx(4.0)
    assert cd.soonest(["a", "b", "c"], "h", 1.0) == 0.0
    assert cd.soonest([], "h", 1.0) == 0.0


def test_prune() -> None:
    cd = Cooldowns(max_s=10.0)
    cd.cool("a", "h", 0.0, 5.0)
    cd.cool("b", "h", 0.0, 50.0)
    cd.cool("c", "h", 0.0, 5.0)
    cd.ok("c", "h")
    cd.prune(6.0)  # c expired without strikes; a keeps its strike for max_s
    assert len(cd) == 2
    cd.prune(16.0)
    assert len(cd) == 1 and cd.cooling("b", "h", 16.0)
    small = Cooldowns(max_entries=3)
    for i in range(5):
        small.cool(f"e{i}", "h", 0.0, 60.0)
    small.prune(1.0)
    assert len(small) == 3
    assert not small.cooling("e0", "h", 1.0) and small.cooling("e4", "h", 1.0)


def test_session_egress_stable_and_minimal_moves() -> None:
    addrs = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    ids = [f"session-{i}" for i in range(1000)]
    before = {s: session_egress(s, addrs) for s in ids}
    assert before == {s: session_egress(s, list(reversed(addrs))) for s in ids}
    counts = Counter(before.values())
    assert set(counts) == set(addrs)
    assert all(150 <= n <= 350 for n in counts.values())
    after = {s: session_egress(s, addrs[:2] + addrs[3:]) for s in ids}
    moved = {s for s in ids if before[s] != after[s]}
    assert moved == {s for s in ids if before[s] == "10.0.0.3"}
    assert session_egress("x", []) is None
    assert session_egress("x", ["only"]) == "only"
