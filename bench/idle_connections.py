#!/usr/bin/env python3
"""Hold N idle client connections on a running demux-proxy and report what each costs.

    python bench/idle_connections.py --count 10000            # starts its own proxy
    python bench/idle_connections.py --count 10000 --workers 2

Measures the proxy's RSS and open file descriptors (psutil, the whole process tree)
before, with all N connections accepted and idle, and after they are closed; prints
KiB per connection. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time

import psutil


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def measure(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) summed over the proxy's processes."""
    procs = _tree(pid)
    return sum(p.memory_info().rss for p in procs), sum(p.num_fds() for p in procs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.count + 100:
        print(f"RLIMIT_NOFILE hard limit {hard} is below {a.count}", file=sys.stderr)
        return 2
    state = tempfile.mkdtemp(prefix="demux-idle-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "demux_proxy", "start", "--listen", "127.0.0.1:0",
         "--egress", "127.0.0.2", "--state-dir", state, "--workers", str(a.workers)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        entry = json.loads(line)
        if entry["message"] == "Starting Proxy":
            port = int(entry["fields"]["listen"].rsplit(":", 1)[1])
            break
    try:
        time.sleep(1.0)  # let start-up allocations settle before the baseline
        rss0, fds0 = measure(proc.pid)
        socks = []
        for _ in range(a.count):
            s = socket.create_connection(("127.0.0.1", port), timeout=a.timeout)
            socks.append(s)
        deadline = time.monotonic() + a.timeout
        while True:
            rss1, fds1 = measure(proc.pid)
            if fds1 - fds0 >= a.count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        held = fds1 - fds0
        for s in socks:
            s.close()
        deadline = time.monotonic() + a.timeout
        while True:
            rss2, fds2 = measure(proc.pid)
            if fds2 <= fds0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        result = {
            "connections": a.count,
            "held": held,
            "workers": a.workers,
            "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_held_mb": round(rss1 / 2**20, 1),
            "rss_after_mb": round(rss2 / 2**20, 1),
            "kib_per_connection": round((rss1 - rss0) / 1024 / max(held, 1), 2),
            "fds_before": fds0,
            "fds_after": fds2,
        }
        print(json.dumps(result))
        return 0 if held >= a.count and fds2 <= fds0 else 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
