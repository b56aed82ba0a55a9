"""Run the real `demux-proxy start` as a subprocess for integration tests.

The proxy listens on 127.0.0.1:0; readiness is its "Starting Proxy" log line (which
carries the bound port), read from stdout: no sleeping, no fixed ports. Every later
stdout line is kept, parsed, for assertions on the JSON logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from tests.rawserver import read_head

EGRESS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


# aiohttp closes TLS connections without waiting for their shutdown; before CPython 3.12.8
# (python/cpython#118960) asyncio may then leak the raw socket under a start_tls transport
# (https:// or wss:// through a proxy, with a dumb TCP relay as much as with demux-proxy),
# a ResourceWarning in the test process on some runs (aio-libs/aiohttp#1925). aiohttp's
# remedy on those versions is enable_cleanup_closed (a DeprecationWarning on newer ones).
# Not on 3.11.2 (Debian 12's), whose _SSLProtocolTransport.abort() lacks the None check
# that later 3.11 releases have: the cleanup's own abort() raises AttributeError there.
AIOHTTP_CLEANUP_CLOSED = (3, 11, 3) <= sys.version_info < (3, 12, 8) or (
    (3, 13, 0) <= sys.version_info < (3, 13, 1)
)
STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 20.0


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[str]
    port: int
    state_dir: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw_lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    # Cleared: the test's reader stops reading the proxy's stdout (its pipe fills).
    reading: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.reading.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "ca.pem"

    def logs(self, message: str) -> list[dict[str, Any]]:
        with self._cond:
            found = [line for line in self.lines if line.get("message") == message]
        for line in found:  # whatever a test reads: fields in name order, as the original's
            names = list(line.get("fields", {}))
            assert names == sorted(names), line
        return found

    def wait_for_log(
        self, message: str, predicate: Any = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first log line with `message` (and matching `predicate`), waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.get("message") == message and (predicate is None or predicate(line)):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line {message!r} within {timeout} s")
                self._cond.wait(left)


def _reader(p: ProxyProcess, ready: threading.Event, box: dict[str, Any]) -> None:
    assert p.proc.stdout is not None
    try:
        _read_lines(p, ready, box)
    except ValueError:
        pass  # teardown closed the pipe under us: the test is over
    ready.set()


def _read_lines(p: ProxyProcess, ready: threading.Event, box: dict[str, Any]) -> None:
    assert p.proc.stdout is not None
    for raw in p.proc.stdout:
        p.reading.wait()
        raw = raw.rstrip("\n")
        with p._cond:
            p.raw_lines.append(raw)
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"message": None, "raw": raw}
            p.lines.append(line)
            p._cond.notify_all()
        if line.get("message") == "Starting Proxy" and not ready.is_set():
            box["listen"] = line["fields"]["listen"]
            ready.set()


def proxy_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "demux_proxy", *args]


def requests_session(proxy: ProxyProcess, proxy_url: str | None = None) -> requests.Session:
    """A requests Session through `proxy`, trusting its CA and nothing from the environment
    (no environment proxy, netrc or CA bundle interferes). A context manager itself."""
    s = requests.Session()
    s.trust_env = False
    url = proxy_url or proxy.url
    s.proxies = {"http": url, "https": url}
    s.verify = str(proxy.ca_path)
    return s


@contextmanager
def tls_tunnel(proxy: ProxyProcess, port: int) -> Iterator[ssl.SSLSocket]:
    """TLS through CONNECT 127.0.0.1:`port`, verified against the proxy's CA."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert read_head(raw).startswith(b"HTTP/1.1 200 ")
        ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as c:
            yield c


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL for it and its workers if it lingers."""
    if proc.poll() is not None:
        return
    workers = psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for worker in workers:  # they hold our stdout pipe: they go too
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


@contextmanager
def running_proxy(
    state_dir: Path,
    *extra: str,
    egress: Sequence[str] = EGRESS,
    upstream_ca: Path | None = None,
    allow_private: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[ProxyProcess]:
    args = ["start", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)]
    if egress:
        args += ["--egress", ",".join(egress)]
    if allow_private:
        args.append("--allow-private")
    if upstream_ca is not None:
        args += ["--upstream-ca", str(upstream_ca)]
    args += list(extra)
    proc = subprocess.Popen(
        proxy_command(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    p = ProxyProcess(proc=proc, port=0, state_dir=state_dir)
    ready = threading.Event()
    box: dict[str, Any] = {}
    reader = threading.Thread(target=_reader, args=(p, ready, box), daemon=True)
    reader.start()
    try:
        if not ready.wait(START_TIMEOUT_S) or "listen" not in box:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"proxy did not start: {err}")
        p.port = int(box["listen"].rsplit(":", 1)[1])
        yield p
    finally:
        stop(proc)
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()
