"""A real Scrapy crawl through the proxy to the HTTPS upstream: per-request rotation inside
Scrapy's CONNECT tunnels, exact bytes, the proxy's certificate, one log pair per request.

Scrapy runs in a subprocess (Twisted's reactor cannot be restarted in this process);
it is a dev dependency, installed by `make install`."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.proxy_process import EGRESS, ProxyProcess
from tests.upstream import Upstream, expected_sha256

N_IP = 24
BIG = 3_000_000

SPIDER = textwrap.dedent(
    """
    import hashlib, json, sys
    import scrapy
    from scrapy.crawler import CrawlerProcess

    cfg = json.loads(sys.argv[1])
    rows = []

    class S(scrapy.Spider):
        name = "t"

        def start_requests(self):  # Scrapy < 2.13
            meta = {"proxy": cfg["proxy"]}
            for i in range(cfg["n_ip"]):
                yield scrapy.Request(cfg["base"] + "/ip?i=%d" % i, meta=meta, dont_filter=True)
            big = cfg["base"] + "/bytes/%d" % cfg["big"]
            yield scrapy.Request(big, meta=meta, dont_filter=True)

        async def start(self):  # Scrapy >= 2.13
            for r in self.start_requests():
                yield r

        def parse(self, r):
            cert = r.certificate
            issuer = cert.getIssuer().commonName if cert else None
            if isinstance(issuer, bytes):
                issuer = issuer.decode()
            rows.append({
                "url": r.url, "status": r.status, "len": len(r.body),
                "sha256": hashlib.sha256(r.body).hexdigest(),
                "x_sha256": r.headers.get("X-Sha256", b"").decode(),
                "json": json.loads(r.body) if "/ip" in r.url else None,
                "issuer": issuer,
            })

    p = CrawlerProcess({
        "LOG_LEVEL": "WARNING", "ROBOTSTXT_OBEY": False, "RETRY_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False, "REMOTE_CONTROL_ENABLED": False,
        "DOWNLOAD_TIMEOUT": 30, "CONCURRENT_REQUESTS": 8, "CONCURRENT_REQUESTS_PER_DOMAIN": 8,
    })
    crawler = p.create_crawler(S)
    p.crawl(crawler)
    p.start()
    stats = {k: v for k, v in crawler.stats.get_stats().items() if isinstance(v, (int, str))}
    json.dump({"rows": rows, "stats": stats}, open(cfg["out"], "w"))
    """
)


def _crawl(tmp_path: Path, proxy: ProxyProcess, upstream: Upstream) -> dict[str, Any]:
    script = tmp_path / "spider.py"
    script.write_text(SPIDER)
    out = tmp_path / "out.json"
    cfg = {
        "proxy": proxy.url,
        "base": upstream.https_url(""),
        "n_ip": N_IP,
        "big": BIG,
        "out": str(out),
    }
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # Scrapy's cookies middleware (tldextract) would fetch the Public Suffix List from the
    # internet; empty: its bundled snapshot.
    env["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and out.exists(), done.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_scrapy_crawl_rotates_per_request_and_keeps_bytes(
    tmp_path: Path, proxy: ProxyProcess, upstream: Upstream
) -> None:
    before = {line["fields"]["session_id"] for line in proxy.logs("inbound response")}
    result = _crawl(tmp_path, proxy, upstream)
    rows, stats = result["rows"], result["stats"]
    assert stats.get("finish_reason") == "finished", stats
    assert len(rows) == N_IP + 1, stats
    assert all(r["status"] == 200 for r in rows)
    # TLS was intercepted: the leaf Scrapy got was signed by the proxy's CA.
    assert {r["issuer"] for r in rows} == {_ca_name(proxy)}
    # Exact bytes.
    big = next(r for r in rows if "/bytes/" in r["url"])
    assert big["len"] == BIG and big["sha256"] == big["x_sha256"] == expected_sha256(BIG)
    # Rotation per request although Scrapy reuses a few CONNECT tunnels for all of them.
    peers = collections.Counter(r["json"]["peer"] for r in rows if r["json"])
    assert set(peers) == set(EGRESS), peers
    assert max(peers.values()) - min(peers.values()) <= 2, peers
    # One outbound/inbound pair per request, and the proxy's interface is the echoed peer.
    deadline = time.monotonic() + 5
    while True:
        inbound = {
            line["fields"]["session_id"]: line["fields"]
            for line in proxy.logs("inbound response")
            if line["fields"]["session_id"] not in before
        }
        if len(inbound) >= N_IP + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    sent = proxy.logs("outbound request")
    outbound = [x["fields"] for x in sent if x["fields"]["session_id"] in inbound]
    assert len(inbound) == len(outbound) == N_IP + 1
    by_url = {f["url"]: f for f in inbound.values()}
    for r in rows:
        f = by_url[r["url"]]
        assert f["status_code"] == 200 and "error" not in f, f
        if r["json"]:
            assert f["interface"] == r["json"]["peer"]
    assert by_url[big["url"]]["bytes"] == BIG


def _ca_name(proxy: ProxyProcess) -> str:
    cert = x509.load_pem_x509_certificate(proxy.ca_path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)
