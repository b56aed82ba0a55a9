"""The command line as users run it: `python -m demux_proxy ...` in a subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509

from demux_proxy import __version__
from tests.cas import rsa_ca, write_ca
from tests.proxy_process import ProxyProcess, proxy_command, running_proxy, stop
from tests.upstream import Upstream

START_OPTIONS = [
    "--listen",
    "--egress",
    "--egress-interface",
    "--allow-private",
    "--upstream-ca",
    "--insecure-upstream",
    "--state-dir",
    "--ca-cert",
    "--ca-key",
    "--log-level",
    "--log-format",
]


def _env(**extra: str) -> dict[str, str]:
    """The current environment without any DEMUX_PROXY_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMUX_PROXY_")}
    env.update(extra)
    return env


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, stdout: Any = None
) -> subprocess.CompletedProcess[str]:
    """`stdout`: where the command's stdout goes instead of a pipe the result captures."""
    try:
        return subprocess.run(
            proxy_command(args),
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env=env if env is not None else _env(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`{' '.join(args)}` still running after {timeout} s") from None


# --------------------------------------------------------------------------- help, version


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)
    assert out.stdout.strip() == f"demux-proxy, version {__version__}"


@pytest.mark.parametrize(
    "command",
    [[], ["start"], ["ca"], ["ca", "export"], ["ca", "path"], ["addresses"]],
    ids=lambda c: " ".join(c) or "main",
)
def test_help_of_every_command(command: list[str]) -> None:
    out = _run(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    # Usage line of this very command (the program name is "python -m demux_proxy" here).
    usage = out.stdout.splitlines()[0]
    assert re.fullmatch(rf"Usage: \S.*?{re.escape(' '.join(['', *command]))} \[OPTIONS\].*", usage)
    assert "Options:" in out.stdout


def test_start_help_mentions_every_option() -> None:
    out = _run("start", "--help")
    assert out.returncode == 0, out.stderr
    mentioned = set(re.findall(r"--[a-z][a-z-]*", out.stdout))
    missing = [opt for opt in START_OPTIONS if opt not in mentioned]
    assert not missing, f"start --help does not mention {missing}"


# --------------------------------------------------------------------------- ca


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_path_creates_the_ca_with_private_permissions(tmp_path: Path) -> None:
    d = tmp_path / "state"
    out = _run("ca", "path", "--state-dir", str(d))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{d / 'ca.pem'}\n"
    assert _mode(d) == 0o700
    assert _mode(d / "ca-key.pem") == 0o600
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True


def test_ca_export_prints_the_cert_file_and_is_stable(tmp_path: Path) -> None:
    d = tmp_path / "state"
    first = _run("ca", "export", "--state-dir", str(d))
    assert first.returncode == 0, first.stderr
    pem = (d / "ca.pem").read_text()
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    assert first.stdout == pem
    key = (d / "ca-key.pem").read_bytes()

    second = _run("ca", "export", "--state-dir", str(d))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert (d / "ca-key.pem").read_bytes() == key  # not regenerated

    path = _run("ca", "path", "--state-dir", str(d))
    assert path.returncode == 0, path.stderr
    assert Path(path.stdout.strip()).read_text() == pem


def test_ca_state_dir_from_environment(tmp_path: Path) -> None:
    d = tmp_path / "from-env"
    out = _run("ca", "path", env=_env(DEMUX_PROXY_STATE_DIR=str(d)))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{d / 'ca.pem'}\n"
    assert (d / "ca.pem").is_file()
    assert (d / "ca-key.pem").is_file()
    export = _run("ca", "export", env=_env(DEMUX_PROXY_STATE_DIR=str(d)))
    assert export.stdout == (d / "ca.pem").read_text()


def test_ca_default_state_dir_is_under_xdg_data_home(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    home = tmp_path / "home"  # should XDG_DATA_HOME be ignored, stay out of the real home
    home.mkdir()
    out = _run("ca", "path", env=_env(XDG_DATA_HOME=str(xdg), HOME=str(home)))
    assert out.returncode == 0, out.stderr
    expected = xdg / "demux-proxy" / "ca.pem"
    assert out.stdout == f"{expected}\n"
    assert expected.is_file()
    assert _mode(xdg / "demux-proxy") == 0o700
    assert not any(home.iterdir())


def test_a_relative_xdg_data_home_is_ignored(tmp_path: Path) -> None:
    """The XDG spec: relative paths in $XDG_DATA_HOME are invalid. Not read from the
    directory the command happens to run in: ~/.local/share instead."""
    home = tmp_path / "home"
    home.mkdir()
    out = subprocess.run(
        proxy_command(["ca", "path"]),
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(XDG_DATA_HOME="relative/xdg", HOME=str(home)),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{home / '.local' / 'share' / 'demux-proxy' / 'ca.pem'}\n"
    assert not (tmp_path / "relative").exists()


# --------------------------------------------------------------------------- addresses


def test_addresses_lists_given_egress_with_interface() -> None:
    out = _run("addresses", "--egress", "127.0.0.7,127.0.0.8")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert rows == [["127.0.0.7", "lo"], ["127.0.0.8", "lo"]]


def test_an_egress_address_nothing_leaves_from_is_exit_2() -> None:
    for command in ("addresses", "start"):
        out = _run(command, "--egress", "127.0.0.2,0.0.0.0")
        assert out.returncode == 2, (command, out.returncode, out.stderr)
        assert "cannot use egress address 0.0.0.0: the unspecified address" in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "option", ["--egress", "--egress-interface", "--deny", "--allow-dest", "--allow-client"]
)
def test_a_list_option_given_empty_is_exit_2(option: str) -> None:
    """`--allow-dest "$UNSET"` allowed every destination, `--egress ''` meant discovery:
    an option given with nothing in it is refused, naming it, before anything starts."""
    for command in ("start", "config"):
        out = _run(command, option, " , ")
        assert out.returncode == 2, (command, out.returncode, out.stdout, out.stderr)
        assert f"Invalid value for '{option}': empty" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("DEMUX_PROXY_LISTEN", "bad:x", "--listen wants HOST:PORT"),
        ("DEMUX_PROXY_EGRESS", "127.0.0.2,10.0.0.300", "not an IP address: '10.0.0.300'"),
        ("DEMUX_PROXY_EGRESS_INTERFACE", "nosuchif0", "no such interface: 'nosuchif0'"),
        # Found by the serving process, after the exec: the Config carries the sources.
        ("DEMUX_PROXY_UPSTREAM_CA", "/nonexistent/ca.pem", "cannot load --upstream-ca"),
    ],
)
def test_an_error_at_start_names_the_variable_that_set_the_option(
    tmp_path: Path, variable: str, value: str, said: str
) -> None:
    """A systemd unit or a container sets options in the environment: the error said
    what was wrong but not where it was set (click's own errors do)."""
    args = ["start", "--state-dir", str(tmp_path / "state")]
    if variable != "DEMUX_PROXY_LISTEN":
        args += ["--listen", "127.0.0.1:0"]
    if variable != "DEMUX_PROXY_EGRESS" and variable != "DEMUX_PROXY_EGRESS_INTERFACE":
        args += ["--egress", "127.0.0.2"]
    out = _run(*args, env=_env(**{variable: value}))
    assert out.returncode in (2, 75), (out.returncode, out.stderr)  # 75: it may appear yet
    (line,) = out.stderr.strip().splitlines()
    assert said in line and line.endswith(f"(env var: '{variable}')"), line
    # The same mistake on the command line says nothing of the environment.
    option = "--" + variable.removeprefix("DEMUX_PROXY_").lower().replace("_", "-")
    out = _run(*args, option, value, env=_env())
    assert out.returncode in (2, 75) and "env var" not in out.stderr, out.stderr


def test_addresses_of_an_interface() -> None:
    out = _run("addresses", "--egress-interface", "lo")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert ["127.0.0.1", "lo"] in rows
    assert all(row[1] == "lo" for row in rows), rows


# --------------------------------------------------------------------------- start errors


def _assert_one_line_error(out: subprocess.CompletedProcess[str], *mentions: str) -> str:
    assert out.returncode != 0, f"exit 0; stdout={out.stdout!r} stderr={out.stderr!r}"
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one error line, got: {out.stderr!r}"
    line = lines[0]
    assert "error" in line.lower(), line
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"
    assert not any(m == "Starting Proxy" for m in _messages(out.stdout)), "it started"
    return line


def _messages(stdout: str) -> list[Any]:
    messages = []
    for raw in stdout.splitlines():
        try:
            messages.append(json.loads(raw).get("message"))
        except ValueError:
            messages.append(raw)
    return messages


def _start(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(
        "start", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--allow-private", *args
    )


def test_start_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run(
            "start",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "state"),
            "--egress",
            "127.0.0.2",
        )
    _assert_one_line_error(out, str(port))


def test_start_egress_address_not_on_this_host(tmp_path: Path) -> None:
    addr = "192.0.2.77"  # TEST-NET-1: nobody's address
    with socket.socket() as probe:
        try:
            probe.bind((addr, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"{addr} is bindable on this host")
    out = _start(tmp_path / "state", "--egress", addr)
    _assert_one_line_error(out, addr)


def test_start_garbage_ca(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a PEM file\n")
    out = _start(
        tmp_path / "state",
        "--egress",
        "127.0.0.2",
        "--ca-cert",
        str(garbage),
        "--ca-key",
        str(garbage),
    )
    _assert_one_line_error(out, "garbage.pem")


def test_start_ca_cert_without_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = _run("ca", "path", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    out = _start(tmp_path / "other", "--egress", "127.0.0.2", "--ca-cert", str(state / "ca.pem"))
    _assert_one_line_error(out, "--ca-key")


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "127.0.0.1:"])
def test_start_bad_listen(tmp_path: Path, listen: str) -> None:
    out = _run(
        "start",
        "--listen",
        listen,
        "--state-dir",
        str(tmp_path / "state"),
        "--egress",
        "127.0.0.2",
    )
    _assert_one_line_error(out, "--listen")


def test_start_missing_upstream_ca(tmp_path: Path) -> None:
    missing = tmp_path / "missing-upstream-ca.pem"
    out = _start(tmp_path / "state", "--egress", "127.0.0.2", "--upstream-ca", str(missing))
    _assert_one_line_error(out, "missing-upstream-ca.pem")


# --------------------------------------------------------------------------- environment


def test_egress_from_environment(tmp_path: Path, upstream: Upstream) -> None:
    with running_proxy(
        tmp_path / "state",
        egress=(),
        upstream_ca=upstream.ca_pem_path,
        env={"DEMUX_PROXY_EGRESS": "127.0.0.6"},
    ) as p:
        line = p.logs("Starting Proxy")[0]
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(upstream.http_url("/ip"), proxies={"http": p.url}, timeout=30)
            assert r.status_code == 200, r.text
            peer = r.json()["peer"]
    assert line["fields"]["egress"] == ["127.0.0.6"]
    assert peer == "127.0.0.6"


@contextmanager
def _started(args: list[str], env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Run `start` as given (no --listen added) until its 'Starting Proxy' line."""
    proc = subprocess.Popen(
        proxy_command(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while True:
            try:
                raw = lines.get(timeout=20)
            except queue.Empty:
                raise AssertionError("no 'Starting Proxy' line within 20 s") from None
            if raw is None:
                proc.wait(10)
                assert proc.stderr is not None
                raise AssertionError(f"proxy exited {proc.returncode}: {proc.stderr.read()}")
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("message") == "Starting Proxy":
                break
        yield line
    finally:
        stop(proc)
        reader.join(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_listen_from_environment(tmp_path: Path, upstream: Upstream) -> None:
    args = ["start", "--state-dir", str(tmp_path / "state"), "--egress", "127.0.0.3"]
    args += ["--allow-private"]
    env = _env(DEMUX_PROXY_LISTEN="127.0.0.1:0")
    with _started(args, env) as line:
        listen = line["fields"]["listen"]
        host, _, port_text = listen.rpartition(":")
        port = int(port_text)
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(
                upstream.http_url("/ip"), proxies={"http": f"http://127.0.0.1:{port}"}, timeout=30
            )
            assert r.status_code == 200, r.text
            peer = r.json()["peer"]
    assert host == "127.0.0.1"
    assert port not in (0, 8080)  # an ephemeral port: the variable was used, not the default
    assert peer == "127.0.0.3"


# --------------------------------------------------------------------------- log shape


def test_starting_proxy_line_shape(proxy: ProxyProcess) -> None:
    starting = [raw for raw in proxy.raw_lines if '"Starting Proxy"' in raw]
    assert len(starting) == 1, starting
    line = json.loads(starting[0])
    assert list(line) == ["fields", "level", "timestamp", "message"]
    assert line["message"] == "Starting Proxy"
    assert line["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", line["timestamp"])
    fields = line["fields"]
    assert isinstance(fields, dict)
    assert fields["listen"] == f"127.0.0.1:{proxy.port}"
    assert fields["egress"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert fields["ca"] == str(proxy.ca_path)
    assert fields["version"] == __version__


def test_ca_path_refuses_a_ca_cert_that_is_not_there(tmp_path: Path) -> None:
    """It printed the path with status 0 while `ca export` and `start` refuse it."""
    for command in (["ca", "path"], ["ca", "export"]):
        out = _run(*command, "--ca-cert", str(tmp_path / "missing.pem"))
        assert out.returncode == 2, (command, out.stdout)
        assert "missing.pem" in out.stderr and "Traceback" not in out.stderr


def test_an_ipv6_listen_address_is_logged_bracketed(tmp_path: Path) -> None:
    """ "::1:8080" could not be split back; a URL needs "[::1]:8080". And --rediscover
    with named --egress does nothing: said once, at start."""
    with running_proxy(tmp_path / "s", "--listen", "[::1]:0", "--rediscover", "5") as p:
        listen = p.wait_for_log("Starting Proxy")["fields"]["listen"]
        assert listen.startswith("[::1]:") and int(listen.rsplit(":", 1)[1]) > 0
        p.wait_for_log("--rediscover does nothing: the egress addresses are named with --egress")


@pytest.mark.parametrize(
    "args",
    [["start", "--workers", "0"], ["start", "--bogus"], ["ca", "nope"], ["start", "--listen"]],
)
def test_a_usage_error_is_one_line_with_status_2(args: list[str]) -> None:
    """As the README says of errors at start; click wrote usage, hint and error in three."""
    out = _run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demux-proxy: error: "), out.stderr
    assert f" {args[0]} --help)" in lines[0]  # the help of the command that was used


# --------------------------------------------------------------------------- a failing stdout

DEV_FULL = Path("/dev/full")

# Every command that answers on stdout, with what it needs to get as far as writing.
STDOUT_COMMANDS = [
    ["--help"],
    ["--version"],
    ["config"],
    ["config", "--json"],
    ["config", "--help"],
    ["addresses", "--egress", "127.0.0.7"],
    ["ca", "export", "--state-dir", "{state}"],
    ["ca", "path", "--state-dir", "{state}"],
    # Whatever the verdict on the address (/ip is no checkip answer), the table is printed.
    ["check", "--url", "{url}", "--egress", "127.0.0.2", "--timeout", "5"],
]


def _stdout_run(
    command: list[str], tmp_path: Path, upstream: Upstream, stdout: Any
) -> subprocess.CompletedProcess[str]:
    url = upstream.http_url("/ip")
    return _run(*(a.format(state=tmp_path / "state", url=url) for a in command), stdout=stdout)


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full to stand for a full disk")
@pytest.mark.parametrize("command", STDOUT_COMMANDS, ids=" ".join)
def test_a_full_stdout_is_one_line_on_stderr_and_status_1(
    command: list[str], tmp_path: Path, upstream: Upstream
) -> None:
    """Writing to a full disk (ENOSPC) printed a traceback, and another one from the
    interpreter's flush at exit: now one line naming the error, exit 1 as for EPIPE."""
    with DEV_FULL.open("w") as full:
        out = _stdout_run(command, tmp_path, upstream, full)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    last = out.stderr.splitlines()[-1]  # check says its progress on stderr first
    assert last == (
        "demux-proxy: error: cannot write to standard output: No space left on device"
    ), out.stderr


@pytest.mark.parametrize("command", STDOUT_COMMANDS, ids=" ".join)
def test_a_stdout_reader_gone_is_status_1_and_silent(
    command: list[str], tmp_path: Path, upstream: Upstream
) -> None:
    """EPIPE (`demux-proxy config | head -0`) stays as click has it: nothing said, exit 1."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = _stdout_run(command, tmp_path, upstream, write_end)
    finally:
        os.close(write_end)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "standard output" not in out.stderr, out.stderr


def test_what_the_host_may_yet_provide_is_status_75_not_2(tmp_path: Path) -> None:
    """An interface or address not there yet (at boot, before the cloud's agent added
    them) may come: EX_TEMPFAIL, which the systemd unit retries, where it does not
    retry a 2 (a wrong option stays wrong)."""
    missing = _run("start", "--egress-interface", "nosuchif0", "--state-dir", str(tmp_path))
    assert missing.returncode == 75, missing.stderr
    assert missing.stderr == "demux-proxy: error: no such interface: 'nosuchif0'\n"
    wrong = _run("start", "--egress", "not-an-address", "--state-dir", str(tmp_path))
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.startswith("demux-proxy: error: "), wrong.stderr


def test_a_bad_value_names_the_env_var_only_when_it_came_from_there() -> None:
    """click said "Invalid value for '--workers' (env var: 'DEMUX_PROXY_WORKERS')" for a
    value given with the flag."""
    flag = _run("start", "--workers", "abc")
    assert flag.returncode == 2
    assert "Invalid value for '--workers': 'abc'" in flag.stderr, flag.stderr
    assert "env var" not in flag.stderr
    env = _run("start", env=_env(DEMUX_PROXY_WORKERS="abc"))
    assert env.returncode == 2
    assert "'--workers' (env var: 'DEMUX_PROXY_WORKERS'): 'abc'" in env.stderr, env.stderr


def test_a_ca_that_ends_is_said_at_start_and_refuses_connect_then(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Once the CA ended, a CONNECT was answered 200 and then the client's handshake
    failed on an expired leaf, with nothing said. Now: a warning at start within 30
    days of the end, and after it a 503 before the 200 that says why; plain http goes on."""
    cert_path, key_path = write_ca(tmp_path, *rsa_ca(timedelta(seconds=6), with_ski=True))
    ends = x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc
    args = ("--ca-cert", str(cert_path), "--ca-key", str(key_path))
    with running_proxy(tmp_path / "state", *args) as p:
        warned = p.wait_for_log("CA certificate expires soon: HTTPS will be refused then")
        assert warned["fields"]["days_left"] == 0 and warned["fields"]["ca"] == str(cert_path)
        time.sleep(max(0.0, (ends - datetime.now(UTC)).total_seconds()) + 1.1)
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
            target = f"127.0.0.1:{upstream.https_port}"
            c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            answer = c.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert f"CA certificate expired on {ends:%Y-%m-%d}".encode() in answer, answer
        proxies = {"http": p.url}
        assert requests.get(upstream.http_url("/ip"), proxies=proxies, timeout=10).ok
