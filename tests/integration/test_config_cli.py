"""`--config FILE` and `demux-proxy config` as users run them: `python -m demux_proxy ...`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.proxy_process import proxy_command, running_proxy
from tests.upstream import Upstream


def _env(**extra: str) -> dict[str, str]:
    """The current environment without any DEMUX_PROXY_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMUX_PROXY_")}
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            proxy_command(args),
            capture_output=True,
            text=True,
            timeout=30,
            env=env if env is not None else _env(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`{' '.join(args)}` still running after 30 s") from None


def _config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`demux-proxy config --json ...` -> its `options` object."""
    out = _run("config", "--json", *args, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    document = json.loads(out.stdout)
    options: dict[str, Any] = document["options"]
    return options


def _write(tmp_path: Path, text: str, name: str = "demux.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- precedence

FILE = 'listen = "127.0.0.1:1111"\nworkers = 3\nlog_level = "warning"\n'

# key: (default, file, env, flag) values as `config --json` reports them
PRECEDENCE = {
    "listen": ("127.0.0.1:8080", "127.0.0.1:1111", "127.0.0.1:2222", "127.0.0.1:3333"),
    "workers": (os.cpu_count() or 1, 3, 5, 7),
    "log_level": ("info", "warning", "error", "debug"),
}


@pytest.mark.parametrize("key", list(PRECEDENCE))
def test_precedence_flag_env_file_default(tmp_path: Path, key: str) -> None:
    default, in_file, in_env, on_flag = PRECEDENCE[key]
    path = _write(tmp_path, FILE)
    var = "DEMUX_PROXY_" + key.upper()
    flag = "--" + key.replace("_", "-")

    assert _config()[key] == {"value": default, "source": "default"}
    assert _config("--config", str(path))[key] == {"value": in_file, "source": "file"}
    env = _env(**{var: str(in_env)})
    with_env = _config("--config", str(path), env=env)[key]
    assert with_env == {"value": in_env, "source": "env", "envvar": var}
    with_flag = _config("--config", str(path), flag, str(on_flag), env=env)[key]
    assert with_flag == {"value": on_flag, "source": "flag"}


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, FILE)
    out = _run("config", "--json", env=_env(DEMUX_PROXY_CONFIG=str(path)))
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    assert document["config_file"] == str(path)
    assert document["options"]["workers"] == {"value": 3, "source": "file"}


def test_config_text_output_lists_every_start_option_with_its_source(tmp_path: Path) -> None:
    path = _write(tmp_path, FILE + 'egress = ["10.0.0.5", "10.0.0.6"]\nallow_private = true\n')
    out = _run(
        "config", "--config", str(path), "--workers", "2", env=_env(DEMUX_PROXY_LOG_FORMAT="text")
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"# demux-proxy start: config file {path}"
    rows = {}
    for line in lines[1:]:
        setting, _, source = line.rpartition("  # ")
        rows[setting.strip()] = source
    assert rows['listen = "127.0.0.1:1111"'] == "file"
    assert rows['egress = ["10.0.0.5", "10.0.0.6"]'] == "file"
    assert rows["allow_private = true"] == "file"
    assert rows["workers = 2"] == "flag"
    assert rows['log_format = "text"'] == "env DEMUX_PROXY_LOG_FORMAT"
    assert rows["max_connections = 10000"] == "default"
    assert rows["# ca_cert = (not set)"] == "default"
    # Every option of `start` is there, each once.
    help_text = _run("start", "--help").stdout
    keys = {setting.lstrip("# ").split(" = ")[0] for setting in rows}
    for key in keys:
        assert "--" + key.replace("_", "-") in help_text
    assert len(keys) == len(rows)
    for option in ("listen", "egress", "egress_interface", "auth", "state_dir", "workers"):
        assert option in keys


def test_config_output_is_a_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, FILE + 'auth = ["alice:pw"]\n')
    first = _run("config", "--config", str(path))
    assert first.returncode == 0, first.stderr
    masked = '# auth = ["alice:****"]  (passwords masked: write them in)'
    assert masked in first.stdout
    again = _write(tmp_path, first.stdout.replace(masked, 'auth = ["alice:pw"]'), "again.toml")
    second = _run("config", "--config", str(again))
    assert second.returncode == 0, second.stderr
    settings = [line.split("  #")[0].rstrip() for line in first.stdout.splitlines()[1:]]
    settings_again = [line.split("  #")[0].rstrip() for line in second.stdout.splitlines()[1:]]
    assert settings_again == settings


def test_max_connections_option(tmp_path: Path) -> None:
    assert _config()["max_connections"] == {"value": 10000, "source": "default"}
    path = _write(tmp_path, "max_connections = 50\n")
    assert _config("--config", str(path))["max_connections"] == {"value": 50, "source": "file"}
    out = _run("start", "--max-connections", "0")
    assert out.returncode == 2
    assert "--max-connections" in out.stderr


# --------------------------------------------------------------------------- secrets


def test_auth_passwords_are_masked(tmp_path: Path) -> None:
    path = _write(tmp_path, 'auth = ["alice:file-secret", "bob:pa:ss"]\n')
    out = _run("config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert '# auth = ["alice:****", "bob:****"]  (passwords masked' in out.stdout
    assert "file-secret" not in out.stdout
    assert "pa:ss" not in out.stdout

    env = _env(DEMUX_PROXY_AUTH="carol:env-secret")
    assert _config("--config", str(path), env=env)["auth"] == {
        "value": ["carol:****"],
        "source": "env",
        "envvar": "DEMUX_PROXY_AUTH",
    }
    # A password may hold a space; several credentials go one per line.
    spaced = _env(DEMUX_PROXY_AUTH="erin:correct horse\nfrank:battery staple")
    assert _config(env=spaced)["auth"]["value"] == ["erin:****", "frank:****"]
    flag = _run("config", "--json", "--auth", "dave:flag-secret", env=env)
    assert flag.returncode == 0, flag.stderr
    assert json.loads(flag.stdout)["options"]["auth"]["value"] == ["dave:****"]
    assert "secret" not in flag.stdout


def test_saved_as_is_the_output_never_logs_in_with_a_masked_password(tmp_path: Path) -> None:
    """The masked line is a comment: "alice:****" was taken as alice's real password."""
    out = _run("config", "--auth", "alice:s3cret")
    assert "auth line is commented out" in out.stderr  # said, not only in the file
    saved = _write(tmp_path, out.stdout, "saved.toml")
    assert _config("--config", str(saved))["auth"]["value"] == []


def test_printed_paths_are_absolute(tmp_path: Path) -> None:
    """A config file reads relative paths relative to itself: "state" printed from
    another directory named another state dir, and another CA, once saved."""
    out = subprocess.run(
        proxy_command(["config", "--json", "--state-dir", "./state"]),
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env=_env(), check=True,
    )  # fmt: skip
    shown = json.loads(out.stdout)["options"]["state_dir"]["value"]
    assert shown == str(tmp_path / "state")


@pytest.mark.parametrize("value", ["nan", "inf", "-nan"])
def test_a_timeout_that_is_not_a_finite_number_is_refused(value: str) -> None:
    """--connect-timeout nan started, then every request failed with an internal error."""
    for command in ("config", "start"):
        out = _run(command, "--connect-timeout", value)
        assert out.returncode == 2, out.stdout
        assert "not a finite number" in out.stderr and "Traceback" not in out.stderr
    out = _run("start", env=_env(DEMUX_PROXY_SHUTDOWN_GRACE="inf"))
    assert out.returncode == 2 and "not a finite number" in out.stderr


def test_one_value_for_a_repeatable_key_is_a_list_of_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "ban_status = 403\negress = '127.0.0.2'\n")
    options = _config("--config", str(path))
    assert options["ban_status"] == {"value": [403], "source": "file"}
    assert options["egress"] == {"value": ["127.0.0.2"], "source": "file"}


# --------------------------------------------------------------------------- refusals


def _assert_refused(out: subprocess.CompletedProcess[str], *mentions: str) -> str:
    assert out.returncode == 2, f"exit {out.returncode}; stderr={out.stderr!r}"
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one error line, got: {out.stderr!r}"
    line = lines[0]
    assert line.startswith("demux-proxy: error: "), line
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"
    assert "Starting Proxy" not in out.stdout, "it started"
    return line


REFUSED = [
    pytest.param(
        "rate_limit = ['api.example.com=1/s']\n", ["unknown key 'rate_limit'"], id="unknown"
    ),
    pytest.param("workers = '4'\n", ["key 'workers'", "expected an integer"], id="type"),
    pytest.param("workers = 0\n", ["key 'workers'", "0 is not in the range"], id="range"),
    pytest.param("listen = 'nope'\n", ["key 'listen'", "'nope'"], id="listen"),
    pytest.param("allow_private = 'yes'\n", ["key 'allow_private'", "boolean"], id="flag"),
    pytest.param("egress = ['10.0.0.x']\n", ["key 'egress'", "'10.0.0.x'"], id="egress"),
    pytest.param("log_level = 'loud'\n", ["key 'log_level'", "'loud'"], id="choice"),
    pytest.param("auth = ['alice']\n", ["key 'auth'", "USER:PASS"], id="auth"),
    pytest.param("workers = 2\nlisten = \n", ["not valid TOML", "line 2"], id="syntax"),
]


@pytest.mark.parametrize(("text", "mentions"), REFUSED)
@pytest.mark.parametrize("command", ["start", "config"])
def test_refused_at_start(tmp_path: Path, command: str, text: str, mentions: list[str]) -> None:
    path = _write(tmp_path, text)
    args = [command, "--config", str(path), "--state-dir", str(tmp_path / "state")]
    _assert_refused(_run(*args), str(path), *mentions)
    assert not (tmp_path / "state").exists()


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, "workerz = 2\n")
    line = _assert_refused(_run("start", "--config", str(path)), str(path), "'workerz'")
    assert "did you mean 'workers'?" in line
    assert "(known: admin, allow_client, allow_dest, allow_private, auth, auth_file, " in line


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    _assert_refused(_run("start", "--config", str(missing)), str(missing), "No such file")
    env = _env(DEMUX_PROXY_CONFIG=str(missing))
    _assert_refused(_run("config", env=env), str(missing), "No such file")


def test_other_commands_take_the_file_and_use_what_applies(tmp_path: Path) -> None:
    path = _write(tmp_path, 'egress = ["127.0.0.7"]\nworkers = 2\nstate_dir = "state"\n')
    out = _run("addresses", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert [line.split() for line in out.stdout.splitlines()] == [["127.0.0.7", "lo"]]
    ca = _run("ca", "path", "--config", str(path))
    assert ca.returncode == 0, ca.stderr
    assert ca.stdout == f"{tmp_path / 'state' / 'ca.pem'}\n"  # relative to the file
    bad = _write(tmp_path, "workers = 0\n", "bad.toml")
    _assert_refused(_run("addresses", "--config", str(bad)), str(bad), "key 'workers'")


def test_ca_path_and_export_name_the_ca_start_signs_with(tmp_path: Path) -> None:
    """With ca_cert in the file, `ca path` and `ca export` give that CA, not the
    generated one `start` would not use."""
    generated = _run("ca", "path", "--state-dir", str(tmp_path / "gen"))
    assert generated.returncode == 0, generated.stderr
    own = tmp_path / "own-ca.pem"
    own.write_bytes(Path(generated.stdout.strip()).read_bytes())
    path = _write(tmp_path, f'ca_cert = "own-ca.pem"\nstate_dir = "{tmp_path / "other"}"\n')
    out = _run("ca", "path", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{own}\n"
    exported = _run("ca", "export", "--config", str(path))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.encode() == own.read_bytes()
    assert not (tmp_path / "other").exists()  # no CA generated on the side
    own.write_text("not a certificate\n")
    _assert_refused(_run("ca", "export", "--config", str(path)), str(own), "cannot parse")


def test_flag_and_env_values_are_checked_by_config() -> None:
    _assert_refused(_run("config", "--listen", "nope"), "--listen", "'nope'")
    env = _env(DEMUX_PROXY_EGRESS="10.0.0.x")
    _assert_refused(_run("config", env=env), "DEMUX_PROXY_EGRESS", "'10.0.0.x'")


def test_host_rate_and_admin_are_checked_by_config_and_start(tmp_path: Path) -> None:
    """Refused with the file and key named, by `config` and by `start` alike (before
    `start` serves), not only once the serving process meets them."""
    for text, key, reason in (
        ('host_rate = ["bad=1"]\n', "key 'host_rate'", "bad rate"),
        ('host_rate = ["a.test=1/s", "a.test=2/s"]\n', "key 'host_rate'", "given twice"),
        ('admin = "nope"\n', "key 'admin'", "'nope'"),
    ):
        path = _write(tmp_path, text)
        for command in ("config", "start"):
            _assert_refused(_run(command, "--config", str(path)), str(path), key, reason)
    _assert_refused(_run("config", "--host-rate", "bad"), "--host-rate", "'bad'")
    _assert_refused(_run("config", "--admin", "nope"), "--admin", "'nope'")


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        pytest.param(
            ["--listen", "0.0.0.0:0"], ["refusing to listen on 0.0.0.0", "--auth"], id="open"
        ),
        pytest.param(
            ["--admin", "0.0.0.0:0"], ["--admin 0.0.0.0:0 is not loopback"], id="admin-open"
        ),
        pytest.param(
            ["--ca-cert", "/x/ca.pem"], ["--ca-cert and --ca-key go together"], id="half-ca"
        ),
    ],
)
def test_settings_start_refuses_together_are_refused_by_config(
    tmp_path: Path, args: list[str], mentions: list[str]
) -> None:
    """Each value is fine alone, `start` refuses them together: `config` says so too, in
    the same words, rather than print a configuration that will not start."""
    state = ["--state-dir", str(tmp_path / "state"), "--egress", "127.0.0.2"]
    words = [_assert_refused(_run(c, *args, *state), *mentions) for c in ("config", "start")]
    assert words[0] == words[1]
    # With credentials, the same settings are a configuration `config` prints.
    if "--ca-cert" not in args:
        assert _config(*args, *state, "--auth", "u:p")["listen"]["source"] in ("flag", "default")


# --------------------------------------------------------------------------- start uses it


def test_start_runs_with_the_file(tmp_path: Path, upstream: Upstream) -> None:
    state = tmp_path / "state"
    path = _write(
        tmp_path,
        'listen = "127.0.0.1:0"\n'
        'egress = ["127.0.0.9"]\n'
        "allow_private = true\n"
        f"state_dir = {json.dumps(str(state))}\n"
        "workers = 1\n",
    )
    # running_proxy also passes --listen 127.0.0.1:0 and --state-dir: the same values as
    # the file's; egress, allow_private and workers come from the file alone.
    with running_proxy(
        state, "--config", str(path), egress=(), allow_private=False, env=_env()
    ) as p:
        fields = p.logs("Starting Proxy")[0]["fields"]
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(upstream.http_url("/ip"), proxies={"http": p.url}, timeout=30)
    assert fields["egress"] == ["127.0.0.9"]
    assert fields["workers"] == 1
    assert r.status_code == 200, r.text  # a loopback upstream: allow_private came from the file
    assert r.json()["peer"] == "127.0.0.9"


def test_the_shipped_deploy_config_is_valid() -> None:
    """deploy/config.toml, which the systemd unit points at, passes every check."""
    shipped = Path(__file__).parents[2] / "deploy" / "config.toml"
    out = subprocess.run(
        proxy_command(["config", "--config", str(shipped), "--json"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    options = json.loads(out.stdout)["options"]
    assert options["admin"]["value"] == "127.0.0.1:9090"
    assert options["admin"]["source"] == "file"


def test_the_default_workers_follow_the_cores_the_proxy_may_use() -> None:
    """Under taskset -c 0 the default was still every core of the host."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    out = subprocess.run(
        ["taskset", "-c", "0", *proxy_command(["config", "--json"])],
        capture_output=True, text=True, timeout=30, env=_env(), check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["options"]["workers"] == {"value": 1, "source": "default"}
