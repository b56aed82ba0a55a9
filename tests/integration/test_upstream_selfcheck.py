"""Self-check of the test upstream (tests/upstream.py), no proxy involved."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from websockets.sync.client import connect as ws_connect

from tests.upstream import (
    CHUNK_SIZE,
    Upstream,
    expected_bytes,
    expected_sha256,
    iter_expected_bytes,
    running_upstream,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with running_upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


def _client_ctx(up: Upstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(up.ca_pem_path))


def _raw_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` on a fresh connection, read until EOF; return (head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _header_names(head: bytes) -> list[str]:
    return [ln.split(b":", 1)[0].decode().lower() for ln in head.split(b"\r\n")[1:]]


# --------------------------------------------------------------------------- content helpers


def test_expected_bytes_helpers() -> None:
    assert expected_bytes(0) == b""
    big = expected_bytes(3 * CHUNK_SIZE + 5)
    assert len(big) == 3 * CHUNK_SIZE + 5
    assert b"".join(iter_expected_bytes(len(big), 7919)) == big
    assert expected_bytes(len(big)) == big  # deterministic
    assert expected_bytes(100)[:50] != expected_bytes(50)  # seeded by n
    assert expected_sha256(len(big)) == hashlib.sha256(big).hexdigest()


# --------------------------------------------------------------------------- /ip


def test_ip_reports_peer_and_connection(upstream: Upstream) -> None:
    with requests.Session() as s:
        first = s.get(upstream.http_url("/ip")).json()
        second = s.get(upstream.http_url("/ip")).json()
    assert first["peer"] == "127.0.0.1"
    assert first["scheme"] == "http"
    assert isinstance(first["port"], int) and first["port"] > 0
    assert first["connection_id"] == second["connection_id"]  # keep-alive reuse
    assert first["port"] == second["port"]
    with requests.Session() as s:
        third = s.get(upstream.http_url("/ip")).json()
    assert third["connection_id"] != first["connection_id"]


def test_ip_https(upstream: Upstream) -> None:
    r = requests.get(upstream.https_url("/ip"), verify=str(upstream.ca_pem_path))
    assert r.json()["peer"] == "127.0.0.1"
    assert r.json()["scheme"] == "https"
    with httpx.Client(verify=_client_ctx(upstream)) as client:
        for host in ("localhost", "127.0.0.1"):
            assert client.get(upstream.https_url("/ip", host)).json()["scheme"] == "https"


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("n", [0, 1, 100_000])
def test_bytes(upstream: Upstream, n: int) -> None:
    r = requests.get(upstream.http_url(f"/bytes/{n}"))
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(n)
    assert "Transfer-Encoding" not in r.headers
    assert r.content == expected_bytes(n)
    assert r.headers["X-Sha256"] == hashlib.sha256(r.content).hexdigest()


def test_bytes_https_httpx(upstream: Upstream) -> None:
    n = 3 * CHUNK_SIZE + 17
    with httpx.Client(verify=_client_ctx(upstream)) as client:
        r = client.get(upstream.https_url(f"/bytes/{n}"))
    assert r.content == expected_bytes(n)
    assert r.headers["x-sha256"] == expected_sha256(n)


async def test_bytes_async_httpx(upstream: Upstream) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(upstream.http_url("/bytes/5000"))
    assert r.content == expected_bytes(5000)


@pytest.mark.parametrize("n", [0, 100_000])
def test_chunked(upstream: Upstream, n: int) -> None:
    head, body = _raw_exchange(
        upstream.http_port,
        f"GET /chunked/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert "content-length" not in _header_names(head)
    assert body.endswith(b"0\r\n\r\n")
    r = requests.get(upstream.http_url(f"/chunked/{n}"))
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.content == expected_bytes(n)
    assert r.headers["X-Sha256"] == expected_sha256(n)


def test_slow(upstream: Upstream) -> None:
    r = requests.get(upstream.http_url("/slow/1000?delay=0.01"))
    assert r.headers["Content-Length"] == "1000"
    assert r.content == expected_bytes(1000)
    # A client vanishing mid-download must not upset the server.
    with requests.get(upstream.http_url("/slow/100000?delay=0.05"), stream=True) as r:
        assert len(r.raw.read(10)) == 10
    assert requests.get(upstream.http_url("/bytes/1")).content == expected_bytes(1)


# --------------------------------------------------------------------------- uploads


def test_upload_content_length(upstream: Upstream) -> None:
    body = expected_bytes(1 << 20)
    r = requests.post(upstream.http_url("/upload"), data=body)
    assert r.json() == {
        "length": 1 << 20,
        "sha256": hashlib.sha256(body).hexdigest(),
        "chunked": False,
        "expect": None,
    }


def test_upload_chunked_generator(upstream: Upstream) -> None:
    n = 300_000
    r = requests.put(upstream.http_url("/upload"), data=iter_expected_bytes(n, 10_000))
    assert r.json() == {"length": n, "sha256": expected_sha256(n), "chunked": True, "expect": None}
    with httpx.Client(verify=_client_ctx(upstream)) as client:
        r2 = client.post(upstream.https_url("/upload"), content=iter_expected_bytes(n, 4096))
    assert r2.json()["sha256"] == expected_sha256(n)
    assert r2.json()["chunked"] is True


def test_upload_expect_100_continue(upstream: Upstream) -> None:
    body = expected_bytes(50_000)
    with socket.create_connection(("127.0.0.1", upstream.http_port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n" % len(body)
        )
        interim = sock.recv(65536)  # body not sent yet: only the 100 can arrive
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        assert interim.endswith(b"\r\n\r\n")
        sock.sendall(body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload) == {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "chunked": False,
        "expect": "100-continue",
    }


# --------------------------------------------------------------------------- framing corner cases


def test_head(upstream: Upstream) -> None:
    with requests.Session() as s:
        h = s.head(upstream.http_url("/head"))
        assert h.status_code == 200
        assert h.headers["Content-Length"] == "1234"
        assert h.content == b""
        g = s.get(upstream.http_url("/head"))  # same connection: HEAD was framed right
        assert g.content == b"x" * 1234
    head, body = _raw_exchange(
        upstream.http_port, b"HEAD /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert b"\r\nContent-Length: 1234" in head
    assert body == b""


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_body(upstream: Upstream, code: int) -> None:
    head, body = _raw_exchange(
        upstream.http_port,
        f"GET /status/{code} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert head.startswith(f"HTTP/1.1 {code}".encode())
    assert body == b""
    assert requests.get(upstream.http_url(f"/status/{code}")).status_code == code


def test_status_with_body_and_404(upstream: Upstream) -> None:
    r = requests.get(upstream.http_url("/status/418"))
    assert (r.status_code, r.text) == (418, "status 418")
    assert requests.get(upstream.http_url("/status/503")).status_code == 503
    for method in ("GET", "POST", "DELETE"):
        assert requests.request(method, upstream.http_url("/nope")).status_code == 404


def test_headers_raw_case_and_order(upstream: Upstream) -> None:
    _head, body = _raw_exchange(
        upstream.http_port,
        b"GET /headers HTTP/1.1\r\nHost: up.example\r\nX-MiXeD-CaSe: one\r\n"
        b"x-dup: 1\r\nX-Dup: 2\r\nConnection: close\r\n\r\n",
    )
    assert json.loads(body) == [
        ["Host", "up.example"],
        ["X-MiXeD-CaSe", "one"],
        ["x-dup", "1"],
        ["X-Dup", "2"],
        ["Connection", "close"],
    ]
    seen = upstream.seen_headers[-1]
    assert seen["method"] == "GET"
    assert seen["path"] == "/headers"
    assert seen["listener"] == "http"
    assert seen["headers"][1] == ["X-MiXeD-CaSe", "one"]


# --------------------------------------------------------------------------- TLS trust


def test_untrusted_variant_fails_verification(tmp_path: Path) -> None:
    with running_upstream(tmp_path, untrusted=True) as bad:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(bad.https_url("/ip"), verify=str(bad.ca_pem_path))
        with httpx.Client(verify=_client_ctx(bad)) as client, pytest.raises(httpx.ConnectError):
            client.get(bad.https_url("/ip"))
        # Plain HTTP still works; without verification the TLS listener answers.
        assert requests.get(bad.http_url("/ip")).json()["peer"] == "127.0.0.1"
        with httpx.Client(verify=False) as client:
            assert client.get(bad.https_url("/ip")).json()["scheme"] == "https"


# --------------------------------------------------------------------------- WebSocket


def test_websocket_echo(upstream: Upstream) -> None:
    with ws_connect(f"ws://127.0.0.1:{upstream.http_port}/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv(timeout=5) == b"\x00\x01binary\xff"
    with ws_connect(f"wss://localhost:{upstream.https_port}/ws", ssl=_client_ctx(upstream)) as wss:
        wss.send("secure")
        assert wss.recv(timeout=5) == "secure"


# --------------------------------------------------------------------------- close-delimited


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_close_delimited_raw(upstream: Upstream, version: str) -> None:
    n = 200_000
    query = "?version=1.1" if version == "1.1" else ""
    head, body = _raw_exchange(
        upstream.raw_port, f"GET /close-delimited/{n}{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert head.startswith(f"HTTP/{version} 200 OK\r\n".encode())
    names = _header_names(head)
    assert "content-length" not in names
    assert "transfer-encoding" not in names
    assert body == expected_bytes(n)


def test_close_delimited_clients(upstream: Upstream) -> None:
    r = requests.get(upstream.close_delimited_url(12345))
    assert r.content == expected_bytes(12345)
    assert r.headers["X-Sha256"] == expected_sha256(12345)
    r = requests.get(
        upstream.raw_https_url("/close-delimited/70000"), verify=str(upstream.ca_pem_path)
    )
    assert r.content == expected_bytes(70000)
    assert requests.get(upstream.raw_url("/other")).status_code == 404
    assert upstream.seen_headers[-1]["listener"] == "raw"
