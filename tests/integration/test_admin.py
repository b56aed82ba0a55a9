"""The admin listener serves real numbers after real traffic, across workers."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy_process import EGRESS, ProxyProcess, proxy_command, running_proxy
from tests.upstream import Upstream


@pytest.fixture(scope="module")
def admin_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[ProxyProcess]:
    with running_proxy(
        tmp_path_factory.mktemp("state"),
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "2",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        yield p


def _admin(p: ProxyProcess) -> str:
    return "http://" + p.wait_for_log("Starting Proxy")["fields"]["admin"]


def _traffic(p: ProxyProcess, upstream: Upstream) -> None:
    """8 http + 4 https successes and one refused upstream, each on a new connection."""
    for url in [upstream.http_url("/bytes/1000")] * 8 + [upstream.https_url("/ip")] * 4:
        with requests.Session() as s:
            r = s.get(url, proxies={"http": p.url, "https": p.url}, verify=str(p.ca_path))
            assert r.status_code == 200
    with requests.Session() as s:
        r = s.get("http://127.0.0.1:1/", proxies={"http": p.url}, timeout=10)
        assert r.status_code == 502


def test_metrics_status_and_health_after_traffic(
    admin_proxy: ProxyProcess, upstream: Upstream
) -> None:
    _traffic(admin_proxy, upstream)
    base = _admin(admin_proxy)
    with requests.Session() as s:
        assert s.get(base + "/healthz", timeout=10).text == "ok\n"
        text = s.get(base + "/metrics", timeout=10).text
        doc = s.get(base + "/status.json", timeout=10).json()
        page = s.get(base + "/status", timeout=10)
    ok = {}
    errors = {}
    down = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "demux_requests_total" and sample.labels["status_class"] == "2xx":
                ok[sample.labels["egress"]] = ok.get(sample.labels["egress"], 0) + sample.value
            if sample.name == "demux_errors_total":
                errors[sample.labels["kind"]] = sample.value
            if sample.name == "demux_body_bytes_total" and sample.labels["direction"] == "down":
                down += sample.value
    ok = {egress: n for egress, n in ok.items() if n}  # series exist from start at 0
    # Both workers' counts are summed: 12 successes spread 3 per address by the rotation.
    assert sum(ok.values()) == 12
    assert sorted(ok) == sorted(EGRESS) and set(ok.values()) == {3.0}
    assert errors.get("upstream") == 1
    assert down >= 8 * 1000
    rows = {row["address"]: row for row in doc["addresses"]}
    assert sorted(rows) == sorted(EGRESS)
    assert sum(r["status"]["2xx"] for r in rows.values()) == 12
    assert doc["totals"]["requests"] == 13 and doc["totals"]["errors"] == 1
    assert doc["workers"] == 2
    assert all(r["interface"] == "lo" for r in rows.values())
    assert page.headers["Content-Type"].startswith("text/html")
    assert "demux-proxy" in page.text and "status.json" in page.text


def test_answers_the_proxy_gives_itself_are_counted(tmp_path: Path) -> None:
    """A malformed head (400), a 407, a refused CONNECT (403) and a TRACE at Max-Forwards
    0 (200) were logged but never counted: /metrics showed a proxy that refused everyone
    as one that saw nothing. A request to the proxy itself (508) is refused before it
    leaves, as a 403 is: it was counted under the address picked for it."""
    with running_proxy(
        tmp_path, "--admin", "127.0.0.1:0", "--auth", "u:p", "--deny", "denied.test"
    ) as p:
        token = base64.b64encode(b"u:p").decode()
        asks = [
            b"GARBAGE\r\n\r\n",  # 400
            b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",  # 407: a challenge
            b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n"
            b"Proxy-Authorization: Basic eDp5\r\n\r\n",  # 407: x:y refused
            b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n"
            b"Proxy-Authorization: Basic %s\r\n\r\n" % token.encode(),  # 403
            b"TRACE http://a.test/ HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 0\r\n"
            b"Proxy-Authorization: Basic %s\r\n\r\n" % token.encode(),  # 200, from here
            b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Proxy-Authorization: Basic %s\r\n\r\n" % (p.port, token.encode()),  # 508
        ]
        statuses = []
        for ask in asks:
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
                c.sendall(ask)
                statuses.append(c.recv(65536)[:12])
        assert statuses == [b"HTTP/1.1 %d" % n for n in (400, 407, 407, 403, 200, 508)]
        text = requests.get(_admin(p) + "/metrics", auth=("u", "p"), timeout=10).text
    counted: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "demux_requests_total":
                key = (sample.labels["egress"], sample.labels["status_class"])
                counted[key] = sample.value
            if sample.name == "demux_errors_total" and sample.value:
                counted[("error", sample.labels["kind"])] = sample.value
    assert counted[("none", "4xx")] == 4
    assert counted[("none", "2xx")] == 1
    assert counted[("none", "5xx")] == 1
    assert not any(v for k, v in counted.items() if k[0] in EGRESS), counted
    assert {k: v for k, v in counted.items() if k[0] == "error"} == {
        ("error", "bad_request"): 1,
        ("error", "auth"): 1,
        ("error", "forbidden"): 1,
        ("error", "loop"): 1,
    }


def test_admin_on_a_public_address_needs_auth(tmp_path: Path) -> None:
    out = subprocess.run(
        proxy_command(
            ["start", "--state-dir", str(tmp_path), "--egress", "127.0.0.2", "--admin",
             "0.0.0.0:0"]
        ),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--admin" in out.stderr and "--auth" in out.stderr


@pytest.mark.parametrize(
    ("listen", "admin"),
    [("127.0.0.1:{port}", "127.0.0.1:{port}"), ("127.0.0.1:{port}", "0.0.0.0:{port}")],
)
def test_admin_on_the_proxys_own_port_is_refused(tmp_path: Path, listen: str, admin: str) -> None:
    """With --workers 2 every listener has SO_REUSEPORT: both were bound, and the kernel
    shared the clients out between the proxy and the admin endpoint (proxied requests
    got the admin's 404, /healthz the proxy's 400)."""
    with socket.socket() as s:  # a free port, released: nothing should bind it here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen, admin = listen.format(port=port), admin.format(port=port)
    args = ["--state-dir", str(tmp_path), "--egress", "127.0.0.2", "--listen", listen]
    args += ["--admin", admin, "--auth", "u:p", "--workers", "2"]
    for command in ("start", "config"):
        out = subprocess.run(
            proxy_command([command, *args]), capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 2, (command, out.returncode, out.stderr)
        assert f"--admin {admin} is the --listen address" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_status_page_renders_in_chromium(
    admin_proxy: ProxyProcess, upstream: Upstream, tmp_path: Path
) -> None:
    _traffic(admin_proxy, upstream)
    assert CHROMIUM is not None
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000",
    ]  # fmt: skip
    url = _admin(admin_proxy) + "/status"
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
    ).stdout
    for address in EGRESS:  # rows exist only once the page's script fetched status.json
        assert f"<td>{address}</td>" in dom
    shot = tmp_path / "status.png"
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1200,420", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert shot.stat().st_size > 5_000


def test_a_killed_proxys_metrics_directory_goes_at_the_next_start(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) leaves the metrics directory behind: the next start
    removes it, and keeps one whose process still runs."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    alive = tmp / f"demux-proxy-metrics-{os.getpid()}-kept"
    alive.mkdir()
    env = {"TMPDIR": str(tmp)}
    with running_proxy(tmp_path / "state", "--admin", "127.0.0.1:0", env=env) as p:
        (killed,) = set(tmp.iterdir()) - {alive}
        p.proc.kill()
        p.proc.wait(timeout=10)
    assert killed.is_dir()
    with running_proxy(tmp_path / "state", "--admin", "127.0.0.1:0", env=env):
        left = set(tmp.iterdir())
        assert killed not in left and alive in left and len(left) == 2, left
    assert set(tmp.iterdir()) == {alive}  # a clean stop removes its own


def _admin_get(admin: str, path: str, source: str) -> bytes:
    host, _, port = admin.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0)) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: {admin}\r\n\r\n".encode())
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    return answer


def test_allow_client_holds_on_the_admin_listener(tmp_path: Path) -> None:
    """--allow-client kept other networks off the proxy's port, not off /status.json."""
    with running_proxy(
        tmp_path / "state", "--allow-client", "127.0.0.1/32", "--admin", "127.0.0.1:0"
    ) as p:
        admin = p.wait_for_log("Starting Proxy")["fields"]["admin"]
        assert _admin_get(admin, "/status.json", "127.0.0.1").startswith(b"HTTP/1.1 200 ")
        refused = _admin_get(admin, "/status.json", "127.0.0.9")
        assert refused.startswith(b"HTTP/1.1 403 ") and b"--allow-client" in refused, refused
        assert _admin_get(admin, "/metrics", "127.0.0.9").startswith(b"HTTP/1.1 403 ")
        assert _admin_get(admin, "/healthz", "127.0.0.9").startswith(b"HTTP/1.1 200 ")
