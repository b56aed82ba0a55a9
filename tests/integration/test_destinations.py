"""Destination rules through the real proxy: 508 for itself, --deny, --allow-dest."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import requests

from tests.proxy_process import EGRESS, ProxyProcess, running_proxy
from tests.rawserver import read_head
from tests.upstream import Upstream


def _get(p: ProxyProcess, url: str) -> requests.Response:
    with requests.Session() as s:
        return s.get(url, proxies={"http": p.url, "https": p.url}, timeout=10)


def test_request_to_the_proxy_itself_is_508(proxy: ProxyProcess) -> None:
    r = _get(proxy, f"http://127.0.0.1:{proxy.port}/loop")
    assert r.status_code == 508
    assert "itself" in r.text
    assert r.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("host", ["0.0.0.0", "0", "[::]"])
def test_the_unspecified_address_is_refused_even_with_allow_private(
    proxy: ProxyProcess, host: str
) -> None:
    """Linux connects 0.0.0.0 to this host: it passed --deny 127.0.0.0/8 and the loop
    check (the proxy connected to itself)."""
    r = _get(proxy, f"http://{host}:{proxy.port}/")
    assert r.status_code == 403 and "never a destination" in r.text, r.text
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 403 ")


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
        # Refused before anything left: logged as from no egress address.
        refused = p.wait_for_log("inbound response", lambda ln: ln["fields"]["status_code"] == 403)
        assert "interface" not in refused["fields"], refused
        # (Matched by status: with two workers, each writes its own batches of lines, so
        # the first line out need not be the first request's.)
        answered = p.wait_for_log("inbound response", lambda ln: ln["fields"]["status_code"] == 200)
        assert answered["fields"]["interface"] in EGRESS


def _in_tunnel(
    p: ProxyProcess, connect: str, sni: str, host: str, *, target: str = "/ip", version: str = "1.1"
) -> bytes:
    """CONNECT to `connect`, TLS with the proxy as `sni`, one GET with `host` (the
    whole Host line, or lines, when it holds a colon and a space): the whole answer."""
    if ": " not in host:
        host = f"Host: {host}\r\n" if host else ""
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
        raw.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
        assert read_head(raw).startswith(b"HTTP/1.1 200 ")
        ctx = ssl.create_default_context(cafile=str(p.ca_path))
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(f"GET {target} HTTP/{version}\r\n{host}Connection: close\r\n\r\n".encode())
            answer = b""
            while chunk := tls.recv(65536):  # Connection: close
                answer += chunk
            return answer


def test_deny_judges_the_sni_and_the_host_inside_a_tunnel(
    tmp_path: Path, upstream: Upstream
) -> None:
    """A CONNECT to an allowed name must not reach a denied one: not as the TLS name
    the upstream is verified as, nor as the Host asked of the server (fronting)."""
    connect = f"localhost:{upstream.https_port}"
    with running_proxy(
        tmp_path / "deny", "--deny", "*.example.com", upstream_ca=upstream.ca_pem_path
    ) as p:
        assert _in_tunnel(p, connect, "localhost", "localhost").startswith(b"HTTP/1.1 200 ")
        for sni, host in (("evil.example.com", "evil.example.com"), ("localhost", "a.example.com")):
            answer = _in_tunnel(p, connect, sni, host)
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert b"--deny *.example.com" in answer
    with running_proxy(
        tmp_path / "allow", "--allow-dest", "localhost", upstream_ca=upstream.ca_pem_path
    ) as p:
        answer = _in_tunnel(p, connect, "upstream.test", "upstream.test")
        assert answer.startswith(b"HTTP/1.1 403 ") and b"--allow-dest" in answer, answer


def test_a_request_in_a_tunnel_carries_one_valid_host(tmp_path: Path, upstream: Upstream) -> None:
    """RFC 9112 3.2: inside a tunnel the proxy is the server. Two Host lines, a list of
    names or none at all went upstream as they were, and --deny judged the first Host
    only; an absolute-form target's authority was dropped, not made the Host (3.2.2)."""
    connect = f"localhost:{upstream.https_port}"
    with running_proxy(
        tmp_path / "deny", "--deny", "*.example.com", upstream_ca=upstream.ca_pem_path
    ) as p:
        refused = {
            "Host: localhost\r\nHost: a.example.com\r\n": b"more than one Host field",
            "Host: localhost, a.example.com\r\n": b"invalid Host field",
            "": b"HTTP/1.1 request without a Host field",
        }
        for lines, reason in refused.items():
            answer = _in_tunnel(p, connect, "localhost", lines)
            assert answer.startswith(b"HTTP/1.1 400 ") and reason in answer, (lines, answer)
        answer = _in_tunnel(p, connect, "localhost", "localhost", target="https://a.example.com/")
        assert answer.startswith(b"HTTP/1.1 403 ") and b"--deny *.example.com" in answer
        # Allowed, the absolute-form's authority is the Host the upstream sees.
        answer = _in_tunnel(p, connect, "localhost", "", target=f"https://{connect}/headers")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])[0] == ["Host", connect]
        # HTTP/1.0 may leave Host out; the upstream (an HTTP/1.1 request now) still gets
        # one: the name the tunnel's TLS asked for, and its port (it went out without).
        answer = _in_tunnel(p, connect, "localhost", "", target="/headers", version="1.0")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])[0] == ["Host", connect]
        # Outside tunnels too, two Host lines are a 400 (the second one was dropped).
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            url = upstream.http_url("/ip")
            c.sendall(f"GET {url} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode())
            answer = c.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"more than one Host" in answer


def test_an_international_deny_rule_matches_its_a_label(tmp_path: Path) -> None:
    """Clients send xn--bcher-kva.de: a rule written as bücher.de must catch it (it was
    accepted and never matched), before any DNS lookup."""
    with running_proxy(tmp_path / "idn", "--deny", "*.bücher.de", "--deny", "bücher.de") as p:
        for host in ("xn--bcher-kva.de", "XN--BCHER-KVA.DE.", "www.xn--bcher-kva.de"):
            r = _get(p, f"http://{host}/")
            assert r.status_code == 403, (host, r.text)
            assert "xn--bcher-kva.de" in r.text
    # IDNA 2008 (UTS 46 non-transitional), as curl and browsers encode: "ß" stays one.
    with running_proxy(tmp_path / "idn2008", "--deny", "straße.de") as p:
        r = _get(p, "http://xn--strae-oqa.de/")
        assert r.status_code == 403 and "xn--strae-oqa.de" in r.text, r.text
        assert _get(p, "http://strasse.de/").status_code != 403  # another domain


def _openssl_in_tunnel(proxy: ProxyProcess, connect: str, sni: str) -> bytes:
    """One GET in a tunnel through openssl s_client, which sends any server name."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return subprocess.run(
        ["openssl", "s_client", "-quiet", "-proxy", f"127.0.0.1:{proxy.port}",
         "-connect", connect, "-servername", sni],
        input=b"GET /ip HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=30, check=False,
    ).stdout  # fmt: skip


def test_an_sni_no_certificate_can_hold_gets_the_connect_hosts(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    """A 64-character label: a leaf was minted for it, then the upstream side failed
    with an internal error and the client got a reset. It is served as the CONNECT host."""
    answer = _openssl_in_tunnel(proxy, f"localhost:{upstream.https_port}", "a" * 64 + ".example")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert not proxy.logs("internal error")


def test_an_undecodable_sni_is_logged_not_printed(proxy: ProxyProcess, upstream: Upstream) -> None:
    """A non-ASCII server name fails in the ssl module's callback, which Python reports
    as "Exception ignored" on stderr, outside the log: it is a warning line now."""
    _openssl_in_tunnel(proxy, f"localhost:{upstream.https_port}", "\u00ff.com")
    line = proxy.wait_for_log("exception ignored")
    assert "UnicodeDecodeError" in line["fields"]["error"]
    assert _get(proxy, upstream.http_url("/ip")).status_code == 200
