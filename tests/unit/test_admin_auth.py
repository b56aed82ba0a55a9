"""The admin listener on a non-loopback address asks for the proxy's credentials, on
real sockets (it listens on 127.0.0.1 here, with `require_auth` as a public address
gets it): everything but /healthz, which load balancers probe without any."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator

import pytest

from demux_proxy.admin import AdminServer
from demux_proxy.auth import ClientPolicy
from demux_proxy.egress import Egress
from demux_proxy.log import EventLog


@pytest.fixture
async def admin_port() -> AsyncIterator[int]:
    devnull = os.open(os.devnull, os.O_WRONLY)
    policy = ClientPolicy.from_options(("alice:s3cret",), None, ())
    server = AdminServer(
        lambda: [Egress("127.0.0.2", "lo", socket.AF_INET)],
        policy,
        EventLog(fd=devnull),
        require_auth=True,
        workers=1,
    )
    try:
        yield await server.start("127.0.0.1", 0)
    finally:
        server.close()
        os.close(devnull)


async def _status(port: int, path: str, authorization: str | None = None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Authorization: {authorization}\r\n" if authorization else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n{extra}\r\n".encode())
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return int(line.split()[1])


async def test_healthz_is_open_and_the_rest_needs_the_proxy_credentials(admin_port: int) -> None:
    good = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"alice:wrong").decode()
    assert await _status(admin_port, "/healthz") == 200
    assert await _status(admin_port, "/healthz?probe=1") == 200
    for path in ("/status", "/status.json", "/metrics", "/nowhere"):
        assert await _status(admin_port, path) == 401, path
        assert await _status(admin_port, path, bad) == 401, path
    assert await _status(admin_port, "/status", good) == 200
    assert await _status(admin_port, "/nowhere", good) == 404
