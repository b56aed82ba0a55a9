"""A resolver that never answers: the request gets a 504 within --connect-timeout, not
the resolver's own retries (seconds each, per address family).

The proxy and its client run inside a network namespace of their own whose resolv.conf
(`/etc/netns/NAME/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf)
names a nameserver on a veth link where nothing answers ARP: the queries go nowhere,
and no packet leaves the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.netns import add_namespace_or_skip, ip, ns_ip

pytestmark = pytest.mark.netns

# Inside the namespace: start the proxy, ask it for a name only DNS could answer, print
# what the client saw and how long it took.
# Both probes start the proxy (state dir: argv[1]) and learn its port from its log.
START_PROXY = r"""
import json, socket, subprocess, sys, time
def start_proxy(*options):
    proxy = subprocess.Popen(
        [sys.executable, "-m", "demux_proxy", "start", "--workers", "1",
         "--listen", "127.0.0.1:0", "--allow-private", "--state-dir", sys.argv[1], *options],
        stdout=subprocess.PIPE, text=True)
    for line in proxy.stdout:
        rec = json.loads(line)
        if rec["message"] == "Starting Proxy":
            return proxy, int(rec["fields"]["listen"].rsplit(":", 1)[1])
    raise SystemExit("the proxy did not start")
def fetch(port, url, host):
    # GET url through the proxy on `port`, the connection closed after: all of the answer
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                  % (url.encode(), host.encode()))
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    return answer.decode("latin-1")
"""

# A small HTTP server for the probes: what `answer` returns, by default the peer's address
# (the egress address a request came from).
HTTP_SERVER = r"""
import http.server, threading
class Answer(http.server.BaseHTTPRequestHandler):
    def answer(self):
        return self.client_address[0].encode()
    def do_GET(self):
        body = self.answer()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
"""

PROBE = (
    START_PROXY
    + r"""
proxy, port = start_proxy("--egress", "10.99.0.1", "--connect-timeout", "1")
try:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"GET http://never-answers.test/ HTTP/1.1\r\nHost: never-answers.test\r\n\r\n")
        answer = c.recv(65536).decode("latin-1")
    print(json.dumps({"answer": answer, "seconds": time.monotonic() - started}))
finally:
    proxy.terminate()
    proxy.wait(10)
"""
)


@contextmanager
def _namespace(prefix: str, resolv_conf: str, hosts: str | None = None) -> Iterator[str]:
    """A throw-away namespace, loopback up, whose resolv.conf is `resolv_conf` (and
    /etc/hosts `hosts`, where given)."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    add_namespace_or_skip(name)
    conf_dir = Path("/etc/netns") / name
    try:
        ns_ip(name, "link", "set", "lo", "up")
        conf_dir.mkdir(parents=True)
        (conf_dir / "resolv.conf").write_text(resolv_conf)
        if hosts is not None:
            (conf_dir / "hosts").write_text(hosts)
        yield name
    finally:
        ip("netns", "delete", name)
        shutil.rmtree(conf_dir, ignore_errors=True)


def _probe(netns: str, code: str, *args: str) -> Any:
    """Run `code` in the namespace with this interpreter and environment (the build
    under test); the JSON it printed last."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=90, env=dict(os.environ), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def netns() -> Iterator[str]:
    with _namespace("demuxdns", "nameserver 10.99.0.2\noptions timeout:5 attempts:2\n") as name:
        proc = ip("-n", name, "link", "add", "dns0", "type", "dummy")
        if proc.returncode != 0:  # no dummy links in this kernel: a veth pair, peer silent
            ns_ip(name, "link", "add", "dns0", "type", "veth", "peer", "name", "dns0p")
            ns_ip(name, "link", "set", "dns0p", "up")
        ns_ip(name, "addr", "add", "10.99.0.1/24", "dev", "dns0")
        ns_ip(name, "link", "set", "dns0", "up")
        yield name


def test_a_resolver_that_never_answers_is_a_504_in_time(netns: str, tmp_path: Path) -> None:
    seen = _probe(netns, PROBE, str(tmp_path / "state"))
    assert seen["answer"].startswith("HTTP/1.1 504 "), seen
    assert "resolving never-answers.test took over 1 s" in seen["answer"]
    # The resolver alone would take 5 s a try, two tries, per family.
    assert seen["seconds"] < 5, seen


# Inside the namespace: a DNS server on 127.0.0.1 that answers NXDOMAIN for gone.test,
# A for any other name, and for AAAA what argv[2] says: SERVFAIL, nothing (silent), or
# an empty answer (nodata).
DNS_SERVER = r"""
import struct, threading
mode = sys.argv[2]
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))
def serve_dns():
    while True:
        q, peer = dns.recvfrom(512)
        i = 12
        while q[i]:
            i += q[i] + 1
        qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
        tid, question = q[:2], q[12:i + 5]
        if q[13:17] == b"gone":
            dns.sendto(tid + struct.pack(">HHHHH", 0x8183, 1, 0, 0, 0) + question, peer)
        elif qtype == 1:
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
            dns.sendto(tid + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + question + answer, peer)
        elif mode == "servfail":
            dns.sendto(tid + struct.pack(">HHHHH", 0x8182, 1, 0, 0, 0) + question, peer)
        elif mode == "nodata":
            dns.sendto(tid + struct.pack(">HHHHH", 0x8180, 1, 0, 0, 0) + question, peer)
threading.Thread(target=serve_dns, daemon=True).start()
"""

# ... with an upstream and the proxy with IPv4 and IPv6 egress.
MIXED_PROBE = (
    START_PROXY
    + DNS_SERVER
    + HTTP_SERVER
    + r"""
upstream = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer))
proxy, port = start_proxy("--egress", "127.0.0.2,::1")
try:
    seen = []
    for _ in range(4):
        started = time.monotonic()
        answer = fetch(port, "http://svc.test:%d/" % upstream.server_address[1], "svc.test")
        seen.append([answer, time.monotonic() - started])
    print(json.dumps(seen))
finally:
    proxy.terminate()
    proxy.wait(10)
"""
)


# ... with the proxy asked for names that have no address it can use.
NAMES_PROBE = (
    START_PROXY
    + DNS_SERVER
    + r"""
seen = {}
for egress in ("::1", "127.0.0.2,::1"):
    proxy, port = start_proxy("--egress", egress)
    try:
        for name in ("gone.test", "svc.test"):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
                head = "GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (name, name)
                c.sendall(head.encode())
                seen[egress + " " + name] = c.recv(65536).decode("latin-1")
    finally:
        proxy.terminate()
        proxy.wait(10)
print(json.dumps(seen))
"""
)


@pytest.fixture
def dns_netns() -> Iterator[str]:
    with _namespace("demuxdns6", "nameserver 127.0.0.1\noptions timeout:3 attempts:1\n") as name:
        yield name


@pytest.mark.parametrize("mode", ["servfail", "silent"])
def test_a_failing_aaaa_lookup_costs_mixed_egress_nothing(
    dns_netns: str, tmp_path: Path, mode: str
) -> None:
    """IPv4 and IPv6 egress, a name whose AAAA lookup fails or never answers: its A
    answer is enough (every request failed, or waited out the lookup's timeout)."""
    seen = _probe(dns_netns, MIXED_PROBE, str(tmp_path / "state"), mode)
    for answer, seconds in seen:
        assert answer.startswith("HTTP/1.1 200 ") and answer.endswith("127.0.0.2"), answer
        assert seconds < 2, seen  # the resolution delay, 50 ms, not the lookup's 3 s


def test_an_unknown_name_is_told_apart_from_a_name_without_the_family(
    dns_netns: str, tmp_path: Path
) -> None:
    """NXDOMAIN reads as an unknown name; a name with only an A record, asked for over
    IPv6 egress, as one without an address that egress can reach."""
    seen = _probe(dns_netns, NAMES_PROBE, str(tmp_path / "state"), "nodata")
    for egress in ("::1", "127.0.0.2,::1"):
        answer = seen[f"{egress} gone.test"]
        assert answer.startswith("HTTP/1.1 502 "), answer
        assert answer.endswith("cannot resolve gone.test: no such host name\n"), answer
    answer = seen["::1 svc.test"]
    assert answer.startswith("HTTP/1.1 502 "), answer
    assert answer.endswith("svc.test has no IPv6 address that an egress address can reach\n")


# ... with an HTTPS upstream whose certificate names svc.test, asked for as the fully
# qualified "svc.test." three ways: CONNECT with SNI without the dot (curl), CONNECT with
# SNI with it (Python's ssl), and absolute-form https:// outside a tunnel.
FQDN_PROBE = (
    START_PROXY
    + DNS_SERVER
    + HTTP_SERVER
    + r"""
import os, ssl, trustme
authority = trustme.CA()
upstream_ca = sys.argv[1] + "-upstream-ca.pem"
authority.cert_pem.write_to_path(upstream_ca)
class Hello(Answer):
    def answer(self):
        return b"hello " + self.headers["Host"].encode()
upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
authority.issue_cert("svc.test").configure_cert(served)
upstream.socket = served.wrap_socket(upstream.socket, server_side=True)
serve(upstream)
name = "svc.test.:%d" % upstream.server_address[1]
proxy, port = start_proxy("--egress", "127.0.0.2", "--upstream-ca", upstream_ca)
def answer(c):
    got = b""
    while chunk := c.recv(65536):
        got += chunk
    return got.decode("latin-1")
try:
    trust = ssl.create_default_context(cafile=os.path.join(sys.argv[1], "ca.pem"))
    seen = {}
    for sni in ("svc.test", "svc.test."):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (name.encode(), name.encode()))
            c.recv(65536)
            trust.check_hostname = sni == "svc.test"  # Python itself would not match the dot
            with trust.wrap_socket(c, server_hostname=sni) as t:
                names = [v for k, v in t.getpeercert()["subjectAltName"]]
                head = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                t.sendall(head % name.encode())
                seen[sni] = [answer(t), names]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"GET https://%s/ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                  % (name.encode(), name.encode()))
        seen["absolute"] = [answer(c), []]
    print(json.dumps(seen))
finally:
    proxy.terminate()
    proxy.wait(10)
"""
)


def test_a_fully_qualified_name_is_verified_as_its_certificate_names_it(
    dns_netns: str, tmp_path: Path
) -> None:
    """RFC 6066 3: SNI carries no trailing dot, and certificates name hosts without one;
    "svc.test." is resolved and sent on (Host) as the client wrote it, and verified, in
    SNI and the upstream's certificate, as "svc.test"."""
    seen = _probe(dns_netns, FQDN_PROBE, str(tmp_path / "state"), "nodata")
    for how in ("svc.test", "svc.test.", "absolute"):
        got, names = seen[how]
        assert got.startswith("HTTP/1.1 200 "), (how, got)
        assert got.endswith("\r\n\r\nhello svc.test.:" + got.rsplit(":", 1)[1]), (how, got)
        assert names in ([], ["svc.test"]), (how, names)


# ... with a name that /etc/hosts gives both families, an upstream on both, and IPv6's
# address denied.
DENIED_FAMILY_PROBE = (
    START_PROXY
    + HTTP_SERVER
    + r"""
class Both(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
upstream = serve(Both(("::", 0), Answer))
proxy, port = start_proxy("--egress", "127.0.0.2,::1", "--deny", "::1/128")
try:
    seen = []
    for _ in range(4):
        url = "http://both.test:%d/" % upstream.server_address[1]
        seen.append(fetch(port, url, "both.test"))
    print(json.dumps(seen))
finally:
    proxy.terminate()
    proxy.wait(10)
"""
)


def test_a_family_whose_addresses_are_refused_is_not_rotated_onto(tmp_path: Path) -> None:
    """IPv4 and IPv6 egress, a name with an A and an AAAA record, the AAAA's address
    denied: the host is reachable over IPv4 only, so every request goes that way; it
    was one request in two refused with 403 (the family was chosen before the rules)."""
    hosts = "127.0.0.1 localhost\n127.0.0.1 both.test\n::1 both.test\n"
    with _namespace("demuxfam", "nameserver 127.0.0.1\n", hosts) as netns:
        seen = _probe(netns, DENIED_FAMILY_PROBE, str(tmp_path / "state"))
    for answer in seen:
        assert answer.startswith("HTTP/1.1 200 ") and answer.endswith("127.0.0.2"), seen


# ... with a name of two addresses, one of which drops SYNs (its listen queue is full):
# on port A the first address is that one, on port B the second.
SILENT_ADDRESS_PROBE = (
    START_PROXY
    + HTTP_SERVER
    + r"""
class Answered(Answer):
    def answer(self):
        return b"answered"
def silent(address, port):
    # listen(0) with its one slot taken: the kernel drops the SYNs that follow
    s = socket.socket()
    s.bind((address, port))
    s.listen(0)
    for _ in range(2):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex((address, port))
        held.append(c)
    held.append(s)
held = []
ports = []
for silent_one, answering in (("127.0.0.1", "127.0.0.7"), ("127.0.0.7", "127.0.0.1")):
    upstream = serve(http.server.ThreadingHTTPServer((answering, 0), Answered))
    silent(silent_one, upstream.server_address[1])
    ports.append(upstream.server_address[1])
time.sleep(0.2)
proxy, port = start_proxy("--egress", "127.0.0.2", "--connect-timeout", "3")
try:
    seen = []
    for upstream_port in ports:
        started = time.monotonic()
        answer = fetch(port, "http://two.test:%d/" % upstream_port, "two.test")
        seen.append([answer, time.monotonic() - started])
    print(json.dumps(seen))
finally:
    proxy.terminate()
    proxy.wait(10)
"""
)


def test_an_address_that_never_answers_leaves_time_for_the_next(tmp_path: Path) -> None:
    """A name with two addresses, the first silent: it took all of --connect-timeout,
    and the request failed with a 504 though the second address answers at once."""
    hosts = "127.0.0.1 localhost\n127.0.0.1 two.test\n127.0.0.7 two.test\n"
    with _namespace("demuxtwo", "nameserver 127.0.0.1\n", hosts) as netns:
        seen = _probe(netns, SILENT_ADDRESS_PROBE, str(tmp_path / "state"))
    for answer, seconds in seen:
        assert answer.startswith("HTTP/1.1 200 ") and answer.endswith("answered"), seen
        assert seconds < 2.5, seen  # half of the 3 s for the silent one, then the other


# ... with no route anywhere but loopback: 10.99.9.9 is ENETUNREACH from 127.0.0.2 (and
# nothing leaves: the namespace has no other link). Then a host that answers.
NO_ROUTE_PROBE = (
    START_PROXY
    + HTTP_SERVER
    + r"""
class Ok(Answer):
    def answer(self):
        return b"ok"
upstream = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok))
proxy, port = start_proxy("--egress", "127.0.0.2")
seen = []
try:
    for url in ("http://10.99.9.9/", "http://127.0.0.1:%d/" % upstream.server_address[1]):
        started = time.monotonic()
        seen.append([fetch(port, url, "x"), time.monotonic() - started])
finally:
    proxy.terminate()
    log = proxy.communicate(timeout=10)[0]
print(json.dumps({"seen": seen, "log": [json.loads(line)["message"] for line in log.splitlines()]}))
"""
)


def test_no_route_to_one_host_takes_the_address_from_no_other(tmp_path: Path) -> None:
    """ENETUNREACH rested the egress address for every host, for longer each time: a
    client naming an unroutable destination could bench addresses. It cools the
    (address, host) pair, as a connect timeout does."""
    with _namespace("demuxroute", "nameserver 127.0.0.1\n") as netns:
        probe = _probe(netns, NO_ROUTE_PROBE, str(tmp_path / "state"))
    (unroutable, _), (answered, seconds) = probe["seen"]
    assert unroutable.startswith("HTTP/1.1 502 ") and "unreachable" in unroutable, unroutable
    assert answered.startswith("HTTP/1.1 200 ") and answered.endswith("ok"), answered
    assert seconds < 0.5, probe  # not queued behind a resting address
    assert "egress address cooling" in probe["log"], probe["log"]
    assert "egress address resting" not in probe["log"], probe["log"]
