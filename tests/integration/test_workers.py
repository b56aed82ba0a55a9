"""--workers N: one port, N processes, one global rotation, a supervisor that restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.proxy_process import EGRESS, proxy_command, running_proxy
from tests.upstream import Upstream


def _peer(proxy_url: str, upstream: Upstream) -> str:
    """One request on a NEW client connection: the source address the upstream saw."""
    with requests.Session() as s:
        r = s.get(upstream.http_url("/ip"), proxies={"http": proxy_url}, timeout=10)
        r.raise_for_status()
        return str(r.json()["peer"])


def test_rotation_is_global_across_workers(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(tmp_path / "state", "--workers", "2", upstream_ca=upstream.ca_pem_path) as p:
        assert p.wait_for_log("Starting Proxy")["fields"]["workers"] == 2
        peers = [_peer(p.url, upstream) for _ in range(16)]
        start = EGRESS.index(peers[0])
        assert peers == [EGRESS[(start + i) % 4] for i in range(16)]
        ids = [line["fields"]["session_id"] for line in p.logs("inbound response")]
        deadline = time.monotonic() + 10
        while len(ids) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
            ids = [line["fields"]["session_id"] for line in p.logs("inbound response")]
        assert len(set(ids)) == 16  # unique across workers
        # SO_REUSEPORT spread 16 new connections over both workers (odd ids: worker 0).
        assert {i % 2 for i in ids} == {0, 1}


def test_a_killed_worker_is_replaced(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(tmp_path / "state", "--workers", "2", upstream_ca=upstream.ca_pem_path) as p:
        for _ in range(8):  # both workers number some requests
            assert _peer(p.url, upstream) in EGRESS
        time.sleep(0.3)  # their lines written (a SIGKILL loses the last 50 ms of them)
        children = psutil.Process(p.proc.pid).children()
        assert len(children) == 2
        os.kill(children[0].pid, signal.SIGKILL)
        p.wait_for_log("worker died: restarting it")
        deadline = time.monotonic() + 20
        while len(psutil.Process(p.proc.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(psutil.Process(p.proc.pid).children()) == 2
        for _ in range(8):  # whichever worker takes it, every request is served
            assert _peer(p.url, upstream) in EGRESS
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=20) == 0
        # The replacement numbers its requests past its forerunner's: still unique.
        ids = [ln["fields"]["session_id"] for ln in p.logs("inbound response")]
        assert len(ids) == 16 and len(set(ids)) == 16, sorted(ids)


@pytest.mark.parametrize("serving", ["exec", "in-process"])
def test_workers_that_keep_dying_end_the_proxy_with_a_failure(tmp_path: Path, serving: str) -> None:
    """Past the restart limit the supervisor gives up: exit status 1, not 0, so that
    systemd's Restart=on-failure (deploy/demux-proxy.service) brings the proxy back; one
    line on stderr also where `start` serves in its own process (no memfd to exec with)."""
    env = None
    if serving == "in-process":
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import os\ndel os.memfd_create\n")
        env = {
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(site)]))
        }
    with running_proxy(tmp_path / "state", "--workers", "2", env=env) as p:
        deadline = time.monotonic() + 60
        while not p.logs("workers keep dying: stopping"):
            assert time.monotonic() < deadline, "never gave up"
            children = psutil.Process(p.proc.pid).children()
            with contextlib.suppress(psutil.NoSuchProcess):
                if children:
                    children[0].kill()
            time.sleep(0.3)
        assert p.proc.wait(timeout=20) == 1
        assert len(p.logs("worker died: restarting it")) == 5
        stderr = p.proc.stderr.read() if p.proc.stderr else ""
        assert "workers kept dying" in stderr and "Traceback" not in stderr, stderr


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(tmp_path / "state", "--workers", "2", upstream_ca=upstream.ca_pem_path) as p:
        children = psutil.Process(p.proc.pid).children()
        assert len(children) == 2
        p.proc.kill()  # no chance to forward anything
        p.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"orphaned workers: {[c.pid for c in alive]}"


def _idle_gauge(base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(base + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "demux_upstream_connections_idle"
    )


def test_a_dead_workers_gauges_leave_the_metrics(tmp_path: Path, upstream: Upstream) -> None:
    """Live gauges are summed over the workers alive now: a worker killed with idle
    upstream connections in its pool must not leave them counted for good."""
    with running_proxy(
        tmp_path / "state",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        base = "http://" + p.wait_for_log("Starting Proxy")["fields"]["admin"]
        for _ in range(8):  # new connections each: both workers pool some
            assert _peer(p.url, upstream) in EGRESS
        deadline = time.monotonic() + 15  # the gauges are published every 1-2 s
        while _idle_gauge(base) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _idle_gauge(base) > 0
        for old in psutil.Process(p.proc.pid).children():
            os.kill(old.pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pids = {c.pid for c in psutil.Process(p.proc.pid).children()}
                if len(pids) == 2 and old.pid not in pids:
                    break
                time.sleep(0.05)
        time.sleep(3)  # the new workers publish theirs: nothing pooled yet
        assert _idle_gauge(base) == 0


def test_a_host_rate_holds_per_address_across_workers(tmp_path: Path, upstream: Upstream) -> None:
    """--host-rate 1/min with two workers: each address sends one request, not one per
    worker, however the clients spread; the rest wait their turn (here: a 503 once
    --queue-timeout is over)."""
    with running_proxy(
        tmp_path / "state",
        "--workers",
        "2",
        "--host-rate",
        "127.0.0.1=1/min",
        "--queue-timeout",
        "2",
        upstream_ca=upstream.ca_pem_path,
    ) as p:
        results: list[int] = []
        lock = threading.Lock()

        def one() -> None:
            with requests.Session() as s:
                s.trust_env = False
                r = s.get(upstream.http_url("/ip"), proxies={"http": p.url}, timeout=30)
                with lock:
                    results.append(r.status_code)

        threads = [threading.Thread(target=one) for _ in range(3 * len(EGRESS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Both workers served some (SO_REUSEPORT spreads new connections)...
        deadline = time.monotonic() + 5
        while len(p.logs("inbound response")) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        ids = {line["fields"]["session_id"] % 2 for line in p.logs("inbound response")}
        sent = [line["fields"]["interface"] for line in p.logs("outbound request")]
    assert ids == {0, 1}
    # ...yet every address sent at most one request in the minute.
    assert sorted(sent) == sorted(set(sent)), sent
    assert results.count(200) == len(set(sent)) <= len(EGRESS)
    assert results.count(503) == len(threads) - results.count(200)


@pytest.mark.parametrize("first, second", [("1", "1"), ("2", "2"), ("1", "2"), ("2", "1")])
def test_a_second_proxy_on_a_port_in_use_is_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    """SO_REUSEPORT let a second instance (same user) join the port and take part of the
    clients, with its own options; it must fail as the README says: one line, status 75
    (the port may be free later: a service manager retries that one, not a status 2)."""
    with running_proxy(tmp_path / "a", "--workers", first) as p:
        out = subprocess.run(
            proxy_command(
                ["start", "--listen", f"127.0.0.1:{p.port}", "--egress", "127.0.0.3",
                 "--allow-private", "--state-dir", str(tmp_path / "b"), "--workers", second]
            ),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 75, out.stdout[-500:] + out.stderr
        assert "address already in use" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_admin_port_in_use_is_named_as_the_admin_port(tmp_path: Path, workers: str) -> None:
    """Which of the two listen addresses is taken: one line naming --admin, either way."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            proxy_command(
                ["start", "--listen", "127.0.0.1:0", "--egress", "127.0.0.3", "--allow-private",
                 "--state-dir", str(tmp_path), "--workers", workers,
                 "--admin", f"127.0.0.1:{port}"]
            ),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert out.returncode == 75, out.stdout[-500:] + out.stderr
    assert out.stderr == (
        f"demux-proxy: error: cannot listen on --admin 127.0.0.1:{port}: "
        "address already in use (is another proxy running?)\n"
    )
