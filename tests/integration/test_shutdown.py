"""Graceful shutdown of the real proxy process: SIGTERM lets requests in flight finish,
stops taking new clients and exits 0; SIGINT does the same when idle."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import websockets.exceptions
import websockets.sync.client

from tests.proxy_process import ProxyProcess, requests_session, running_proxy
from tests.rawserver import RawServer, plain_and_tls, read_head
from tests.upstream import Upstream, expected_sha256

SLOW_BYTES = 1_000_000  # /slow sends it in 10 pieces
SLOW_DELAY = 0.2  # so ~1.8 s after the first piece
GRACE_S = 15.0


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy or CA from the environment
    return s


def _stopping_lines(p: ProxyProcess) -> int:
    return len(p.logs("Stopping Proxy"))


def _workers(p: ProxyProcess) -> int:
    return int(p.logs("Starting Proxy")[0]["fields"].get("workers", 1))


def _wait_all_stopping(p: ProxyProcess, timeout: float = 10.0) -> None:
    """Every worker (one line each, or one line without workers) said it is stopping."""
    deadline = time.monotonic() + timeout
    want = _workers(p)
    while _stopping_lines(p) < want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{_stopping_lines(p)} of {want} 'Stopping Proxy' lines")
        time.sleep(0.02)


def _not_served(p: ProxyProcess, upstream: Upstream) -> str:
    """Try a new client connection and request; how it was turned away (fails if served)."""
    try:
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        sock.settimeout(10)
        try:
            sock.sendall(
                f"GET {upstream.http_url('/ip')} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{upstream.http_port}\r\n\r\n".encode()
            )
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            raise AssertionError("new connection neither refused nor closed") from None
    assert data == b"", f"a new connection was served after the signal: {data[:200]!r}"
    return "closed"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_sigterm_lets_a_download_in_flight_finish(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    path = f"/slow/{SLOW_BYTES}?delay={SLOW_DELAY}"
    url = upstream.http_url(path) if scheme == "http" else upstream.https_url(path)
    with running_proxy(
        tmp_path / "state",
        "--shutdown-grace",
        str(GRACE_S),
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        first_bytes = threading.Event()
        box: dict[str, Any] = {}

        def download() -> None:
            try:
                with (
                    _session() as s,
                    s.get(
                        url,
                        proxies={"http": p.url, "https": p.url},
                        verify=str(p.ca_path),
                        stream=True,
                        timeout=30,
                    ) as r,
                ):
                    box["status"] = r.status_code
                    box["x_sha256"] = r.headers.get("X-Sha256")
                    digest = hashlib.sha256()
                    total = 0
                    for chunk in r.iter_content(16 * 1024):
                        first_bytes.set()
                        digest.update(chunk)
                        total += len(chunk)
                    box["sha256"] = digest.hexdigest()
                    box["length"] = total
                    box["done_at"] = time.monotonic()
            except BaseException as exc:
                box["error"] = exc
            finally:
                first_bytes.set()

        thread = threading.Thread(target=download, daemon=True)
        thread.start()
        assert first_bytes.wait(15), "no byte of the download within 15 s"
        assert "error" not in box, box.get("error")
        p.wait_for_log("outbound request", lambda line: "/slow/" in line["fields"]["url"])

        p.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _wait_all_stopping(p)
        how = _not_served(p, upstream)

        thread.join(30)
        assert not thread.is_alive(), "download did not finish"
        try:
            rc = p.proc.wait(timeout=GRACE_S + 5)
        except Exception:
            raise AssertionError("proxy did not exit after the grace period") from None
        exited = time.monotonic()
        assert p.proc.stderr is not None
        stderr = p.proc.stderr.read()

    assert "error" not in box, f"download failed after SIGTERM: {box['error']!r}"
    assert box["status"] == 200
    assert box["length"] == SLOW_BYTES
    assert box["sha256"] == expected_sha256(SLOW_BYTES) == box["x_sha256"]
    # The download really was in flight when the signal came, and the proxy waited for it.
    assert box["done_at"] > signalled + 0.5
    assert rc == 0, stderr
    assert exited - signalled < GRACE_S
    assert "Traceback" not in stderr
    assert how in {"refused", "reset", "closed"}
    assert p.logs("Proxy stopped"), "no 'Proxy stopped' line"
    assert not p.logs("shutdown grace period over: cutting requests in flight")
    response = [
        line
        for line in p.logs("inbound response")
        if "/slow/" in str(line["fields"].get("url", ""))
    ]
    assert len(response) == 1
    assert response[0]["fields"]["status_code"] == 200
    assert "error" not in response[0]["fields"]


def test_sigterm_closes_idle_keepalive_clients_and_exits_promptly(
    tmp_path: Path, upstream: Upstream
) -> None:
    with running_proxy(
        tmp_path / "state", "--shutdown-grace", "30", upstream_ca=upstream.ca_pem_path
    ) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
            sock.sendall(
                f"GET {upstream.http_url('/ip')} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{upstream.http_port}\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                more = sock.recv(65536)
                assert more, "proxy closed before answering"
                head += more
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            # The connection is now an idle keep-alive client of the proxy.
            p.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # The proxy closes the idle client instead of waiting out the grace period.
            rest = b""
            try:
                while more := sock.recv(65536):
                    rest += more
            except ConnectionResetError:
                pass
            closed_after = time.monotonic() - signalled
        rc = p.proc.wait(timeout=35)
        exited_after = time.monotonic() - signalled
    assert rc == 0
    assert closed_after < 5, f"idle client kept {closed_after:.1f} s after SIGTERM"
    assert exited_after < 5, f"proxy took {exited_after:.1f} s to exit with only idle clients"
    assert b"HTTP/" not in rest


def test_sigint_when_idle_exits_zero(tmp_path: Path) -> None:
    with running_proxy(tmp_path / "state") as p:
        p.proc.send_signal(signal.SIGINT)
        rc = p.proc.wait(timeout=10)
        assert p.proc.stderr is not None
        stderr = p.proc.stderr.read()
        p.wait_for_log("Proxy stopped", timeout=5)
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=5).close()


def test_a_download_cut_at_the_end_of_the_grace_period_is_reset_and_logged(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Past --shutdown-grace, a response in flight ends with a reset (a body cut short
    must never look complete) and its log line says so."""
    path = f"/slow/{SLOW_BYTES}?delay=1"  # ten pieces a second apart: ~9 s in all
    with running_proxy(
        tmp_path / "state", "--shutdown-grace", "1", upstream_ca=upstream.ca_pem_path
    ) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=20) as c:
            c.sendall(
                f"GET {upstream.http_url(path)} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{upstream.http_port}\r\n\r\n".encode()
            )
            got = c.recv(65536)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            p.proc.send_signal(signal.SIGTERM)
            ending = "close"
            try:
                while chunk := c.recv(65536):
                    got += chunk
            except ConnectionResetError:
                ending = "reset"
        assert ending == "reset"
        assert len(got) < SLOW_BYTES
        p.proc.wait(timeout=15)
        line = p.wait_for_log("inbound response", lambda ln: "/slow/" in ln["fields"]["url"])
    assert line["level"] == "warning"
    assert "stopping" in line["fields"]["error"]


class SilentUpstream(RawServer):
    """Reads the request and never answers: the proxy waits for a head until it stops."""

    def _respond(self, sock: socket.socket, raw: socket.socket) -> None:
        if read_head(sock):
            sock.settimeout(20)
            sock.recv(1)  # until the proxy lets go


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_request_still_unanswered_at_the_end_of_the_grace_period_gets_a_503(
    tmp_path: Path, upstream: Upstream, scheme: str
) -> None:
    """Nothing of the answer went yet, so nothing can look complete: the client is told
    why (503, Connection: close, then a clean close) instead of getting a reset."""
    with (
        plain_and_tls(SilentUpstream, upstream.ca) as servers,
        running_proxy(
            tmp_path / "state", "--shutdown-grace", "1", upstream_ca=upstream.ca_pem_path
        ) as p,
        contextlib.ExitStack() as stack,
    ):
        raw = stack.enter_context(socket.create_connection(("127.0.0.1", p.port), timeout=20))
        authority = f"127.0.0.1:{servers[scheme].port}"
        if scheme == "http":
            c, target = raw, f"http://{authority}/silent"
        else:
            raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            assert read_head(raw).startswith(b"HTTP/1.1 200 ")
            ctx = ssl.create_default_context(cafile=str(p.ca_path))
            c = stack.enter_context(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
            target = "/silent"
        c.sendall(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        p.wait_for_log("outbound request", lambda ln: "/silent" in ln["fields"]["url"])
        p.proc.send_signal(signal.SIGTERM)
        got = b""
        while chunk := c.recv(65536):  # a reset raises here
            got += chunk
        assert p.proc.wait(timeout=15) == 0
        line = p.wait_for_log("inbound response", lambda ln: "/silent" in ln["fields"]["url"])
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), got[:300]
    assert b"\r\nconnection: close" in head.lower(), head
    assert body == b"the proxy is stopping\n", body
    assert line["fields"]["status_code"] == 503, line
    assert line["level"] == "warning", line
    assert line["fields"]["error"] == "cut short: the proxy is stopping", line


def test_a_websocket_cut_at_the_end_of_the_grace_period_is_logged_as_cut(
    tmp_path: Path, upstream: Upstream
) -> None:
    """An upgraded connection never ends by itself: past --shutdown-grace it is cut, and
    its line says so (the compiled build once logged it as a clean 101 at info)."""
    with running_proxy(tmp_path / "state", "--shutdown-grace", "1", "--workers", "1") as p:
        url = upstream.http_url("/ws?cut").replace("http://", "ws://", 1)
        with websockets.sync.client.connect(url, proxy=p.url, open_timeout=10) as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            p.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                ws.recv(timeout=15)
        assert p.proc.wait(timeout=15) == 0
        line = p.wait_for_log("inbound response", lambda ln: "/ws?cut" in ln["fields"]["url"])
    assert line["fields"]["status_code"] == 101
    assert line["level"] == "warning", line
    assert line["fields"]["error"] == "cut short: the proxy is stopping", line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_log_reader_that_stops_reading_blocks_neither_traffic_nor_sigterm(
    tmp_path: Path, upstream: Upstream, workers: str
) -> None:
    """stdout a pipe nobody reads (`start | less`, a stalled journald): past about 120
    requests every client timed out, and SIGTERM did not stop the proxy."""
    with running_proxy(tmp_path / "state", "--workers", workers) as p:
        p.reading.clear()
        with requests_session(p) as s:
            for i in range(400):  # about 280 KB of log lines: the pipe holds 64 KiB
                r = s.get(upstream.http_url(f"/ip?n={i}"), timeout=5)
                assert r.status_code == 200, (i, r.text)
        p.proc.send_signal(signal.SIGTERM)
        rc = p.proc.wait(timeout=15)  # the log's last lines get EXIT_WAIT_S, then it goes
        p.reading.set()
    assert rc == 0
