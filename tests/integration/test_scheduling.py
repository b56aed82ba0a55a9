"""Rate-limit-aware scheduling against an upstream that limits each source address.

The upstream here enforces a token bucket per source address and answers 429 with
Retry-After when it is empty, as the services users crawl do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from aiohttp import web

from tests.proxy_process import EGRESS, ProxyProcess, running_proxy
from tests.rawserver import read_head
from tests.upstream import Upstream

# The upstream reads its clock in a thread of the test process, beside the client
# threads: on a loaded machine that reading lags the proxy's send by tens of ms, more
# for one request than for the next. The upstream forgives a quarter of a token at 5/s;
# a burst overshoot (two at once) is still far outside.
JITTER_S = 0.05


@dataclass
class Limited:
    port: int = 0
    ipv6: bool = False  # also listening on [::1]
    rate: float = 5.0
    banned: set[str] = field(default_factory=set)  # sources answered 429 always
    retry_after: int = 1
    ok: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    headers: list[dict[str, str]] = field(default_factory=list)
    _last: dict[str, float] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.remote or ""
        self.headers.append(dict(request.headers))
        now = time.monotonic()
        last = self._last.get(peer)
        if peer in self.banned or (last is not None and now - last < 1 / self.rate - JITTER_S):
            self.refused[peer] += 1
            return web.Response(
                status=429, text="slow down", headers={"Retry-After": str(self.retry_after)}
            )
        self._last[peer] = now
        self.ok[peer] += 1
        return web.Response(text=peer)


@pytest.fixture
def limited() -> Iterator[Limited]:
    state = Limited()
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{tail:.*}", state.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.port = runner.addresses[0][1]
        with contextlib.suppress(OSError):  # and on [::1], same port, where IPv6 works
            await web.TCPSite(runner, "::1", state.port).start()
            state.ipv6 = True
        return runner

    runner_box: list[web.AppRunner] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner_box.append(loop.run_until_complete(start()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield state
    finally:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _get(p: ProxyProcess, url: str, **kw: object) -> requests.Response:
    with requests.Session() as s:
        return s.get(url, proxies={"http": p.url}, timeout=30, **kw)  # type: ignore[arg-type]


def test_host_rate_reaches_n_times_rate_without_a_429(tmp_path: Path, limited: Limited) -> None:
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state", "--workers", "1", "--host-rate", "127.0.0.1=5/s") as p:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: _get(p, url).status_code, range(40)))
        elapsed = time.monotonic() - started
    assert codes == [200] * 40
    assert sum(limited.refused.values()) == 0
    assert dict(limited.ok) == dict.fromkeys(EGRESS, 10)
    # 4 addresses x 5/s: 40 requests in about 2 s (the first 4 go at once).
    assert 1.4 < elapsed < 8


def test_a_429_cools_the_pair_and_the_request_goes_elsewhere(
    tmp_path: Path, limited: Limited
) -> None:
    limited.rate = 1000.0
    limited.banned = {"127.0.0.3"}
    limited.retry_after = 2
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state", "--workers", "1") as p:
        codes = [_get(p, url).status_code for _ in range(8)]
        assert codes == [200] * 8  # the client never sees the banned address's 429
        assert limited.refused["127.0.0.3"] == 1  # asked once, then left alone
        retried = p.wait_for_log("inbound response", lambda line: "retried_from" in line["fields"])
        assert retried["fields"]["retried_from"] == ["127.0.0.3"]
        assert 1.9 <= retried["fields"]["cooldown"] <= 2
        limited.banned = set()
        time.sleep(2.2)  # the cooldown ends: the address comes back
        for _ in range(4):
            assert _get(p, url).status_code == 200
        assert limited.ok["127.0.0.3"] >= 1


def test_every_address_cooling_gives_the_429_with_the_smallest_retry_after(
    tmp_path: Path, limited: Limited
) -> None:
    limited.banned = set(EGRESS)
    limited.retry_after = 5
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(
        tmp_path / "state", "--workers", "1", "--retries", "3", "--queue-timeout", "1"
    ) as p:
        r = _get(p, url)
        assert r.status_code == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 5
        assert sum(limited.refused.values()) == 4  # each address tried once
        # Every address cooling now: the next request waits in the host's queue for
        # --queue-timeout, then a 503 says how long until the first is ready.
        started = time.monotonic()
        r = _get(p, url)
        assert r.status_code == 503 and "within 1 s" in r.text, r.text
        assert time.monotonic() - started >= 0.9
        assert 1 <= int(r.headers["Retry-After"]) <= 5
        assert sum(limited.refused.values()) == 4  # nothing more was sent


def test_queue_timeout_is_a_503_with_retry_after(tmp_path: Path, limited: Limited) -> None:
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--host-rate", "127.0.0.1=1/min",
        "--queue-timeout", "2",
        egress=["127.0.0.2"],
    ) as p:  # fmt: skip
        assert _get(p, url).status_code == 200
        started = time.monotonic()
        r = _get(p, url)
        assert r.status_code == 503
        assert 1.9 < time.monotonic() - started < 8
        # What is left of the minute after the 2 s already waited, not the whole minute.
        assert 50 <= int(r.headers["Retry-After"]) <= 59
        assert r.headers["Content-Type"].startswith("text/plain") and "--host-rate" in r.text


def test_queued_requests_all_get_what_is_left_of_the_wait(tmp_path: Path, limited: Limited) -> None:
    """Requests that time out behind the head of the queue were told Retry-After: 1."""
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--host-rate", "127.0.0.1=6/min",
        "--queue-timeout", "2",
        egress=["127.0.0.2", "127.0.0.3"],
    ) as p:  # fmt: skip
        assert [_get(p, url).status_code for _ in range(2)] == [200, 200]  # both tokens
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: _get(p, url), range(5)))
    assert [r.status_code for r in answers] == [503] * 5
    # The next token is about 10 s after the first request, 2 s of it already waited.
    assert all(5 <= int(r.headers["Retry-After"]) <= 10 for r in answers), [
        r.headers["Retry-After"] for r in answers
    ]


def test_one_request_probes_an_ended_cooldown_before_the_queue_follows(
    tmp_path: Path, limited: Limited
) -> None:
    """When a cooldown ended, every request queued for it went at once, and a server
    still refusing the address answered each of them 429: one probes, the rest follow
    its success."""
    limited.rate = 1000.0
    limited.banned = {"127.0.0.2"}
    limited.retry_after = 1
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state", "--workers", "1", egress=["127.0.0.2"]) as p:
        assert _get(p, url).status_code == 429  # cools 1 s
        # The ban lifts halfway through the second cooldown, which the probe meets.
        lift = threading.Timer(1.5, limited.banned.clear)
        lift.start()
        try:
            with ThreadPoolExecutor(6) as pool:
                codes = sorted(pool.map(lambda _: _get(p, url).status_code, range(6)))
        finally:
            lift.cancel()
    assert codes == [200] * 5 + [429], codes  # the probe's client gets its 429
    assert limited.refused["127.0.0.2"] == 2, limited.refused  # not 7
    assert limited.ok["127.0.0.2"] == 5


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_gone_while_queued_gives_up_its_place(
    tmp_path: Path, limited: Limited, how: str
) -> None:
    """A crawler that times out while its request waits for budget closes the
    connection: the token then goes to the next request in the queue, not to an answer
    nobody reads (the upstream sees only the requests of clients still there)."""
    limited.rate = 1000.0
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--host-rate", "127.0.0.1=20/min",  # one token every 3 s
        "--queue-timeout", "20",
        egress=["127.0.0.2"],
    ) as p:  # fmt: skip
        assert _get(p, url).status_code == 200  # the token: the next one waits 3 s
        quitter = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        quitter.sendall(f"GET {url}?quitter HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        time.sleep(0.5)  # queued now, behind no one
        if how == "reset":
            quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        quitter.close()
        assert _get(p, url).status_code == 200  # queued behind the quitter
        lost = p.wait_for_log("inbound response", lambda line: "quitter" in line["fields"]["url"])
    assert lost["fields"]["error"] == (
        "client connection lost: it closed while its request waited in the queue"
    ), lost  # said once, not "client connection lost: client connection lost: ..."
    assert lost["fields"]["status_code"] == 0 and "interface" not in lost["fields"], lost
    assert limited.ok["127.0.0.2"] == 2  # the first request and the last: not the quitter's


def test_a_client_gone_behind_another_in_the_queue_is_let_go_at_once(
    tmp_path: Path, limited: Limited
) -> None:
    """Behind the head of the queue (waiting for its turn, not for budget) a client that
    closed was noticed only at --queue-timeout, and logged as a 503 nobody got."""
    limited.rate = 1000.0
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--host-rate", "127.0.0.1=1/min",  # after the first, a token a minute
        "--queue-timeout", "20",
        egress=["127.0.0.2"],
    ) as p:  # fmt: skip
        assert _get(p, url).status_code == 200
        with contextlib.ExitStack() as stack:
            for who in ("head", "behind"):
                c = stack.enter_context(socket.create_connection(("127.0.0.1", p.port), 10))
                c.sendall(f"GET {url}?{who} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                time.sleep(0.3)  # in this order in the queue
            c.close()  # the one behind
            closed = time.monotonic()
            lost = p.wait_for_log(
                "inbound response", lambda line: "behind" in line["fields"]["url"], timeout=5
            )
            waited = time.monotonic() - closed
    assert lost["fields"]["error"] == (
        "client connection lost: it closed while its request waited in the queue"
    ), lost
    assert lost["fields"]["status_code"] == 0, lost
    assert waited < 5, waited  # not the 20 s of --queue-timeout
    assert limited.ok["127.0.0.2"] == 1


def test_a_request_waiting_for_its_own_address_holds_up_no_other(
    tmp_path: Path, limited: Limited
) -> None:
    """A pinned request whose address has no budget waits for that address alone; the
    next request, which any address may serve, goes at once from a free one."""
    limited.rate = 1000.0
    url = f"http://127.0.0.1:{limited.port}/item"
    pin = {"X-Demux-Egress": "127.0.0.2"}
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--host-rate", "127.0.0.1=1/min",
        "--queue-timeout", "3",
        egress=["127.0.0.2", "127.0.0.3"],
    ) as p:  # fmt: skip
        assert _get(p, url, headers=pin).status_code == 200  # 127.0.0.2's token
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_get, p, url, headers=pin)  # 127.0.0.2's next: in 60 s
            time.sleep(0.5)
            free = _get(p, url + "?free")
            assert free.status_code == 200 and free.text == "127.0.0.3", free.text
            assert waiting.result().status_code == 503  # its own wait, to --queue-timeout
        sent = p.wait_for_log("outbound request", lambda ln: "?free" in ln["fields"]["url"])
    assert "queued_ms" not in sent["fields"], sent  # not behind the pinned one
    assert dict(limited.ok) == {"127.0.0.2": 1, "127.0.0.3": 1}


def test_a_pinned_request_gets_the_servers_429(tmp_path: Path, limited: Limited) -> None:
    """A pinned request cannot move: the 429 and its Retry-After are the client's, not
    a 502 "no egress address left" after a retry that could only fail."""
    limited.rate = 1000.0
    limited.banned = {"127.0.0.3"}
    limited.retry_after = 30
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state", "--workers", "1") as p:
        r = _get(p, url, headers={"X-Demux-Egress": "127.0.0.3"})
        assert r.status_code == 429 and r.text == "slow down"
        assert 29 <= int(r.headers["Retry-After"]) <= 30  # its address's cooldown
        assert limited.refused["127.0.0.3"] == 1
        assert _get(p, url).status_code == 200  # the others are free


def test_mixed_families_choose_among_the_hosts_family_only(
    tmp_path: Path, limited: Limited
) -> None:
    """IPv4 and IPv6 egress, an IPv6-only destination: its one IPv6 address cools on a
    429 like any other, and is not retried from itself nor counted free."""
    if not limited.ipv6:
        pytest.skip("no IPv6 on loopback here")
    limited.rate = 1000.0
    limited.banned = {"::1"}
    limited.retry_after = 30
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--queue-timeout", "1",
        egress=["127.0.0.2", "::1"],
    ) as p:  # fmt: skip
        r = _get(p, f"http://[::1]:{limited.port}/item")
        assert r.status_code == 429
        assert 29 <= int(r.headers["Retry-After"]) <= 30  # not 1: 127.0.0.2 cannot go
        assert limited.refused["::1"] == 1  # asked once, not retried from itself
        r = _get(p, f"http://[::1]:{limited.port}/item")
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 25  # it cools
        assert limited.refused["::1"] == 1
        # 127.0.0.1 written as one number: getaddrinfo says "no IPv6 address for it"
        # (EAI_ADDRFAMILY), which is an empty answer, not an error.
        peers = {_get(p, f"http://2130706433:{limited.port}/item").text for _ in range(4)}
        assert peers == {"127.0.0.2"}


def test_sessions_stick_and_egress_can_be_pinned(tmp_path: Path, limited: Limited) -> None:
    limited.rate = 1000.0
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state") as p:
        by_header = {_get(p, url, headers={"X-Demux-Session": "abc"}).text for _ in range(6)}
        assert len(by_header) == 1
        with requests.Session() as s:
            proxy = f"http://session-abc:x@127.0.0.1:{p.port}"
            by_user = {s.get(url, proxies={"http": proxy}, timeout=30).text for _ in range(6)}
        assert by_user == by_header  # the same id, the same address, however it is named
        spread = {_get(p, url, headers={"X-Demux-Session": f"s{i}"}).text for i in range(40)}
        assert len(spread) > 1
        pinned = {_get(p, url, headers={"X-Demux-Egress": "127.0.0.4"}).text for _ in range(5)}
        assert pinned == {"127.0.0.4"}
        # Spelt otherwise than the proxy prints it, as --egress takes it: not a 400.
        spelt = _get(p, url, headers={"X-Demux-Egress": "::ffff:127.0.0.4"})
        assert (spelt.status_code, spelt.text) == (200, "127.0.0.4")
        for wrong in ("10.9.9.9", "127.0.0.4,127.0.0.3", "127.0.0.0/24"):
            bad = _get(p, url, headers={"X-Demux-Egress": wrong})
            assert bad.status_code == 400, wrong
    assert not any("X-Demux-Session" in h or "X-Demux-Egress" in h for h in limited.headers)


@pytest.mark.parametrize("bound", ["X-Demux-Egress", "X-Demux-Session"])
def test_bound_requests_between_others_leave_the_rotation_even(
    tmp_path: Path, limited: Limited, bound: str
) -> None:
    """A pinned or session request moved the shared rotation past its own address: the
    plain requests of a crawler that mixes both all went from one address (39 of 40)."""
    limited.rate = 1000.0
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state", "--workers", "2") as p:
        plain: list[str] = []
        for _ in range(4 * len(EGRESS)):
            _get(p, url, headers={bound: "127.0.0.3"})
            plain.append(_get(p, url).text)
    assert Counter(plain) == {address: 4 for address in EGRESS}, Counter(plain)


def test_status_shows_cooldowns_and_queue_depth(tmp_path: Path, limited: Limited) -> None:
    limited.rate = 1000.0
    limited.banned = {"127.0.0.3"}
    limited.retry_after = 30
    url = f"http://127.0.0.1:{limited.port}/item"
    slow = f"http://localhost:{limited.port}/item"
    pin = {"X-Demux-Egress": "127.0.0.2"}
    with running_proxy(
        tmp_path / "state",
        "--workers", "1",
        "--admin", "127.0.0.1:0",
        "--host-rate", "localhost=1/min",
        "--queue-timeout", "3",
    ) as p:  # fmt: skip
        admin = "http://" + p.wait_for_log("Starting Proxy")["fields"]["admin"]
        for _ in range(4):  # 127.0.0.3 is refused once and cools for 30 s
            assert _get(p, url).status_code == 200
        assert _get(p, slow, headers=pin).status_code == 200  # 127.0.0.2's one token
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_get, p, slow, headers=pin)  # must wait for the budget
            seen_queue = seen_cooling = False
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (seen_queue and seen_cooling):
                with requests.Session() as s:
                    doc = s.get(admin + "/status.json", timeout=10).json()
                seen_queue = seen_queue or doc["queue_depth"].get("localhost") == 1
                rows = {r["address"]: r for r in doc["addresses"]}
                seen_cooling = rows["127.0.0.3"]["cooling_hosts"] == 1
                time.sleep(0.1)
            assert seen_queue and seen_cooling
            assert rows["127.0.0.2"]["cooling_hosts"] == 0
            assert waiting.result().status_code == 503


def test_one_cooldown_learnt_by_two_workers_counts_once(tmp_path: Path, limited: Limited) -> None:
    """Each worker learns a cooldown for itself (a second one meets the 429 once): the
    gauge is the most any worker knows, not the sum of their views of the same pair."""
    limited.rate = 1000.0
    limited.banned = {"127.0.0.2"}
    limited.retry_after = 60
    url = f"http://127.0.0.1:{limited.port}/item"
    with running_proxy(tmp_path / "state", "--workers", "2", "--admin", "127.0.0.1:0") as p:
        admin = "http://" + p.wait_for_log("Starting Proxy")["fields"]["admin"]
        deadline = time.monotonic() + 20
        while limited.refused["127.0.0.2"] < 2:  # fresh connections: both workers meet it
            assert time.monotonic() < deadline, limited.refused
            assert _get(p, url).status_code == 200
        time.sleep(2.5)  # the gauges' refresh, every 1-2 s (and the log lines' batch)
        cooled = [ln for ln in p.logs("inbound response") if "retried_from" in ln["fields"]]
        assert {ln["fields"]["session_id"] % 2 for ln in cooled} == {0, 1}  # one per worker
        with requests.Session() as s:
            text = s.get(admin + "/metrics", timeout=10).text
            doc = s.get(admin + "/status.json", timeout=10).json()
    assert 'demux_cooling_hosts{egress="127.0.0.2"} 1.0' in text, [
        ln for ln in text.splitlines() if ln.startswith("demux_cooling_hosts")
    ]
    rows = {r["address"]: r for r in doc["addresses"]}
    assert rows["127.0.0.2"]["cooling_hosts"] == 1
    # Both 429s were replayed from elsewhere: no request counts under 127.0.0.2, but the
    # rate limits it met do.
    assert rows["127.0.0.2"]["requests"] == 0
    assert 'demux_cooling_responses_total{egress="127.0.0.2",status="429"} 2.0' in text


def test_a_session_named_on_connect_holds_inside_the_tunnel(
    tmp_path: Path, upstream: Upstream
) -> None:
    with running_proxy(tmp_path / "state", upstream_ca=upstream.ca_pem_path) as p:
        proxy = f"http://session-xyz:x@127.0.0.1:{p.port}"
        with requests.Session() as s:
            peers = {
                s.get(
                    upstream.https_url("/ip"),
                    proxies={"https": proxy},
                    verify=str(p.ca_path),
                    timeout=30,
                ).json()["peer"]
                for _ in range(6)
            }
        assert len(peers) == 1  # one tunnel, one session, one address


def _curl_through(p: ProxyProcess, upstream: Upstream, *proxy_headers: str) -> list[str]:
    """Four https requests in one curl run (one tunnel); the peers the upstream saw."""
    args = [a for h in proxy_headers for a in ("--proxy-header", h)]
    out = subprocess.run(
        ["curl", "-sS", "--proxy", p.url, "--cacert", str(p.ca_path), *args,
         "-w", "\\n", *[upstream.https_url("/ip")] * 4],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["peer"] for line in out.stdout.splitlines() if line]


def test_pin_and_session_headers_sent_on_connect_hold_in_the_tunnel(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Clients that can set only proxy headers (curl --proxy-header, aiohttp
    proxy_headers): the headers were ignored, and a bad pin got a 200."""
    with running_proxy(tmp_path / "state", upstream_ca=upstream.ca_pem_path) as p:
        assert len(set(_curl_through(p, upstream))) > 1  # rotation, as a baseline
        assert _curl_through(p, upstream, "X-Demux-Egress: 127.0.0.3") == ["127.0.0.3"] * 4
        assert len(set(_curl_through(p, upstream, "X-Demux-Session: s1"))) == 1
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            target = f"127.0.0.1:{upstream.https_port}"
            c.sendall(f"CONNECT {target} HTTP/1.1\r\nX-Demux-Egress: 10.9.9.9\r\n\r\n".encode())
            assert read_head(c).startswith(b"HTTP/1.1 400 ")


def test_connect_to_a_numeric_loopback_form_is_refused_before_the_tunnel(
    tmp_path: Path,
) -> None:
    with running_proxy(tmp_path / "state", allow_private=False) as p:
        for host in ("127.1", "0x7f.1", "2130706433"):
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
                c.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
                assert read_head(c).startswith(b"HTTP/1.1 403 "), host


@contextlib.contextmanager
def _mixed_egress(tmp_path: Path, upstream: Upstream) -> Iterator[ProxyProcess]:
    """One worker, egress 127.0.0.2 and ::1 (skipped where there is no IPv6)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with running_proxy(
        tmp_path / "state", "--workers", "1", egress=["127.0.0.2", "::1"],
        upstream_ca=upstream.ca_pem_path,
    ) as p:  # fmt: skip
        yield p


def test_mixed_family_egress_reuses_pooled_connections(tmp_path: Path, upstream: Upstream) -> None:
    """IPv4 and IPv6 egress, an IPv4-only upstream: each request dialled afresh (the
    fallback from the IPv6 address it picked first never looked in the pool)."""
    with _mixed_egress(tmp_path, upstream) as p, requests.Session() as s:
        seen = [
            s.get(upstream.http_url("/ip"), proxies={"http": p.url}, timeout=10).json()
            for _ in range(6)
        ]
        # Sticky sessions hash over the host's family only (most went to ::1: a 502).
        for name in "abcdef":
            r = s.get(
                upstream.http_url("/ip"), proxies={"http": p.url}, timeout=10,
                headers={"X-Demux-Session": name},
            )  # fmt: skip
            assert r.status_code == 200 and r.json()["peer"] == "127.0.0.2", (name, r.text)
        r = s.get(
            upstream.http_url("/ip"), proxies={"http": p.url}, timeout=10,
            headers={"X-Demux-Egress": "::1"},
        )  # fmt: skip
        assert r.status_code == 502 and "cannot reach" in r.text, r.text
    assert {d["peer"] for d in seen} == {"127.0.0.2"}
    assert len({d["connection_id"] for d in seen}) == 1, seen


def test_an_ipv4_mapped_literal_goes_over_ipv4_and_rests_no_address(
    tmp_path: Path, upstream: Upstream
) -> None:
    """http://[::ffff:127.0.0.1]/ with IPv4 and IPv6 egress was dialled from ::1, which
    has no route there (ENETUNREACH): the request rotated onto ::1 failed over, and ::1
    rested for every host, longer each time: any client could bench an address."""
    with _mixed_egress(tmp_path, upstream) as p, requests.Session() as s:
        url = f"http://[::ffff:127.0.0.1]:{upstream.http_port}/ip"
        seen = [s.get(url, proxies={"http": p.url}, timeout=10) for _ in range(4)]
        assert [r.status_code for r in seen] == [200] * 4, [r.text for r in seen]
        assert {r.json()["peer"] for r in seen} == {"127.0.0.2"}
        assert not p.logs("egress address resting")
        assert not [ln for ln in p.lines if "retried_from" in ln.get("fields", {})]
