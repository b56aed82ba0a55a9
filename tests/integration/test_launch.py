"""`start` serves from a fresh interpreter without the command line's modules (launch.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import psutil
import pytest

from demux_proxy import launch
from demux_proxy.errors import ConfigError
from tests.proxy_process import EGRESS, proxy_command, requests_session, running_proxy
from tests.upstream import Upstream


def _mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split()[-1] for line in maps if "/" in line}


@pytest.mark.parametrize("workers", [1, 2])
def test_start_serves_from_a_lean_interpreter(
    tmp_path: Path, upstream: Upstream, workers: int
) -> None:
    with running_proxy(
        tmp_path, "--workers", str(workers), upstream_ca=upstream.ca_pem_path
    ) as proxy:
        pid = proxy.proc.pid  # the PID the user started: exec keeps it
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"demux_proxy.launch" in argv
        # The command line the user typed stays visible after "--".
        assert b"start" in argv[argv.index(b"--") + 1 :]
        processes = [pid, *(c.pid for c in psutil.Process(pid).children())]
        assert len(processes) == (1 if workers == 1 else 1 + workers)
        for p in processes:
            mapped = _mapped_files(p)
            # psutil's C extension: loaded by discovery in the command line, not here.
            assert not any("_psutil_linux" in path for path in mapped), p
            assert any("_rust.abi3.so" in path for path in mapped), p  # the CA is there
        with requests_session(proxy) as s:
            r = s.get(upstream.http_url("/ip"), timeout=10)
        assert r.status_code == 200
        assert r.json()["peer"] in EGRESS


def test_an_error_at_start_still_reads_as_before(tmp_path: Path) -> None:
    """Errors found after the exec (here: a CA file that is not one) keep their shape."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    done = subprocess.run(
        proxy_command(
            [
                *("start", "--listen", "127.0.0.1:0", "--egress", "127.0.0.2"),
                *("--ca-cert", str(bad), "--ca-key", str(bad)),
            ]
        ),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("demux-proxy: error: ")
    assert "Traceback" not in done.stderr


def test_launch_refuses_a_descriptor_without_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    fd = os.memfd_create("not-a-config", 0)
    os.write(fd, pickle.dumps({"listen": "x"}))
    os.lseek(fd, 0, os.SEEK_SET)
    with pytest.raises(SystemExit) as exited:
        launch.main(["launch", str(fd)])
    assert exited.value.code == 2
    assert "does not hold a demux-proxy configuration" in capsys.readouterr().err


def test_launch_reports_an_unreadable_descriptor() -> None:
    r, w = os.pipe()
    os.close(w)  # empty: EOF at once
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        launch._read_config(r)
