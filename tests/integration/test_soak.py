"""Bounded soak and resource runs against one single-worker proxy process.

`make test` runs the short form (DEMUX_SOAK_SECONDS, default 20 s). Mixed traffic runs
from several threads at once: small GETs (http and https), 1 MiB downloads and 256 KiB
uploads checked by SHA-256, clients that reset mid-request, and slow clients that send
their head in pieces over about a second. Every request either completes byte-exact or
fails visibly: silent corruption is never acceptable. The proxy's memory and file
descriptors are sampled after a warm-up and at the end: what the traffic took, it gives
back. Then 10,000 connections that send garbage or reset at once must leave nothing
behind either.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from tests.proxy_process import EGRESS, ProxyProcess, requests_session, running_proxy
from tests.upstream import Upstream, expected_bytes, expected_sha256

SOAK_S = float(os.environ.get("DEMUX_SOAK_SECONDS", "20"))
pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_S + 100)]

MiB = 1024 * 1024
DOWNLOAD = MiB
UPLOAD = 256 * 1024
SOCK_TIMEOUT = 15.0
FD_SLACK = 5
RSS_SLACK = 20 * MiB
LINGER_0 = struct.pack("ii", 1, 0)
STORM = 10_000
STORM_PARALLEL = 50
STORM_BUDGET_S = 60.0
UPLOAD_BODY = expected_bytes(UPLOAD)
UPLOAD_SHA = hashlib.sha256(UPLOAD_BODY).hexdigest()


# --------------------------------------------------------------------------- measuring


def _usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of the proxy (and its children, were there any)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs), sum(p.num_fds() for p in procs)


def _settle(pid: int, fds_max: int, timeout: float = 20.0) -> tuple[int, int]:
    """Usage once the fd count is back under `fds_max` (or as it is at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        rss, fds = _usage(pid)
        if fds <= fds_max or time.monotonic() > deadline:
            return rss, fds
        time.sleep(0.1)


def _sockets(pid: int, proxy_port: int) -> str:
    """Where the proxy's sockets go, for a failure message."""
    kinds: Counter[str] = Counter()
    for c in psutil.Process(pid).net_connections(kind="inet"):
        side = "client" if c.laddr and c.laddr.port == proxy_port else "upstream/other"
        kinds[f"{side}:{c.status}"] += 1
    return ", ".join(f"{k}={n}" for k, n in sorted(kinds.items()))


# --------------------------------------------------------------------------- clients


class Tally:
    """Outcomes per kind: ok, failed visibly (exception / non-2xx), corrupt (a 2xx, wrong)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: Counter[str] = Counter()
        self.failed: dict[str, list[str]] = {}
        self.corrupt: dict[str, list[str]] = {}

    def run(self, kind: str, op: Callable[..., None], *args: object) -> None:
        try:
            op(*args)
        except Corrupt as exc:
            with self.lock:
                self.corrupt.setdefault(kind, []).append(str(exc))
        except Exception as exc:
            with self.lock:
                self.failed.setdefault(kind, []).append(repr(exc)[:300])
        else:
            with self.lock:
                self.ok[kind] += 1


class Corrupt(Exception):
    """A response that claims success but whose bytes are wrong."""


class Visible(Exception):
    """A failure the client can see (a non-2xx answer)."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Corrupt(what)


def _origin(upstream: Upstream, scheme: str) -> Callable[[str], str]:
    return upstream.http_url if scheme == "http" else upstream.https_url


def _small(s: requests.Session, upstream: Upstream, scheme: str) -> None:
    with s.get(_origin(upstream, scheme)("/ip"), timeout=SOCK_TIMEOUT) as r:
        if r.status_code != 200:
            raise Visible(f"/ip answered {r.status_code}")
        _check(r.json()["peer"] in EGRESS, f"/ip answered {r.text[:200]!r}")
    with s.get(_origin(upstream, scheme)("/bytes/1000"), timeout=SOCK_TIMEOUT) as r:
        if r.status_code != 200:
            raise Visible(f"/bytes/1000 answered {r.status_code}")
        _check(r.content == expected_bytes(1000), "/bytes/1000 body differs")


def _download(s: requests.Session, upstream: Upstream, scheme: str) -> None:
    url = _origin(upstream, scheme)(f"/bytes/{DOWNLOAD}")
    with s.get(url, stream=True, timeout=SOCK_TIMEOUT) as r:
        if r.status_code != 200:
            raise Visible(f"download answered {r.status_code}")
        digest = hashlib.sha256()
        n = 0
        for data in r.iter_content(64 * 1024):
            digest.update(data)
            n += len(data)
    _check(n == DOWNLOAD, f"download of {n} bytes, not {DOWNLOAD}")
    _check(digest.hexdigest() == expected_sha256(DOWNLOAD), "download sha256 differs")


def _upload(s: requests.Session, upstream: Upstream, scheme: str) -> None:
    url = _origin(upstream, scheme)("/upload")
    with s.post(url, data=UPLOAD_BODY, timeout=SOCK_TIMEOUT) as r:
        if r.status_code != 200:
            raise Visible(f"upload answered {r.status_code}")
        info = r.json()
    _check(info["length"] == UPLOAD, f"upstream got {info['length']} bytes")
    _check(info["sha256"] == UPLOAD_SHA, "upstream got other bytes")


@contextlib.contextmanager
def _raw(p: ProxyProcess, upstream: Upstream, scheme: str) -> Iterator[tuple[socket.socket, str]]:
    """A raw client connection for upstream `scheme`: (socket, target prefix)."""
    port = upstream.http_port if scheme == "http" else upstream.https_port
    authority = f"127.0.0.1:{port}"
    with socket.create_connection(("127.0.0.1", p.port), timeout=SOCK_TIMEOUT) as sock:
        if scheme == "http":
            yield sock, f"http://{authority}"
            return
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                raise Visible("closed before the CONNECT answer")
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise Visible(f"CONNECT answered {answer[:100]!r}")
        ctx = ssl.create_default_context(cafile=str(p.ca_path))
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            yield tls, ""


def _resetter(p: ProxyProcess, upstream: Upstream, scheme: str, how: int) -> None:
    """A client that resets mid-request: mid-upload, mid-download, or right after the head."""
    port = upstream.http_port if scheme == "http" else upstream.https_port
    with _raw(p, upstream, scheme) as (sock, prefix):
        host = f"Host: 127.0.0.1:{port}\r\n"
        if how == 0:
            sock.sendall(
                f"POST {prefix}/upload HTTP/1.1\r\n{host}Content-Length: 100000\r\n\r\n".encode()
            )
            sock.sendall(b"x" * 20000)
        elif how == 1:
            sock.sendall(f"GET {prefix}/bytes/{DOWNLOAD} HTTP/1.1\r\n{host}\r\n".encode())
            got = 0
            while got < 64 * 1024:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
        else:
            sock.sendall(f"GET {prefix}/ip HTTP/1.1\r\n{host}\r\n".encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and Content-Length body of one response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise Visible(f"closed before a response head: {data[:100]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise Corrupt(f"no Content-Length in {head[:300]!r}")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise Visible(f"closed {length - len(body)} bytes short")
        body += chunk
    _check(len(body) == length, f"{len(body) - length} bytes past the end of the body")
    return status, body


def _slow(p: ProxyProcess, upstream: Upstream, scheme: str) -> None:
    """A head trickled in five pieces over about a second, then a normal response."""
    port = upstream.http_port if scheme == "http" else upstream.https_port
    with _raw(p, upstream, scheme) as (sock, prefix):
        head = (
            f"GET {prefix}/bytes/10000 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "X-Slow: yes\r\nUser-Agent: soak\r\n\r\n"
        ).encode()
        step = -(-len(head) // 5)
        for i in range(0, len(head), step):
            sock.sendall(head[i : i + step])
            time.sleep(0.2)
        status, body = _read_response(sock)
    if status != 200:
        raise Visible(f"slow client answered {status}")
    _check(body == expected_bytes(10000), "slow client body differs")


def _mixed(
    p: ProxyProcess, upstream: Upstream, tally: Tally, until: float, seed: int
) -> list[threading.Thread]:
    """Start the mixed traffic threads, running until `until` (monotonic)."""

    def loop(kind: str, scheme: str, op: Callable[[requests.Session, Upstream, str], None]) -> None:
        with requests_session(p) as s:
            while time.monotonic() < until:
                tally.run(f"{kind}-{scheme}", op, s, upstream, scheme)

    def resets() -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            scheme = rng.choice(("http", "https"))
            how = rng.randrange(3)
            tally.run(f"reset-{how}", _resetter, p, upstream, scheme, how)
            time.sleep(0.02)

    def slow() -> None:
        i = 0
        while time.monotonic() < until:
            scheme = ("http", "https")[i % 2]
            tally.run(f"slow-{scheme}", _slow, p, upstream, scheme)
            i += 1

    jobs: list[Callable[[], None]] = [resets, slow]
    for scheme in ("http", "https"):
        for kind, op in (("small", _small), ("download", _download), ("upload", _upload)):
            jobs.append(functools.partial(loop, kind, scheme, op))
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    return threads


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.1))
    assert not any(t.is_alive() for t in threads), "a client thread is stuck"


def _report(tally: Tally) -> str:
    return (
        f"ok={dict(tally.ok)} failed={ {k: len(v) for k, v in tally.failed.items()} } "
        f"first failures={ {k: v[:2] for k, v in tally.failed.items()} }"
    )


# --------------------------------------------------------------------------- tests


@pytest.fixture
def single_worker(tmp_path: Path, upstream: Upstream) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path) as p:
        yield p


def test_soak_mixed_traffic(single_worker: ProxyProcess, upstream: Upstream) -> None:
    p = single_worker
    pid = p.proc.pid
    # Warm-up: the same mix, briefly, so that caches and upstream pools reach their size.
    warm = Tally()
    _join(_mixed(p, upstream, warm, time.monotonic() + min(3.0, SOAK_S / 4), seed=1), 60)
    assert not warm.corrupt, warm.corrupt
    time.sleep(1.0)  # let connections from the warm-up close
    rss0, fds0 = _usage(pid)

    tally = Tally()
    started = time.monotonic()
    _join(_mixed(p, upstream, tally, started + SOAK_S, seed=2), SOAK_S + 60)
    rss1, fds1 = _settle(pid, fds0 + FD_SLACK)

    assert not tally.corrupt, f"silent corruption: {tally.corrupt}"
    # Well-behaved clients of a healthy proxy are all served.
    well_behaved = {k: v for k, v in tally.failed.items() if not k.startswith("reset")}
    assert not well_behaved, _report(tally)
    for kind in ("small", "download", "upload", "slow"):
        for scheme in ("http", "https"):
            assert tally.ok[f"{kind}-{scheme}"] > 0, (
                f"no {kind}-{scheme} completed: {_report(tally)}"
            )
    assert sum(tally.ok[f"reset-{h}"] for h in range(3)) > 0, _report(tally)
    assert fds1 <= fds0 + FD_SLACK, (
        f"file descriptors not released: {fds0} -> {fds1} ({_sockets(pid, p.port)})"
    )
    assert rss1 <= rss0 + RSS_SLACK, f"RSS grew {(rss1 - rss0) / MiB:.1f} MiB over the soak"
    assert p.proc.poll() is None, "the proxy died"
    assert not p.logs("internal error"), p.logs("internal error")[0]


def _garbage_or_reset(port: int, i: int) -> str:
    """One connection: garbage then wait for the answer (even i), or a reset at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCK_TIMEOUT) as sock:
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            return "reset"
        sock.sendall(b"\x00\x01 garbage %d \xff\r\n\r\n" % i)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        if data and not data.startswith(b"HTTP/1.1 4"):
            return f"unexpected answer {data[:80]!r}"
        return "answered"


def test_connection_storm_leaves_nothing_behind(
    single_worker: ProxyProcess, upstream: Upstream
) -> None:
    p = single_worker
    pid = p.proc.pid
    with requests_session(p) as s:  # warm-up: CA leaf, pools, log buffers
        for scheme in ("http", "https"):
            _small(s, upstream, scheme)
    time.sleep(1.0)  # let connections from the warm-up close
    rss0, fds0 = _usage(pid)

    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + STORM_BUDGET_S
    with ThreadPoolExecutor(STORM_PARALLEL) as pool:
        for start in range(0, STORM, 1000):
            assert time.monotonic() < deadline, f"only {start} connections in {STORM_BUDGET_S} s"
            batch = pool.map(lambda i: _garbage_or_reset(p.port, i), range(start, start + 1000))
            outcomes.update(batch)
    assert sum(outcomes.values()) == STORM
    assert set(outcomes) <= {"answered", "reset"}, outcomes

    rss1, fds1 = _settle(pid, fds0 + FD_SLACK)
    assert fds1 <= fds0 + FD_SLACK, (
        f"file descriptors not released: {fds0} -> {fds1} ({_sockets(pid, p.port)})"
    )
    assert rss1 <= rss0 + RSS_SLACK, f"RSS grew {(rss1 - rss0) / MiB:.1f} MiB"
    # Still serving.
    with requests_session(p) as s, s.get(upstream.https_url("/ip"), timeout=SOCK_TIMEOUT) as r:
        assert r.status_code == 200
        assert json.loads(r.content)["peer"] in EGRESS
    assert not p.logs("internal error"), p.logs("internal error")[0]
