"""Destination rules through the real proxy: 508 for itself, --deny, --allow-dest."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.proxy_process import ProxyProcess, running_proxy
from tests.upstream import Upstream


def _get(p: ProxyProcess, url: str) -> requests.Response:
    with requests.Session() as s:
        return s.get(url, proxies={"http": p.url, "https": p.url}, timeout=10)


def test_request_to_the_proxy_itself_is_508(proxy: ProxyProcess) -> None:
    r = _get(proxy, f"http://127.0.0.1:{proxy.port}/loop")
    assert r.status_code == 508
    assert "itself" in r.text
    assert r.headers["Content-Type"].startswith("text/plain")


def test_deny_and_allow_dest(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(
        tmp_path / "deny", "--deny", "localhost", upstream_ca=upstream.ca_pem_path
    ) as p:
        r = _get(p, upstream.http_url("/ip", host="localhost"))
        assert r.status_code == 403 and "--deny localhost" in r.text
        assert _get(p, upstream.http_url("/ip")).status_code == 200
    with running_proxy(
        tmp_path / "allow",
        "--allow-dest",
        "127.0.0.1/32",
        upstream_ca=upstream.ca_pem_path,
        allow_private=False,
    ) as p:
        # The allowed CIDR admits this loopback upstream without --allow-private...
        assert _get(p, upstream.http_url("/ip")).status_code == 200
        # ...and nothing else.
        r = _get(p, f"http://127.0.0.2:{upstream.http_port}/ip")
        assert r.status_code == 403 and "--allow-dest" in r.text
