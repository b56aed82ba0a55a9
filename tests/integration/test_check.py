"""`demux-proxy check` end to end, as a subprocess.

On loopback: a tiny checkip server on 127.0.0.1 answers each request with what it wants
that source address to "see" (by default the peer address itself, so each 127.0.0.x egress
sees itself), or closes, or hangs. In network namespaces: a host with two veth interfaces
reaches an "internet" namespace whose checkip server maps private sources to public-looking
addresses, as Elastic IPs do, and the host's routing decides which interface a source
address leaves by. Nothing here leaves loopback or the namespaces the tests create.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.netns import add_namespace_or_skip, ip, ipv6_loopback_available, must, ns_sh

SRC = Path(__file__).resolve().parents[2] / "src"
RUN_TIMEOUT_S = 60

HANG = "<hang>"  # an answer that makes the server hold the connection without replying
CLOSE = None  # close the connection without a response

# Shared by the in-process loopback server and the one started inside a namespace.
SERVER_CODE = r"""
import socketserver, ssl, threading

class CheckipHandler(socketserver.StreamRequestHandler):
    def handle(self):
        server = self.server
        if server.tls is not None:
            try:
                self.request.do_handshake()
            except (OSError, ssl.SSLError):
                return
        while True:
            line = self.rfile.readline(65537)
            if not line or line in (b"\r\n", b"\n"):
                break
        peer = self.client_address[0]
        server.seen.append(peer)
        answer = server.answer(peer)
        if answer is None:
            return
        if answer == "<hang>":
            server.stopping.wait(30)
            return
        body = (answer + "\n").encode()
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )


class CheckipServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, answer, tls=None):
        self.answer = answer
        self.tls = tls
        self.seen = []
        self.stopping = threading.Event()
        super().__init__(address, CheckipHandler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        pass  # a client that went away is not the test's business
"""

_ns: dict[str, Any] = {}
exec(compile(SERVER_CODE, "<checkip server>", "exec"), _ns)
CheckipServer: Any = _ns["CheckipServer"]


@contextmanager
def checkip_server(
    answer: Callable[[str], str | None] = lambda peer: peer, tls: ssl.SSLContext | None = None
) -> Iterator[Any]:
    server = CheckipServer(("127.0.0.1", 0), answer, tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    for name in list(env):
        if name.startswith("DEMUX_PROXY_"):
            del env[name]  # the tests choose every option themselves
    return env


def run_check(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "demux_proxy", "check", *args]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env(), check=False
    )


def run_json(*args: str, netns: str | None = None) -> tuple[int, dict[str, Any]]:
    proc = run_check(*args, "--json", netns=netns)
    assert proc.returncode in (0, 1), proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, doc


def by_address(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["address"]: row for row in doc["addresses"]}


def url_of(server: Any, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.server_address[1]}/"


# ---------------------------------------------------------------------------------------------
# Loopback


def test_each_address_sees_itself() -> None:
    with checkip_server() as server:
        proc = run_check("--url", url_of(server), "--egress", "127.0.0.2,127.0.0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    rows = by_address(doc)
    assert list(rows) == ["127.0.0.2", "127.0.0.3"]
    for address, row in rows.items():
        assert row["public_address"] == address
        assert row["flags"] == []
        assert row["usable"] is True
        assert row["status"] == "ok"
        assert row["interface"] == "lo"
        assert row["latency_ms"] is not None and row["latency_ms"] >= 0
    assert sorted(server.seen) == ["127.0.0.2", "127.0.0.3"]
    # Loopback never leaves the host: no route verdict, a note instead.
    assert any("loopback" in note for note in doc["notes"])
    assert doc["fix"] == []
    assert doc["summary"]["distinct_public_addresses"] == 2
    assert "checked 2/2" in proc.stderr


def test_text_table() -> None:
    with checkip_server() as server:
        proc = run_check("--url", url_of(server), "--egress", "127.0.0.2", "--egress", "127.0.0.3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "INTERFACE",
        "LOCAL",
        "ADDRESS",
        "PUBLIC",
        "ADDRESS",
        "LATENCY",
        "STATUS",
    ]
    assert lines[1].split()[:3] == ["lo", "127.0.0.2", "127.0.0.2"]
    assert lines[1].endswith("ok")
    assert lines[2].split()[:3] == ["lo", "127.0.0.3", "127.0.0.3"]
    assert "2 address(es) checked" in proc.stdout
    assert "2 ok" in proc.stdout


def test_an_address_the_server_drops_fails() -> None:
    def answer(peer: str) -> str | None:
        return CLOSE if peer == "127.0.0.3" else peer

    with checkip_server(answer) as server:
        code, doc = run_json("--url", url_of(server), "--egress", "127.0.0.2,127.0.0.3")
    assert code == 1
    assert doc["ok"] is False
    rows = by_address(doc)
    assert rows["127.0.0.2"]["flags"] == []
    bad = rows["127.0.0.3"]
    assert bad["flags"] == ["failed"]
    assert bad["usable"] is False
    assert bad["public_address"] is None
    assert "closed the connection" in bad["error"]


def test_nothing_listening_fails_every_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the check runs: nothing listens
    code, doc = run_json("--url", f"http://127.0.0.1:{port}/", "--egress", "127.0.0.2,127.0.0.3")
    assert code == 1
    for row in doc["addresses"]:
        assert row["flags"] == ["failed"]
        assert "connection refused" in row["error"]
    assert doc["summary"]["failed"] == 2


def test_nat_shows_one_public_address_for_two_sources() -> None:
    nat = {"127.0.0.2": "198.51.100.7", "127.0.0.3": "198.51.100.7", "127.0.0.4": "198.51.100.8"}
    with checkip_server(lambda peer: nat[peer]) as server:
        code, doc = run_json("--url", url_of(server), "--egress", "127.0.0.2,127.0.0.3,127.0.0.4")
        text = run_check("--url", url_of(server), "--egress", "127.0.0.2,127.0.0.3")
    rows = by_address(doc)
    assert rows["127.0.0.2"]["flags"] == ["shared"]
    assert rows["127.0.0.2"]["shared_with"] == ["127.0.0.3"]
    assert rows["127.0.0.3"]["flags"] == ["shared"]
    assert rows["127.0.0.3"]["shared_with"] == ["127.0.0.2"]
    assert rows["127.0.0.4"]["flags"] == []
    assert doc["summary"]["distinct_public_addresses"] == 2
    assert code == 0  # shared addresses work; they just add no public address
    assert "SHARED with 127.0.0.3" in text.stdout


def test_an_answer_that_is_not_an_address_fails() -> None:
    with checkip_server(lambda peer: "<html>hello</html>") as server:
        code, doc = run_json("--url", url_of(server), "--egress", "127.0.0.2")
    assert code == 1
    assert "not an IP address" in doc["addresses"][0]["error"]


def test_timeout() -> None:
    with checkip_server(lambda peer: HANG) as server:
        code, doc = run_json("--url", url_of(server), "--egress", "127.0.0.2", "--timeout", "0.5")
    assert code == 1
    assert doc["addresses"][0]["error"] == "no answer within 0.5 s"


def test_concurrency_one_checks_every_address() -> None:
    addresses = [f"127.0.0.{i}" for i in range(2, 12)]
    with checkip_server() as server:
        code, doc = run_json(
            "--url", url_of(server), "--egress", ",".join(addresses), "--concurrency", "1"
        )
    assert code == 0
    assert [row["public_address"] for row in doc["addresses"]] == addresses


needs_ipv6 = pytest.mark.skipif(
    not ipv6_loopback_available(), reason="::1 cannot be bound here (no IPv6 on loopback)"
)
NO_IPV6 = "the URL has no IPv6 address (127.0.0.1 is an IPv4 address)"


@needs_ipv6
def test_an_ipv6_address_and_an_ipv4_url_is_not_checked_not_failed() -> None:
    """::1 cannot reach 127.0.0.1: it used to be FAILED ("cannot resolve 127.0.0.1 to an
    IPv6 address") and the exit status 1, though nothing is wrong with it."""
    with checkip_server() as server:
        proc = run_check("--url", url_of(server), "--egress", "127.0.0.2,::1", "--json")
        text = run_check("--url", url_of(server), "--egress", "127.0.0.2,::1")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    rows = by_address(doc)
    assert rows["127.0.0.2"]["flags"] == [] and rows["127.0.0.2"]["status"] == "ok"
    assert rows["127.0.0.2"]["public_address"] == "127.0.0.2"
    skipped = rows["::1"]
    assert skipped["flags"] == ["not-checked"]
    assert skipped["status"] == f"NOT CHECKED: {NO_IPV6}"
    assert skipped["not_checked"] == NO_IPV6
    assert skipped["error"] is None and skipped["usable"] is None
    assert doc["summary"]["failed"] == 0 and doc["summary"]["not_checked"] == 1
    assert server.seen == ["127.0.0.2", "127.0.0.2"]  # ::1 was never sent (nor in text mode)

    assert text.returncode == 0, text.stderr
    lines = {line.split()[1]: line for line in text.stdout.splitlines()[1:3]}
    assert lines["127.0.0.2"].endswith("  ok")
    assert lines["::1"].endswith(f"  NOT CHECKED: {NO_IPV6}")
    assert "FAILED" not in text.stdout
    assert "2 address(es) checked" in text.stdout and "1 ok, 1 not checked;" in text.stdout


@needs_ipv6
def test_nothing_to_check_is_not_success() -> None:
    """Only IPv6 egress and an IPv4 URL: no address shown to work, so exit status 1, with
    a message saying why (and no failure reported)."""
    with checkip_server() as server:
        proc = run_check("--url", url_of(server), "--egress", "::1", "--json")
        text = run_check("--url", url_of(server), "--egress", "::1")
    assert server.seen == []
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    assert doc["summary"]["failed"] == 0 and doc["summary"]["not_checked"] == 1
    assert doc["addresses"][0]["flags"] == ["not-checked"]
    for run in (proc, text):
        assert f"demux-proxy: error: no address could be checked: {NO_IPV6}" in run.stderr
    assert text.returncode == 1
    assert f"NOT CHECKED: {NO_IPV6}" in text.stdout


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@contextmanager
def https_checkip(ca: trustme.CA) -> Iterator[Any]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    with checkip_server(tls=ctx) as server:
        yield server


def test_https_with_upstream_ca(tls_ca: trustme.CA, tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(pem))
    with https_checkip(tls_ca) as server:
        url = url_of(server, "https")
        code, doc = run_json("--url", url, "--egress", "127.0.0.2", "--upstream-ca", str(pem))
        untrusted_code, untrusted = run_json("--url", url, "--egress", "127.0.0.2")
        insecure_code, insecure = run_json(
            "--url", url, "--egress", "127.0.0.2", "--insecure-upstream"
        )
    assert code == 0, doc
    assert doc["addresses"][0]["public_address"] == "127.0.0.2"
    assert untrusted_code == 1
    assert "not trusted" in untrusted["addresses"][0]["error"]
    assert insecure_code == 0
    assert insecure["addresses"][0]["public_address"] == "127.0.0.2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--url", "ftp://127.0.0.1/", "--egress", "127.0.0.2"), "only http:// and https://"),
        (("--egress", "192.0.2.250"), "cannot use egress address 192.0.2.250"),
        (("--egress", "not-an-ip"), "not an IP address"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    proc = run_check(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# Network namespaces: a host with two interfaces, an "internet", Elastic-IP-like addresses.

SERVER_ADDRESS = "203.0.113.10"
EIPS = {
    "10.10.1.2": "198.51.100.12",
    "10.10.1.3": "198.51.100.13",
    "10.10.2.2": "198.51.100.22",
}
NETNS_SERVER = (
    SERVER_CODE
    + r"""
import json, sys
eips = json.loads(sys.argv[1])
server = CheckipServer((sys.argv[2], 80), lambda peer: eips.get(peer, peer))
print("ready", flush=True)
server.serve_forever(poll_interval=0.05)
"""
)


def _no_rp_filter(ns: str) -> None:
    # Strict reverse-path filtering (inherited from the host on some systems) would drop the
    # misrouted address's packets; the test wants to see them arrive and be flagged anyway.
    ns_sh(ns, "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")


@pytest.fixture(scope="module")
def two_homed() -> Iterator[str]:
    """The host namespace's name; its checkip server runs in a peer namespace."""
    tag = secrets.token_hex(3)
    host, inet = f"dpchk-h-{tag}", f"dpchk-i-{tag}"
    add_namespace_or_skip(host)
    created = [host]
    server: subprocess.Popen[str] | None = None
    try:
        must("netns", "add", inet)
        created.append(inet)
        must(
            "-n",
            host,
            "link",
            "add",
            "eth-a",
            "type",
            "veth",
            "peer",
            "name",
            "peer-a",
            "netns",
            inet,
        )
        must(
            "-n",
            host,
            "link",
            "add",
            "eth-b",
            "type",
            "veth",
            "peer",
            "name",
            "peer-b",
            "netns",
            inet,
        )
        for cidr, dev in [
            ("10.10.1.2/24", "eth-a"),
            ("10.10.1.3/24", "eth-a"),
            ("10.10.2.2/24", "eth-b"),
        ]:
            must("-n", host, "addr", "add", cidr, "dev", dev)
        for cidr, dev in [
            ("10.10.1.1/24", "peer-a"),
            ("10.10.2.1/24", "peer-b"),
            (f"{SERVER_ADDRESS}/32", "lo"),
        ]:
            must("-n", inet, "addr", "add", cidr, "dev", dev)
        for ns, links in [(host, ["lo", "eth-a", "eth-b"]), (inet, ["lo", "peer-a", "peer-b"])]:
            for link in links:
                must("-n", ns, "link", "set", link, "up")
            _no_rp_filter(ns)
        # Only the primary interface has a default route: eth-b has no policy routing yet.
        must("-n", host, "route", "add", "default", "via", "10.10.1.1", "dev", "eth-a")

        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                inet,
                sys.executable,
                "-c",
                NETNS_SERVER,
                json.dumps(EIPS),
                SERVER_ADDRESS,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        ready = _readline_within(server.stdout, 20)
        if ready.strip() != "ready":
            raise RuntimeError(f"checkip server did not start: {ready!r}")
        yield host
    finally:
        if server is not None:
            server.terminate()
            try:
                server.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.communicate(timeout=10)
        for ns in created:
            ip("netns", "delete", ns)


def _readline_within(stream: Any, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


NETNS_ARGS = (
    "--url",
    f"http://{SERVER_ADDRESS}/",
    "--egress-interface",
    "eth-a,eth-b",
    "--timeout",
    "5",
)


@pytest.mark.netns
def test_policy_routing_in_namespaces(two_homed: str) -> None:
    host = two_homed

    # 1. No policy routing: 10.10.2.2 leaves by eth-a (it gets through only because this
    #    simulated network does no source check; a VPC drops it).
    code, doc = run_json(*NETNS_ARGS, netns=host)
    rows = by_address(doc)
    assert list(rows) == ["10.10.1.2", "10.10.1.3", "10.10.2.2"]
    for address, row in rows.items():
        assert row["public_address"] == EIPS[address]
    assert rows["10.10.1.2"]["flags"] == [] and rows["10.10.1.2"]["route_device"] == "eth-a"
    assert rows["10.10.1.3"]["flags"] == []
    assert rows["10.10.2.2"]["flags"] == ["wrong-route"]
    assert rows["10.10.2.2"]["interface"] == "eth-b"
    assert rows["10.10.2.2"]["route_device"] == "eth-a"
    assert code == 1
    commands = [line for line in doc["fix"] if not line.startswith("#")]
    assert commands == [
        "ip route add default via GATEWAY dev eth-b table 101",
        "ip rule add from 10.10.2.2 lookup 101",
    ]
    assert any("10.10.2.0/24" in note and "10.10.2.1" in note for note in doc["notes"])

    text = run_check(*NETNS_ARGS, netns=host)
    assert text.returncode == 1
    assert "WRONG ROUTE: leaves by eth-a, not eth-b" in text.stdout
    assert "  ip rule add from 10.10.2.2 lookup 101" in text.stdout

    # 2. A table that routes through eth-b exists, but no rule sends 10.10.2.2 to it: the
    #    fix reuses the table and only adds the rule.
    must("-n", host, "route", "add", "default", "via", "10.10.2.1", "dev", "eth-b", "table", "102")
    code, doc = run_json(*NETNS_ARGS, netns=host)
    assert code == 1
    assert by_address(doc)["10.10.2.2"]["flags"] == ["wrong-route"]
    assert [line for line in doc["fix"] if not line.startswith("#")] == [
        "ip rule add from 10.10.2.2 lookup 102"
    ]

    # 3. With the rule, every address leaves by its own interface.
    must("-n", host, "rule", "add", "from", "10.10.2.2", "lookup", "102")
    code, doc = run_json(*NETNS_ARGS, netns=host)
    rows = by_address(doc)
    assert code == 0, doc
    assert doc["ok"] is True
    assert all(row["flags"] == [] for row in rows.values())
    assert rows["10.10.2.2"]["route_device"] == "eth-b"
    assert rows["10.10.2.2"]["public_address"] == "198.51.100.22"
    assert doc["fix"] == []
