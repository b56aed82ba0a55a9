"""Every wait is bounded: slow heads get 408, idle clients are let go, others keep going."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests

from tests.proxy_process import running_proxy
from tests.upstream import Upstream


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_slow_head_gets_408_and_idle_client_is_closed(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(
        tmp_path / "state",
        "--head-timeout",
        "1",
        "--client-idle-timeout",
        "1",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        slow = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        idle = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        try:
            started = time.monotonic()
            slow.sendall(b"GET " + upstream.http_url("/ip").encode() + b" HTTP/1.1\r\n")
            for _ in range(3):  # trickling bytes does not extend the deadline
                time.sleep(0.3)
                slow.sendall(b"X-Slow: 1\r\n")
            # Meanwhile everyone else is served.
            with requests.Session() as s:
                r = s.get(upstream.http_url("/ip"), proxies={"http": p.url}, timeout=10)
                assert r.status_code == 200
            answer = _read_all(slow, 10)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 5
            assert _read_all(idle, 10) == b""  # closed without a word: it asked nothing
        finally:
            slow.close()
            idle.close()


def test_max_connections_queues_in_the_backlog(tmp_path: Path, upstream: Upstream) -> None:
    request = (
        f"GET {upstream.http_url('/ip')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    with running_proxy(
        tmp_path / "state",
        "--max-connections",
        "1",
        "--workers",
        "1",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        first = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        second = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        try:
            first.sendall(b"GET " + upstream.http_url("/ip").encode() + b" HTTP/1.1\r\n\r\n")
            first.settimeout(10)
            assert first.recv(100).startswith(b"HTTP/1.1 200")
            second.sendall(request)
            second.settimeout(0.5)
            with pytest.raises(TimeoutError):
                second.recv(100)  # waiting in the backlog, not dropped
            first.close()
            answer = _read_all(second, 10)
            assert answer.startswith(b"HTTP/1.1 200")
        finally:
            first.close()
            second.close()
