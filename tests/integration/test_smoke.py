"""Rotation through the real proxy with curl: the heart of the product."""

from __future__ import annotations

import json
import subprocess

from tests.proxy_process import EGRESS, ProxyProcess
from tests.upstream import Upstream


def _curl(proxy: ProxyProcess, *urls: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--proxy",
            proxy.url,
            "--cacert",
            str(proxy.ca_path),
            *urls,
            "-w",
            "\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_curl_one_connection_rotates_http(proxy: ProxyProcess, upstream: Upstream) -> None:
    answers = _curl(proxy, *[upstream.http_url("/ip")] * 8)
    peers = [a["peer"] for a in answers]
    start = EGRESS.index(str(peers[0]))
    assert peers == [EGRESS[(start + i) % 4] for i in range(8)]


def test_curl_one_connection_rotates_https(proxy: ProxyProcess, upstream: Upstream) -> None:
    answers = _curl(proxy, *[upstream.https_url("/ip")] * 8)
    peers = [a["peer"] for a in answers]
    start = EGRESS.index(str(peers[0]))
    assert peers == [EGRESS[(start + i) % 4] for i in range(8)]
    assert {a["scheme"] for a in answers} == {"https"}
