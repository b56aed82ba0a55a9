"""What connections cost the proxy, and that it gives everything back."""

from __future__ import annotations

import resource
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.proxy_process import running_proxy
from tests.upstream import Upstream

IDLE = 2_000
# Measured 4.3 KiB per idle connection (bench/idle_connections.py, 10,000 connections,
# docs/performance.md); the bound leaves room for allocator noise, not for a leak.
MAX_KIB_PER_IDLE_CONNECTION = 16


def _usage(pid: int) -> tuple[int, int]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs), sum(p.num_fds() for p in procs)


def _wait(
    pid: int, done: Callable[[tuple[int, int]], bool], timeout: float = 30.0
) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        usage = _usage(pid)
        if done(usage) or time.monotonic() > deadline:
            return usage
        time.sleep(0.1)


def test_idle_connections_are_cheap_and_released(tmp_path: Path, upstream: Upstream) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {IDLE + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        with running_proxy(
            tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path
        ) as p:
            rss0, fds0 = _usage(p.proc.pid)
            socks = [socket.create_connection(("127.0.0.1", p.port), timeout=10)]
            try:
                socks += [
                    socket.create_connection(("127.0.0.1", p.port), timeout=10)
                    for _ in range(IDLE - 1)
                ]
                rss1, fds1 = _wait(p.proc.pid, lambda u: u[1] - fds0 >= IDLE)
                assert fds1 - fds0 >= IDLE, "the proxy did not hold every connection"
                # While they idle, the proxy still serves a request at once.
                with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
                    s.sendall(
                        f"GET {upstream.http_url('/ip')} HTTP/1.1\r\nHost: x\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    assert s.recv(100).startswith(b"HTTP/1.1 200")
            finally:
                for s in socks:
                    s.close()
            kib_each = (rss1 - rss0) / 1024 / IDLE
            assert kib_each < MAX_KIB_PER_IDLE_CONNECTION, f"{kib_each:.1f} KiB per connection"
            _, fds2 = _wait(p.proc.pid, lambda u: u[1] <= fds0 + 2)
            assert fds2 <= fds0 + 2, f"file descriptors not released: {fds0} -> {fds2}"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


TLS_CONNECTIONS = 1_500
# Each intercepted connection leaked about 6 KiB while the compiled handshake awaited
# inside an except block (the exception and its traceback stayed alive): 1,500 of them
# grew the proxy by about 9 MiB. Allocator noise after a warm-up stays far below this.
MAX_TLS_GROWTH = 4 * 1024 * 1024


def _intercepted_get(proxy_port: int, upstream_port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT 127.0.0.1:{upstream_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = raw.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /ip HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data


def test_intercepted_tls_connections_leave_nothing_behind(
    tmp_path: Path, upstream: Upstream
) -> None:
    with running_proxy(tmp_path / "state", "--workers", "1", upstream_ca=upstream.ca_pem_path) as p:
        context = ssl.create_default_context(cafile=str(p.ca_path))
        port = upstream.https_port

        def burst(count: int) -> None:
            with ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(lambda _: _intercepted_get(p.port, port, context), range(count))
                )
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)

        burst(300)  # warm: leaf certificate, pools, allocator arenas
        rss0, _ = _usage(p.proc.pid)
        burst(TLS_CONNECTIONS)
        rss1, _ = _usage(p.proc.pid)
        growth = rss1 - rss0
        assert growth < MAX_TLS_GROWTH, (
            f"RSS grew {growth / 1024:.0f} KiB over {TLS_CONNECTIONS} intercepted connections"
        )
