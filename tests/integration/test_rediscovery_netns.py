"""Egress re-discovery end to end: addresses added to and removed from a live interface.

Everything runs inside one throw-away network namespace: a veth pair eg0/eg0p (this kernel
may lack the dummy link type; both ends up so psutil counts eg0 as up), the egress
addresses on eg0, an upstream HTTP server on eg0p's 10.77.0.254 that answers the source
address it sees, the proxy (discovering its egress on eg0) and the curl clients. Nothing
leaves the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.netns import add_namespace_or_skip, ip, ns_ip, ns_sh

pytestmark = pytest.mark.netns

SRC = Path(__file__).resolve().parents[2] / "src"
UPSTREAM = "10.77.0.254"
UPSTREAM_PORT = 18099
URL = f"http://{UPSTREAM}:{UPSTREAM_PORT}/"
WAIT_S = 10.0

# Answers every request with the peer address it sees; one connection per request.
UPSTREAM_CODE = r"""
import http.server, sys, time

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(2)
        body = (self.client_address[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
server.daemon_threads = True
print("READY", flush=True)
server.serve_forever(poll_interval=0.05)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    for name in list(env):
        # The tests choose every proxy option themselves, and curl must not bypass --proxy.
        if name.startswith("DEMUX_PROXY_") or name.lower().endswith("_proxy"):
            del env[name]
    return env


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Lines:
    """A process's stdout lines, collected by a thread; waits on them are bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stream = proc.stdout
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._cond:
                self.raw.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            raw = list(self.raw)
        for line in raw:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = WAIT_S, start: int = 0
    ) -> dict[str, Any]:
        """The first JSON line after the first `start` ones that matches, within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for doc in self.events()[start:]:
                if match(doc):
                    return doc
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._thread.is_alive():
                raise AssertionError(
                    "no matching log line within "
                    f"{timeout} s; output so far:\n" + "\n".join(self.raw[-40:])
                )
            with self._cond:
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        self._thread.join(10)
        self._stream.close()


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    name = f"demuxre-{secrets.token_hex(4)}"
    add_namespace_or_skip(name)
    upstream: subprocess.Popen[str] | None = None
    lines: Lines | None = None
    try:
        ns_ip(name, "link", "set", "lo", "up")
        ns_ip(name, "link", "add", "eg0", "type", "veth", "peer", "name", "eg0p")
        # Deleting the primary address of a subnet deletes its secondaries too, unless
        # they are promoted: the test removes 10.77.0.2 and wants 10.77.0.3/.4 to stay.
        ns_sh(
            name,
            "for c in all default eg0; do "
            "echo 1 > /proc/sys/net/ipv4/conf/$c/promote_secondaries; done",
        )
        for cidr in ("10.77.0.2/24", "10.77.0.3/24"):
            ns_ip(name, "addr", "add", cidr, "dev", "eg0")
        ns_ip(name, "addr", "add", f"{UPSTREAM}/24", "dev", "eg0p")
        for link in ("eg0", "eg0p"):
            ns_ip(name, "link", "set", link, "up")
        upstream = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-c",
                UPSTREAM_CODE,
                UPSTREAM,
                str(UPSTREAM_PORT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        lines = Lines(upstream)
        deadline = time.monotonic() + 20
        while "READY" not in lines.raw:
            if upstream.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"upstream did not start: {lines.raw}")
            time.sleep(0.05)
        yield name
    finally:
        if upstream is not None:
            _stop(upstream)
        if lines is not None:
            lines.close()
        ip("netns", "delete", name)


class Proxy:
    def __init__(self, ns: str, state_dir: Path, *extra: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "demux_proxy",
                "start",
                "--listen",
                "127.0.0.1:0",
                "--egress-interface",
                "eg0",
                "--allow-private",
                "--workers",
                "1",
                "--state-dir",
                str(state_dir),
                "--shutdown-grace",
                "2",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        self.lines = Lines(self.proc)
        self.started = self.lines.wait_for(lambda d: d.get("message") == "Starting Proxy", 30)
        self.port = int(self.started["fields"]["listen"].rsplit(":", 1)[1])

    def get(self, *headers: str, path: str = "/") -> str:
        """One request through the proxy; the source address the upstream saw."""
        args = []
        for header in headers:
            args += ["-H", header]
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "10",
                "--proxy",
                f"http://127.0.0.1:{self.port}",
                *args,
                URL.rstrip("/") + path,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(),
            check=False,
        )
        assert proc.returncode == 0, (proc.stderr, self.lines.raw[-20:])
        return proc.stdout.strip()

    def changed(self, start: int, **expect: list[str]) -> dict[str, Any]:
        def match(doc: dict[str, Any]) -> bool:
            if doc.get("message") != "egress addresses changed":
                return False
            return all(doc["fields"].get(k) == v for k, v in expect.items())

        return self.lines.wait_for(match, WAIT_S, start)

    def close(self) -> None:
        _stop(self.proc)
        self.lines.close()


def test_rediscovery_adds_and_removes_addresses(netns: str, tmp_path: Path) -> None:
    proxy = Proxy(netns, tmp_path, "--rediscover", "1")
    try:
        assert proxy.started["fields"]["egress"] == ["10.77.0.2", "10.77.0.3"]

        seen = [proxy.get() for _ in range(4)]
        assert set(seen) == {"10.77.0.2", "10.77.0.3"}, seen

        session = "X-Demux-Session: s1"
        sticky = {proxy.get(session) for _ in range(4)}
        assert len(sticky) == 1, sticky
        (a,) = sticky
        assert a in {"10.77.0.2", "10.77.0.3"}

        # Added: picked up by the periodic re-discovery. s1 stays on A (rendezvous
        # hashing: for "s1" the new address does not outweigh A).
        mark = len(proxy.lines.events())
        ns_ip(netns, "addr", "add", "10.77.0.4/24", "dev", "eg0")
        proxy.changed(mark, added=["10.77.0.4"], removed=[])
        seen = [proxy.get() for _ in range(6)]
        assert set(seen) == {"10.77.0.2", "10.77.0.3", "10.77.0.4"}, seen
        assert {proxy.get(session) for _ in range(3)} == {a}

        # Removed: never used again; s1 moves (only because its address went away) and
        # sticks to its new address.
        mark = len(proxy.lines.events())
        ns_ip(netns, "addr", "del", f"{a}/24", "dev", "eg0")
        proxy.changed(mark, added=[], removed=[a])
        remaining = {"10.77.0.2", "10.77.0.3", "10.77.0.4"} - {a}
        seen = [proxy.get() for _ in range(6)]
        assert set(seen) == remaining, seen
        moved = {proxy.get(session) for _ in range(4)}
        assert len(moved) == 1, moved
        assert moved <= remaining
    finally:
        proxy.close()
    assert proxy.proc.returncode == 0, proxy.lines.raw[-20:]


def _proxy_pid(proc: subprocess.Popen[str]) -> int:
    """`ip netns exec` execs the command, so its pid is normally the proxy's own."""
    candidates = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for candidate in candidates:
        if "demux_proxy" in " ".join(candidate.cmdline()):
            return candidate.pid
    raise AssertionError(f"no demux_proxy process under pid {proc.pid}")


def _status_rows(proxy: Proxy) -> dict[str, dict[str, Any]]:
    """/status.json's rows by address, fetched from inside the namespace."""
    admin = proxy.started["fields"]["admin"]
    got = subprocess.run(
        ["ip", "netns", "exec", proxy.ns, "curl", "-sS", "--max-time", "10",
         f"http://{admin}/status.json"],
        capture_output=True, text=True, timeout=30, env=_env(), check=True,
    )  # fmt: skip
    return {row["address"]: row for row in json.loads(got.stdout)["addresses"]}


def test_sighup_rediscovers(netns: str, tmp_path: Path) -> None:
    proxy = Proxy(netns, tmp_path, "--admin", "127.0.0.1:0")
    try:
        before = proxy.started["fields"]["egress"]
        assert before, proxy.started
        assert "10.77.0.5" not in before

        mark = len(proxy.lines.events())
        ns_ip(netns, "addr", "add", "10.77.0.5/24", "dev", "eg0")
        # Without --rediscover nothing changes by itself.
        seen = {proxy.get() for _ in range(len(before) + 1)}
        assert "10.77.0.5" not in seen
        assert not any(
            d.get("message") == "egress addresses changed" for d in proxy.lines.events()[mark:]
        )

        os.kill(_proxy_pid(proxy.proc), signal.SIGHUP)
        proxy.changed(mark, added=["10.77.0.5"], removed=[])
        seen = {proxy.get() for _ in range(len(before) + 1)}
        assert "10.77.0.5" in seen, seen
        assert proxy.get("X-Demux-Egress: 10.77.0.5") == "10.77.0.5"
        assert proxy.proc.poll() is None  # SIGHUP did not kill it
        # /status shows the addresses there are now, the new one with its requests.
        rows = _status_rows(proxy)
        assert set(rows) == {*before, "10.77.0.5"}, rows
        assert rows["10.77.0.5"]["requests"] >= 2, rows["10.77.0.5"]
    finally:
        proxy.close()
    assert proxy.proc.returncode == 0, proxy.lines.raw[-20:]


@contextmanager
def _link(netns: str, name: str, cidr: str) -> Iterator[None]:
    """A veth pair NAME/NAMEp in the namespace, both up, `cidr` on NAME; gone after."""
    ns_ip(netns, "link", "add", name, "type", "veth", "peer", "name", name + "p")
    try:
        ns_ip(netns, "addr", "add", cidr, "dev", name)
        for link in (name, name + "p"):
            ns_ip(netns, "link", "set", link, "up")
        yield
    finally:
        ip("-n", netns, "link", "del", name)


def test_an_address_removed_mid_request_ends_that_request_cleanly(
    netns: str, tmp_path: Path
) -> None:
    """Its in-flight count was gone with it: the request's end raised KeyError (an
    internal error, no "inbound response" line, the client connection reset). The
    address is on eg2, which loses its carrier: re-discovery drops it, the socket lives."""
    with _link(netns, "eg2", "10.77.0.6/32"):
        proxy = Proxy(netns, tmp_path, "--egress-interface", "eg2")
        try:
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(proxy.get, "X-Demux-Egress: 10.77.0.6", path="/slow")
                proxy.lines.wait_for(lambda d: d.get("message") == "outbound request")
                mark = len(proxy.lines.events())
                ns_ip(netns, "link", "set", "eg2p", "down")
                os.kill(_proxy_pid(proxy.proc), signal.SIGHUP)
                proxy.changed(mark, added=[], removed=["10.77.0.6"])
                assert slow.result(30) == "10.77.0.6"
            done = proxy.lines.wait_for(lambda d: d.get("message") == "inbound response")
            assert done["fields"]["status_code"] == 200, done
            assert "error" not in done["fields"], done
            assert proxy.get() != "10.77.0.6"
        finally:
            proxy.close()
    assert not [d for d in proxy.lines.events() if d.get("level") == "error"]
    assert proxy.proc.returncode == 0, proxy.lines.raw[-20:]


def test_a_named_interface_going_down_drops_only_its_addresses(netns: str, tmp_path: Path) -> None:
    """Re-discovery used to give up on every interface when one named interface was
    down: the new address on eg0 was never taken, the dead one on eg1 kept."""
    with _link(netns, "eg1", "10.78.0.2/24"):
        proxy = Proxy(netns, tmp_path, "--egress-interface", "eg1")
        try:
            assert "10.78.0.2" in proxy.started["fields"]["egress"]
            mark = len(proxy.lines.events())
            ns_ip(netns, "link", "set", "eg1p", "down")  # eg1 loses its carrier
            ns_ip(netns, "addr", "add", "10.77.0.7/24", "dev", "eg0")
            os.kill(_proxy_pid(proxy.proc), signal.SIGHUP)
            proxy.changed(mark, added=["10.77.0.7"], removed=["10.78.0.2"])
            warned = proxy.lines.wait_for(
                lambda d: d.get("message", "").startswith("egress interfaces down"), start=mark
            )
            assert warned["fields"]["down"] == ["eg1"]
            assert proxy.get("X-Demux-Egress: 10.77.0.7") == "10.77.0.7"
        finally:
            proxy.close()


def test_a_restarted_worker_knows_the_addresses_found_since_start(
    netns: str, tmp_path: Path
) -> None:
    """A worker restarted after a SIGKILL started from the start-time list: rotation
    skewed, and a pin to an address found later failed on that worker alone."""
    proxy = Proxy(netns, tmp_path, "--workers", "2")
    try:
        supervisor = psutil.Process(_proxy_pid(proxy.proc))
        mark = len(proxy.lines.events())
        ns_ip(netns, "addr", "add", "10.77.0.8/24", "dev", "eg0")
        supervisor.send_signal(signal.SIGHUP)  # forwarded to both workers
        first = proxy.changed(mark, added=["10.77.0.8"], removed=[])
        proxy.changed(proxy.lines.events().index(first) + 1, added=["10.77.0.8"], removed=[])
        victim = supervisor.children()[0]
        mark = len(proxy.lines.events())
        victim.kill()
        proxy.lines.wait_for(lambda d: d.get("message") == "worker died: restarting it", start=mark)
        proxy.changed(mark, added=["10.77.0.8"], removed=[])  # the new worker's own look
        # Each curl is a new connection: SO_REUSEPORT spreads them over both workers.
        pinned = {proxy.get("X-Demux-Egress: 10.77.0.8") for _ in range(8)}
        assert pinned == {"10.77.0.8"}
    finally:
        proxy.close()
