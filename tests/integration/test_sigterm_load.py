"""SIGTERM under load: downloads in flight finish byte-exact, new clients are turned away,
and the process exits 0 within the grace period."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.proxy_process import EGRESS, ProxyProcess, running_proxy
from tests.upstream import Upstream, expected_sha256

pytestmark = pytest.mark.timeout(90)

GRACE_S = 10.0
SLOW_BYTES = 1_000_000  # /slow sends it in 10 pieces...
SLOW_DELAY = 0.2  # ...0.2 s apart: ~2 s per download
DOWNLOADS = (("http", 0), ("http", 1), ("https", 0), ("https", 1))
SOCK_TIMEOUT = 10.0


@dataclass
class Download:
    scheme: str
    first_byte: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    header_sha256: str | None = None
    sha256: str | None = None
    length: int = 0
    done_at: float = 0.0
    error: BaseException | None = None


@dataclass
class Small:
    started: float
    ended: float
    outcome: str  # "served", "refused", "reset", "closed", or "bad: ..."


def _download(p: ProxyProcess, url: str, d: Download) -> None:
    try:
        with requests.Session() as s:
            s.trust_env = False
            with s.get(
                url,
                proxies={"http": p.url, "https": p.url},
                verify=str(p.ca_path),
                stream=True,
                timeout=30,
            ) as r:
                d.status = r.status_code
                d.header_sha256 = r.headers.get("X-Sha256")
                digest = hashlib.sha256()
                for chunk in r.iter_content(16 * 1024):
                    d.first_byte.set()
                    digest.update(chunk)
                    d.length += len(chunk)
                d.sha256 = digest.hexdigest()
                d.done_at = time.monotonic()
    except BaseException as exc:
        d.error = exc
    finally:
        d.first_byte.set()


def _small_request(p: ProxyProcess, upstream: Upstream) -> str:
    """One GET on a new connection: "served", or how it was turned away."""
    try:
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=SOCK_TIMEOUT)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        data = b""
        try:
            sock.sendall(
                f"GET {upstream.http_url('/ip')} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{upstream.http_port}\r\nConnection: close\r\n\r\n".encode()
            )
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            if not data:
                return "reset"
            return f"bad: reset after {data[:200]!r}"
        except TimeoutError:
            return f"bad: neither served nor closed, got {data[:200]!r}"
    if not data:
        return "closed"
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        return f"bad: {data[:200]!r}"
    try:
        if json.loads(body)["peer"] in EGRESS:
            return "served"
    except ValueError:
        pass
    return f"bad: body {body[:200]!r}"


def _stopping(p: ProxyProcess, workers: int, timeout: float = 10.0) -> float:
    """Wait until every worker said "Stopping Proxy"; the time it was seen."""
    deadline = time.monotonic() + timeout
    while len(p.logs("Stopping Proxy")) < workers:
        assert time.monotonic() < deadline, "not every worker logged 'Stopping Proxy'"
        time.sleep(0.01)
    return time.monotonic()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load(tmp_path: Path, upstream: Upstream, workers: int) -> None:
    path = f"/slow/{SLOW_BYTES}?delay={SLOW_DELAY}"
    smalls: list[Small] = []
    stop_smalls = threading.Event()

    with running_proxy(
        tmp_path / "state",
        "--shutdown-grace",
        str(GRACE_S),
        "--workers",
        str(workers),
        upstream_ca=upstream.ca_pem_path,
    ) as p:

        def small_stream() -> None:
            while not stop_smalls.is_set() and len(smalls) < 5000:
                started = time.monotonic()
                outcome = _small_request(p, upstream)
                smalls.append(Small(started, time.monotonic(), outcome))
                time.sleep(0.01)

        downloads = [Download(scheme) for scheme, _ in DOWNLOADS]
        urls = {"http": upstream.http_url(path), "https": upstream.https_url(path)}
        threads = [
            threading.Thread(target=_download, args=(p, urls[d.scheme], d), daemon=True)
            for d in downloads
        ]
        stream = threading.Thread(target=small_stream, daemon=True)
        try:
            stream.start()
            for t in threads:
                t.start()
            for d in downloads:
                assert d.first_byte.wait(15), "a download got no byte within 15 s"
                assert d.error is None, repr(d.error)
            time.sleep(0.3)  # mid-way: every download has most of its body to go

            p.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            stopped = _stopping(p, workers)
            turned_away = [_small_request(p, upstream) for _ in range(5)]

            for t in threads:
                t.join(GRACE_S + 5)
            assert not any(t.is_alive() for t in threads), "a download did not finish"
            try:
                rc = p.proc.wait(timeout=GRACE_S + 5)
            except Exception:
                raise AssertionError("the proxy did not exit") from None
            exited = time.monotonic()
        finally:
            stop_smalls.set()
            stream.join(15)
        assert p.proc.stderr is not None
        stderr = p.proc.stderr.read()

    # Every download in flight at the signal completed, byte-exact.
    for d in downloads:
        assert d.error is None, f"{d.scheme} download failed after SIGTERM: {d.error!r}"
        assert d.status == 200
        assert d.length == SLOW_BYTES
        assert d.sha256 == expected_sha256(SLOW_BYTES) == d.header_sha256
        assert d.done_at > signalled, "the download was not in flight at the signal"
    # After the signal, new connections are refused or closed without an answer.
    assert all(how in {"refused", "reset", "closed"} for how in turned_away), turned_away
    late = [s for s in smalls if s.started > stopped]
    assert all(s.outcome in {"refused", "reset", "closed"} for s in late), [s.outcome for s in late]
    # The small requests before the signal were served; none ever got a bad answer.
    before = [s for s in smalls if s.ended < signalled]
    assert before, "no small request ran before the signal"
    assert all(s.outcome == "served" for s in before), [s.outcome for s in before]
    assert not [s.outcome for s in smalls if s.outcome.startswith("bad")]
    # The process exited 0, within the grace period, without a traceback.
    assert rc == 0, stderr
    assert exited - signalled < GRACE_S, f"exit took {exited - signalled:.1f} s"
    assert "Traceback" not in stderr
    assert not p.logs("shutdown grace period over: cutting requests in flight")
