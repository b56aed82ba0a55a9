"""Who may use the proxy: --auth, --auth-file, --allow-client, and the public-listen guard."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import psutil
import pytest
import requests

from tests.proxy_process import ProxyProcess, proxy_command, running_proxy
from tests.upstream import Upstream

SECRET = "s3cr3t-Pa55"


def _get(proxy: ProxyProcess, url: str, user: str | None = None) -> requests.Response:
    auth = f"{user}@" if user else ""
    proxy_url = f"http://{auth}127.0.0.1:{proxy.port}"
    with requests.Session() as s:
        return s.get(
            url,
            proxies={"http": proxy_url, "https": proxy_url},
            verify=str(proxy.ca_path),
            timeout=10,
        )


def test_public_listen_without_auth_is_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        proxy_command(["start", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path)]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--auth" in lines[0] and "--allow-client" in lines[0]


@pytest.fixture(scope="module")
def auth_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[ProxyProcess]:
    hashed = bcrypt.hashpw(b"hashed-pw", bcrypt.gensalt(rounds=4)).decode()
    auth_file = tmp_path_factory.mktemp("auth") / "users"
    auth_file.write_text(f"# users\nbob:{hashed}\n")
    with running_proxy(
        tmp_path_factory.mktemp("state"),
        "--auth",
        f"alice:{SECRET}",
        "--auth-file",
        str(auth_file),
        "--log-level",
        "debug",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        yield p


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_missing_or_wrong_credentials_get_407(
    auth_proxy: ProxyProcess, upstream: Upstream, scheme: str
) -> None:
    url = upstream.http_url("/ip") if scheme == "http" else upstream.https_url("/ip")
    if scheme == "http":
        for user in (None, "alice:wrong", "mallory:" + SECRET):
            r = _get(auth_proxy, url, user)
            assert r.status_code == 407
            assert r.headers["Proxy-Authenticate"].startswith("Basic realm=")
        # Asking first is how Basic auth begins (info); refused credentials are a warning.
        asked = auth_proxy.wait_for_log(
            "proxy authentication required", lambda ln: ln["fields"]["credentials"] == "none"
        )
        refused = auth_proxy.wait_for_log(
            "proxy authentication required", lambda ln: ln["fields"]["credentials"] == "refused"
        )
        assert (asked["level"], refused["level"]) == ("info", "warning")
    else:
        for user in (None, "alice:wrong"):
            with pytest.raises(requests.exceptions.ProxyError, match="407"):
                _get(auth_proxy, url, user)


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("user", [f"alice:{SECRET}", "bob:hashed-pw"])
def test_right_credentials_pass_and_never_reach_upstream_or_logs(
    auth_proxy: ProxyProcess, upstream: Upstream, scheme: str, user: str
) -> None:
    url = upstream.http_url("/headers") if scheme == "http" else upstream.https_url("/headers")
    r = _get(auth_proxy, url, user)
    assert r.status_code == 200
    names = {name.lower() for name, _ in r.json()}
    assert "proxy-authorization" not in names
    password = user.split(":", 1)[1]
    assert not any(password in line for line in auth_proxy.raw_lines)


def test_curl_retries_with_credentials_on_the_same_connection(
    auth_proxy: ProxyProcess, upstream: Upstream
) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--proxy", auth_proxy.url, "--proxy-user", f"alice:{SECRET}",
         "--proxy-anyauth", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}",
         upstream.http_url("/ip")],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    code, connects = out.stdout.split()
    assert code == "200" and connects == "1"


def test_a_407_to_a_request_with_a_body_says_the_connection_closes(
    auth_proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The body of a refused request is not read, so the connection ends after the 407,
    and the 407 says so (RFC 9112 9.6): a client then retries on a new connection rather
    than meeting a reset. Without a body the connection stays open for the retry."""
    url = upstream.http_url("/upload")
    with socket.create_connection(("127.0.0.1", auth_proxy.port), timeout=10) as c:
        c.sendall(f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 407 "), answer
    assert b"\r\nconnection: close" in head
    with socket.create_connection(("127.0.0.1", auth_proxy.port), timeout=10) as c:
        c.sendall(f"GET {upstream.http_url('/ip')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = c.recv(65536).split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 407 ")
    assert b"connection: close" not in head


@pytest.mark.parametrize(
    "request_line", ["GET {url} HTTP/1.1\r\nConnection: close", "GET {url} HTTP/1.0"]
)
def test_a_407_honours_a_close_the_client_asked_for(
    auth_proxy: ProxyProcess, upstream: Upstream, request_line: str
) -> None:
    """RFC 9112 9.6: "close", or HTTP/1.0 without keep-alive, ends the connection after
    the answer; the 407 kept it open until --client-idle-timeout."""
    line = request_line.format(url=upstream.http_url("/ip"))
    with socket.create_connection(("127.0.0.1", auth_proxy.port), timeout=5) as c:
        c.sendall(f"{line}\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while chunk := c.recv(65536):  # a timeout here: the proxy kept it open
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 407 ") and b"\r\nconnection: close" in head, answer


def test_a_client_that_reads_no_answers_stops_being_read(
    auth_proxy: ProxyProcess, upstream: Upstream
) -> None:
    """Requests pipelined by a client that never reads the 407s: the proxy read them all,
    its memory growing with what the client sent (200 MB for 200 MB), and answered
    them all while other clients waited. Now it stops reading once its answers back up."""
    request = f"GET {upstream.http_url('/ip')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    stream = memoryview(request * 800_000)  # about 50 MB
    total = len(stream)
    proc = psutil.Process(auth_proxy.proc.pid)
    rss_before = proc.memory_info().rss
    sent = 0
    with socket.socket() as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # little kernel slack
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        c.connect(("127.0.0.1", auth_proxy.port))
        c.settimeout(3)
        try:
            while sent < total:
                sent += c.send(stream[sent : sent + (1 << 20)])
        except TimeoutError:
            pass  # the proxy stopped reading: what it should do
        grown = proc.memory_info().rss - rss_before
        # Another client is answered meanwhile.
        assert _get(auth_proxy, upstream.http_url("/ip")).status_code == 407
    assert sent < total / 4, f"the proxy took {sent} bytes from a client that read nothing"
    assert grown < 32 << 20, grown


def test_an_ipv4_client_of_a_dual_stack_listener_is_known_by_its_ipv4(
    tmp_path: Path, upstream: Upstream
) -> None:
    """On [::], an IPv4 client's peer address is ::ffff:127.0.0.1: the log's `client`
    said so, beside the 127.0.0.1 of the same client on a 127.0.0.1 listener."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python: no [::] listener")
    with running_proxy(
        tmp_path / "state",
        "--listen",
        "[::]:0",
        "--allow-client",
        "127.0.0.0/8",
        "--workers",
        "1",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        url = upstream.http_url("/ip?dual-stack-client")
        assert _get(p, url).status_code == 200
        line = p.wait_for_log("inbound response", lambda ln: ln["fields"]["url"] == url)
    assert line["fields"]["client"] == "127.0.0.1", line


def test_allow_client_outside_the_networks_is_closed(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(
        tmp_path / "state", "--allow-client", "10.0.0.0/8", upstream_ca=upstream.ca_pem_path
    ) as p:
        with pytest.raises(requests.exceptions.ConnectionError):
            _get(p, upstream.http_url("/ip"))
        p.wait_for_log("client refused by --allow-client")
    with running_proxy(
        tmp_path / "state2", "--allow-client", "127.0.0.0/8", upstream_ca=upstream.ca_pem_path
    ) as p:
        assert _get(p, upstream.http_url("/ip")).status_code == 200
