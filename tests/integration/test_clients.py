"""Real Python HTTP clients through the real proxy: httpx (sync and async) and aiohttp.

One client, one keep-alive connection to the proxy: consecutive requests still leave from
the four egress addresses in turn. Large bodies cross byte-exact both ways.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import httpx
import pytest

from tests.proxy_process import AIOHTTP_CLEANUP_CLOSED, EGRESS, ProxyProcess
from tests.upstream import Upstream, expected_bytes, expected_sha256

DOWNLOAD = 1024 * 1024
UPLOAD = 2 * 1024 * 1024
ROUNDS = 8

SCHEMES = ["http", "https"]


def _ctx(proxy: ProxyProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.ca_path))


def _url(upstream: Upstream, scheme: str) -> Callable[[str], str]:
    return upstream.http_url if scheme == "http" else upstream.https_url


def _assert_rotation(peers: list[str]) -> None:
    assert set(peers) <= set(EGRESS), peers
    start = EGRESS.index(peers[0])
    assert peers == [EGRESS[(start + i) % len(EGRESS)] for i in range(len(peers))]


def _upload_body() -> bytes:
    # Not the same content as any download, so an echo of the wrong thing shows.
    return hashlib.shake_256(b"demux-proxy-test-upload").digest(UPLOAD)


# --------------------------------------------------------------------------- httpx sync


def _httpx_client(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(
        proxy=proxy.url,
        verify=_ctx(proxy),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=30,
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_httpx_sync_rotates_on_one_connection(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)("/ip")
    with _httpx_client(proxy) as client:
        answers = []
        for _ in range(ROUNDS):
            r = client.get(url)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    _assert_rotation([a["peer"] for a in answers])
    assert {a["scheme"] for a in answers} == {scheme}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_httpx_sync_download_and_upload_exact(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)
    body = _upload_body()
    with _httpx_client(proxy) as client:
        r = client.get(url(f"/bytes/{DOWNLOAD}"))
        assert r.status_code == 200
        assert len(r.content) == DOWNLOAD
        assert hashlib.sha256(r.content).hexdigest() == expected_sha256(DOWNLOAD)

        r = client.post(url("/upload"), content=body)
        assert r.status_code == 200, r.text
        assert r.json()["length"] == UPLOAD
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------------- httpx async


def _httpx_async_client(proxy: ProxyProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        proxy=proxy.url,
        verify=_ctx(proxy),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=30,
    )


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_httpx_async_rotates_on_one_connection(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)("/ip")
    async with _httpx_async_client(proxy) as client:
        answers = []
        for _ in range(ROUNDS):
            r = await client.get(url)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    _assert_rotation([a["peer"] for a in answers])
    assert {a["scheme"] for a in answers} == {scheme}


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_httpx_async_download_and_upload_exact(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)
    body = _upload_body()
    async with _httpx_async_client(proxy) as client:
        r = await client.get(url(f"/bytes/{DOWNLOAD}"))
        assert r.status_code == 200
        assert len(r.content) == DOWNLOAD
        assert hashlib.sha256(r.content).hexdigest() == expected_sha256(DOWNLOAD)

        r = await client.post(url("/upload"), content=body)
        assert r.status_code == 200, r.text
        assert r.json()["length"] == UPLOAD
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------------- aiohttp


def _aiohttp_session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, enable_cleanup_closed=AIOHTTP_CLEANUP_CLOSED),
        timeout=aiohttp.ClientTimeout(total=30),
    )


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_aiohttp_rotates_on_one_connection(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)("/ip")
    ctx = _ctx(proxy)
    answers = []
    async with _aiohttp_session(limit=1) as session:
        for _ in range(ROUNDS):
            async with session.get(url, proxy=proxy.url, ssl=ctx) as r:
                assert r.status == 200, await r.text()
                answers.append(await r.json())
    _assert_rotation([a["peer"] for a in answers])
    assert {a["scheme"] for a in answers} == {scheme}


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_aiohttp_download_and_upload_exact(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)
    ctx = _ctx(proxy)
    body = _upload_body()
    async with _aiohttp_session(limit=1) as session:
        async with session.get(url(f"/bytes/{DOWNLOAD}"), proxy=proxy.url, ssl=ctx) as r:
            assert r.status == 200
            data = await r.read()
        assert len(data) == DOWNLOAD
        assert data == expected_bytes(DOWNLOAD)

        async with session.post(
            url("/upload"), data=io.BytesIO(body), proxy=proxy.url, ssl=ctx
        ) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["length"] == UPLOAD
        assert answer["sha256"] == hashlib.sha256(body).hexdigest()
        assert answer["chunked"] is False

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, UPLOAD, 100_000):
                yield body[i : i + 100_000]

        # An async generator body goes out chunked (no Content-Length).
        async with session.post(url("/upload"), data=pieces(), proxy=proxy.url, ssl=ctx) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["length"] == UPLOAD
        assert answer["sha256"] == hashlib.sha256(body).hexdigest()
        assert answer["chunked"] is True


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_aiohttp_concurrent_requests_spread_evenly(
    proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = _url(upstream, scheme)("/ip")
    ctx = _ctx(proxy)
    n = 4 * len(EGRESS)

    async with _aiohttp_session(limit=n) as session:

        async def one() -> tuple[int, dict[str, object]]:
            async with session.get(url, proxy=proxy.url, ssl=ctx) as r:
                return r.status, await r.json()

        results = await asyncio.gather(*(one() for _ in range(n)))

    assert [status for status, _ in results] == [200] * n
    peers = Counter(str(answer["peer"]) for _, answer in results)
    assert peers == dict.fromkeys(EGRESS, 4)
