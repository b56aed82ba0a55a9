"""`start` serves from a fresh interpreter without the command line's modules (launch.py)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from demux_proxy import launch
from demux_proxy.errors import ConfigError
from tests.proxy_process import EGRESS, proxy_command, requests_session, running_proxy, stop
from tests.upstream import Upstream

MODULE_ARG = launch.MODULE.encode()


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


def test_auth_passwords_are_masked_in_the_command_line_ps_shows(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Every local user may read /proc/PID/cmdline: `--auth u:p@ss` stood there."""
    assert launch.masked(["x", "--auth", "a:1", "--auth=b:2", "--auth-file", "f"]) == [
        "x", "--auth", "***", "--auth=***", "--auth-file", "f"
    ]  # fmt: skip
    with running_proxy(
        tmp_path, "--auth", "u:s3cret-1", "--auth=v:s3cret-2", upstream_ca=upstream.ca_pem_path
    ) as proxy:
        with open(f"/proc/{proxy.proc.pid}/cmdline", "rb") as f:
            argv = f.read()
        assert b"s3cret" not in argv and b"--auth\0***" in argv, argv
        with requests_session(proxy, f"http://v:s3cret-2@127.0.0.1:{proxy.port}") as s:
            assert s.get(upstream.http_url("/ip"), timeout=10).status_code == 200


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


def _start(state_dir: Path, *extra: str) -> list[str]:
    return proxy_command(
        [
            *("start", "--listen", "127.0.0.1:0", "--egress", "127.0.0.2", "--allow-private"),
            *("--state-dir", str(state_dir), *extra),
        ]
    )


def _wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.002)


@contextlib.contextmanager
def _stopping(proc: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        stop(proc)


def _started(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The "Starting Proxy" line (the first one on stdout), or an assertion that says why not."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"exited with {proc.wait(timeout=10)} before serving"
    started = json.loads(line)
    assert started["message"] == "Starting Proxy", started
    return started


def test_a_closed_stdout_is_refused_in_one_line(tmp_path: Path) -> None:
    """`>&-`: the log would have nowhere to go, and the next socket would take fd 1."""
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *_start(tmp_path / "state")],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "demux-proxy: error: stdout is closed, and the log goes there "
        "(send it to a file, or to /dev/null to drop it)\n"
    )
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_a_closed_stdin_and_stderr_are_given_dev_null(tmp_path: Path, upstream: Upstream) -> None:
    """No client socket may take descriptor 0 or 2 (a stray write would reach it)."""
    with (
        subprocess.Popen(
            ["sh", "-c", 'exec "$@" <&- 2>&-', "sh", *_start(tmp_path / "state")],
            stdout=subprocess.PIPE,
            text=True,
        ) as proc,
        _stopping(proc),
    ):
        port = int(_started(proc)["fields"]["listen"].rsplit(":", 1)[1])
        for fd in (0, 2):
            assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == os.devnull
        r = requests.get(
            upstream.http_url("/ip"),
            proxies={"http": f"http://127.0.0.1:{port}"},
            timeout=10,
        )
        assert (r.status_code, r.json()["peer"]) == (200, "127.0.0.2")
    assert proc.returncode == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_during_start_up_does_not_end_it(tmp_path: Path, workers: int) -> None:
    """SIGHUP's default is to end a process: until the proxy's own handler is in place
    (re-discovery), it is ignored. Sent here right after the exec into the fresh
    interpreter, which has the serving code still to import."""
    with (
        subprocess.Popen(
            _start(tmp_path / "state", "--workers", str(workers)),
            stdout=subprocess.PIPE,
            text=True,
        ) as proc,
        _stopping(proc),
    ):

        def execed() -> bool:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                return MODULE_ARG in f.read()

        _wait_until(execed, "exec into demux_proxy.launch")
        proc.send_signal(signal.SIGHUP)
        _started(proc)
        assert proc.poll() is None
    assert proc.returncode == 0


@pytest.mark.parametrize("started", [1, 2, 3])
def test_sigterm_while_workers_start_stops_them_all(tmp_path: Path, started: int) -> None:
    """A stop asked for while workers are still being started is a stop: no worker is
    started after it, those started end, and the supervisor exits 0 without serving.
    (Sent as a worker is being forked, it once ran the supervisor's handler in there,
    with a traceback: signals stay blocked across the fork.)"""
    with (
        subprocess.Popen(
            _start(tmp_path / "state", "--workers", "4"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc,
        _stopping(proc),
    ):
        _wait_until(
            lambda: len(psutil.Process(proc.pid).children()) >= started, f"{started} workers"
        )
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    messages = [json.loads(line)["message"] for line in out.splitlines()]
    assert "Starting Proxy" not in messages
    assert messages[-1] == "stopped during start-up", messages
