"""Headless Chromium through the real proxy: a page over intercepted HTTPS with a script,
an image, a fetch, a form-sized POST and a WebSocket, the proxy's CA trusted the way the
README tells users (Chromium's own NSS database, trust "C").

Skipped where Chromium or certutil is not installed (Debian: chromium, libnss3-tools).
Fenced to loopback: Chromium resolves no name itself (--host-resolver-rules), and the
proxy admits only "localhost" (--allow-dest), so its background requests are refused
before any lookup.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.proxy_process import running_proxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CERTUTIL = shutil.which("certutil")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CERTUTIL is None,
    reason="needs headless Chromium and certutil (Debian: chromium, libnss3-tools)",
)

# The page writes what it saw into the DOM, which --dump-dom prints once the page and
# its fetches are done. --virtual-time-budget waits for fetches, not for a WebSocket:
# the WebSocket runs while a fetch the server holds for 2 s is pending.
PAGE = b"""<!doctype html><html><head><script src="/app.js"></script></head><body>
<img id=img src="/px.png"><pre id=out>pending</pre>
<script>
(async () => {
  const ws = new Promise(ok => {
    const w = new WebSocket('wss://' + location.host + '/ws');
    w.onopen = () => w.send('ping');
    w.onmessage = m => { ok(m.data); w.close(); };
    w.onerror = () => ok('ERR');
  });
  const r = {};
  [r.peer, r.post, r.ws] = await Promise.all([
    fetch('/peer?hold=1', {cache: 'no-store'}).then(x => x.json()).then(j => j.peer),
    fetch('/echo', {method: 'POST', body: 'x'.repeat(100000)}).then(x => x.json()).then(j => j.n),
    ws]);
  r.img = document.getElementById('img').naturalWidth;
  r.js = window.appJs === 1;
  document.getElementById('out').textContent = 'RESULT' + JSON.stringify(r) + 'END';
})().catch(e => {
  const failed = JSON.stringify({error: String(e)});
  document.getElementById('out').textContent = 'RESULT' + failed + 'END';
});
</script></body></html>"""
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
QUIET = [  # Chromium's own background traffic off (what remains is refused, see above)
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--no-first-run", "--disable-domain-reliability", "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]  # fmt: skip


def _peer(req: web.Request) -> str:
    assert req.transport is not None
    return str(req.transport.get_extra_info("peername")[0])


def _static(body: bytes, ctype: str) -> Any:
    async def handler(req: web.Request) -> web.Response:
        return web.Response(body=body, content_type=ctype)

    return handler


async def _peer_json(req: web.Request) -> web.Response:
    if req.query.get("hold"):
        await asyncio.sleep(2.0)  # under load, a WebSocket through the proxy takes a while
    return web.json_response({"peer": _peer(req)})


async def _echo(req: web.Request) -> web.Response:
    return web.json_response({"n": len(await req.read())})


async def _ws(req: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(req)
    async for msg in ws:
        await ws.send_str(f"pong:{msg.data}:{_peer(req)}")
    return ws


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An HTTPS site on 127.0.0.1 with a certificate for localhost: (port, its CA)."""
    ca = trustme.CA()
    ca_pem = tmp_path_factory.mktemp("site") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    app = web.Application()
    app.router.add_get("/", _static(PAGE, "text/html"))
    app.router.add_get("/app.js", _static(b"window.appJs=1", "text/javascript"))
    app.router.add_get("/px.png", _static(PNG, "image/png"))
    app.router.add_get("/peer", _peer_json)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/ws", _ws)
    runner = web.AppRunner(app, access_log=None)
    loop = asyncio.new_event_loop()

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        return int(runner.addresses[0][1])

    port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port, ca_pem
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _trusting_home(home: Path, ca_pem: Path) -> None:
    """README's Chromium line: the CA in $HOME/.pki/nssdb, trusted for websites (C)."""
    assert CERTUTIL is not None
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    subprocess.run([CERTUTIL, "-d", f"sql:{db}", "-N", "--empty-password"], check=True)
    subprocess.run(
        [CERTUTIL, "-d", f"sql:{db}", "-A", "-t", "C,,", "-n", "demux-proxy", "-i", str(ca_pem)],
        check=True,
    )


def test_chromium_loads_a_page_through_the_proxy(tmp_path: Path, site: tuple[int, Path]) -> None:
    assert CHROMIUM is not None
    port, site_ca = site
    with running_proxy(
        tmp_path / "state", "--workers", "1", "--allow-dest", "localhost", upstream_ca=site_ca
    ) as proxy:
        home = tmp_path / "home"
        _trusting_home(home, proxy.ca_path)
        run = subprocess.run(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={tmp_path / 'profile'}",
             f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
             *QUIET, "--virtual-time-budget=10000", "--dump-dom", f"https://localhost:{port}/"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)},
        )  # fmt: skip
        found = re.search(r'<pre id="out">RESULT(.*?)END</pre>', run.stdout)
        assert found, (re.findall(r'<pre id="out">.*?</pre>', run.stdout), run.stderr[-800:])
        result = json.loads(found.group(1))
        assert result == {
            "peer": result["peer"], "post": 100000, "ws": result["ws"], "img": 1, "js": True
        }  # fmt: skip
        assert result["ws"].startswith("pong:ping:127.0.0.")
        time.sleep(0.2)  # log lines are written at most 50 ms late
    ours = [ln for ln in proxy.lines if f"localhost:{port}" in ln["fields"].get("url", "")]
    answered = {
        ln["fields"]["url"].split(str(port), 1)[1].split("?")[0]: ln["fields"]
        for ln in ours
        if ln["message"] == "inbound response"
    }
    assert {"/", "/app.js", "/px.png", "/peer", "/echo", "/ws"} <= set(answered), answered
    assert answered["/ws"]["status_code"] == 101
    assert answered["/echo"]["bytes_sent"] == 100000
    assert len({f["interface"] for f in answered.values()}) > 1  # rotated within the page
    assert all(ln["level"] == "info" for ln in ours), [ln for ln in ours if ln["level"] != "info"]
    assert not [ln for ln in proxy.lines if ln["level"] == "error"]
