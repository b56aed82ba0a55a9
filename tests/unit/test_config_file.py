"""The --config file: TOML -> checked values -> click default_map, and every refusal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from demux_proxy import cli, config_file
from demux_proxy.config import parse_listen
from demux_proxy.errors import ConfigError


def _load_into_defaults(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
    if path is None:
        return
    known = config_file.known_options(ctx.command.params)
    try:
        values = config_file.load(path, known, ctx, {"listen": parse_listen})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    ctx.default_map = config_file.default_map(values, ctx.command.params)


@click.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path),
    envvar="TOY_CONFIG",
    is_eager=True,
    expose_value=False,
    callback=_load_into_defaults,
)
@click.option("--listen", default="127.0.0.1:8080", envvar="TOY_LISTEN")
@click.option("--egress", multiple=True, envvar="TOY_EGRESS")
@click.option("--egress-interface", "egress_interfaces", multiple=True)
@click.option("--allow-private", is_flag=True, envvar="TOY_ALLOW_PRIVATE")
@click.option("--workers", type=click.IntRange(min=1, max=256), default=4, envvar="TOY_WORKERS")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--log-level", type=click.Choice(["debug", "info"], case_sensitive=False))
def toy(**values: Any) -> None:
    ctx = click.get_current_context()
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        assert source is not None
        click.echo(f"{name}={value!r} {source.name}")


def _ctx() -> click.Context:
    return click.Context(toy)


def _known() -> dict[str, click.Option]:
    return config_file.known_options(toy.params)


def _write(tmp_path: Path, text: str, name: str = "demux.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _convert(path: Path, **data: Any) -> dict[str, Any]:
    return config_file.convert(path, data, _known(), _ctx(), {"listen": parse_listen})


# --------------------------------------------------------------------------- keys


def test_keys_are_long_option_names_with_underscores() -> None:
    assert list(_known()) == [
        "listen",
        "egress",
        "egress_interface",  # the option's name, not its parameter's (egress_interfaces)
        "allow_private",
        "workers",
        "timeout",
        "state_dir",
        "log_level",
    ]
    assert "config" not in _known()  # expose_value=False: not a value of the command


def test_start_keys_are_derived_from_its_options() -> None:
    known = cli._file_options()
    long_names = {
        opt[2:].replace("-", "_")
        for param in cli.start.params
        if isinstance(param, click.Option) and param.expose_value
        for opt in param.opts
        if opt.startswith("--")
    }
    assert set(known) == long_names
    for key in ("listen", "egress", "egress_interface", "allow_private", "auth", "workers"):
        assert key in known
    assert "max_connections" in known
    assert "config" not in known
    assert "host_rate" in known
    assert "host_rates" not in known


# --------------------------------------------------------------------------- read


def test_read_a_table(tmp_path: Path) -> None:
    path = _write(tmp_path, 'listen = "127.0.0.1:1"\negress = ["10.0.0.5"]\n')
    assert config_file.read(path) == {"listen": "127.0.0.1:1", "egress": ["10.0.0.5"]}


def test_read_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        config_file.read(path)


def test_read_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{tmp_path}: cannot read: Is a directory"):
        config_file.read(tmp_path)


def test_read_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'listen = "127.0.0.1:1"\nworkers = \n')
    with pytest.raises(ConfigError) as caught:
        config_file.read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 2" in message


def test_read_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'listen = "\xff"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid UTF-8"):
        config_file.read(path)


# --------------------------------------------------------------------------- convert


def test_convert_values(tmp_path: Path) -> None:
    path = tmp_path / "demux.toml"
    values = _convert(
        path,
        listen="127.0.0.1:9",
        egress=["10.0.0.5", "10.0.0.6"],
        allow_private=True,
        workers=2,
        timeout=3,
        log_level="INFO",
    )
    assert values == {
        "listen": "127.0.0.1:9",
        "egress": ("10.0.0.5", "10.0.0.6"),
        "allow_private": True,
        "workers": 2,
        "timeout": 3.0,
        "log_level": "INFO",  # click's Choice normalises it when it resolves the option
    }
    assert isinstance(values["timeout"], float)


def test_a_string_is_one_element_of_a_multiple_option(tmp_path: Path) -> None:
    values = _convert(tmp_path / "f.toml", egress="10.0.0.5,10.0.0.6", egress_interface=[])
    assert values == {"egress": ("10.0.0.5,10.0.0.6",), "egress_interface": ()}


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "demux.toml"
    assert _convert(path, state_dir="state") == {"state_dir": str(tmp_path / "etc" / "state")}
    assert _convert(path, state_dir="/var/lib/x") == {"state_dir": "/var/lib/x"}
    home = _convert(path, state_dir="~/x")["state_dir"]
    assert home == str(Path("~/x").expanduser())


def test_unknown_key_names_file_key_and_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "demux.toml"
    with pytest.raises(ConfigError) as caught:
        _convert(path, listen="127.0.0.1:1", rate_limit=["api.example.com=1/s"])
    message = str(caught.value)
    assert message.startswith(f"{path}: unknown key 'rate_limit'")
    assert "(known: allow_private, egress, egress_interface, listen, log_level, " in message
    assert "\n" not in message


def test_unknown_key_suggests_a_close_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'egress-interface', did you mean "):
        _convert(tmp_path / "f.toml", **{"egress-interface": ["eth1"]})


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("workers", "4", "expected an integer, got a string"),
        ("workers", 4.0, "expected an integer, got a float"),
        ("workers", True, "expected an integer, got a boolean"),
        ("workers", 0, "0 is not in the range 1<=x<=256"),
        ("timeout", "5", "expected a number, got a string"),
        ("timeout", 0.01, "0.01 is not in the range x>=0.1"),
        ("timeout", float("inf"), "expected a finite number"),
        ("allow_private", "yes", "expected a boolean (true or false), got a string"),
        ("allow_private", 1, "expected a boolean (true or false), got an integer"),
        ("listen", 8080, "expected a string, got an integer"),
        ("listen", "nope", "--listen wants HOST:PORT, got 'nope'"),
        ("listen", {"host": "x"}, "expected a string, got a table"),
        ("egress", 5, "expected a string, got an integer"),
        ("egress", {"a": "b"}, "expected a string, got a table"),
        ("egress", ["10.0.0.5", 6], "expected a string, got an integer in the array"),
        ("log_level", "loud", "'loud' is not one of 'debug', 'info'"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, key: str, value: Any, reason: str) -> None:
    path = tmp_path / "demux.toml"
    with pytest.raises(ConfigError) as caught:
        _convert(path, **{key: value})
    message = str(caught.value)
    assert message.startswith(f"{path}: key {key!r}: "), message
    assert reason in message


def test_load_reads_then_converts(tmp_path: Path) -> None:
    path = _write(tmp_path, "workers = 3\nallow_private = true\n")
    assert config_file.load(path, _known(), _ctx()) == {"workers": 3, "allow_private": True}


# --------------------------------------------------------------------------- default_map


def test_default_map_uses_parameter_names_and_only_this_commands_options() -> None:
    values = {"egress_interface": ("eth1",), "listen": "127.0.0.1:1", "workers": 2}
    only_egress = [p for p in toy.params if p.name in ("egress", "egress_interfaces")]
    assert config_file.default_map(values, only_egress) == {"egress_interfaces": ("eth1",)}
    assert config_file.default_map(values, toy.params) == {
        "listen": "127.0.0.1:1",
        "egress_interfaces": ("eth1",),
        "workers": 2,
    }


# --------------------------------------------------------------------------- precedence


@pytest.fixture
def runner() -> Iterator[CliRunner]:
    # None unsets: no TOY_* variable of the outer environment leaks in.
    yield CliRunner(env={k: None for k in os.environ if k.startswith("TOY_")})


def _run(runner: CliRunner, *args: str, **env: str) -> dict[str, str]:
    result = runner.invoke(toy, list(args), env=env)
    assert result.exit_code == 0, result.output
    return dict(line.split("=", 1) for line in result.output.splitlines())


def test_precedence_flag_env_file_default(runner: CliRunner, tmp_path: Path) -> None:
    path = _write(tmp_path, 'workers = 3\negress = ["10.0.0.5"]\nallow_private = true\n')
    assert _run(runner)["workers"] == "4 DEFAULT"
    assert _run(runner, "--config", str(path))["workers"] == "3 DEFAULT_MAP"
    assert _run(runner, "--config", str(path), TOY_WORKERS="5")["workers"] == "5 ENVIRONMENT"
    flag = _run(runner, "--config", str(path), "--workers", "6", TOY_WORKERS="5")
    assert flag["workers"] == "6 COMMANDLINE"
    # The file may come from the environment too; multiple options and flags alike.
    out = _run(runner, "--egress", "10.0.0.9", TOY_CONFIG=str(path), TOY_ALLOW_PRIVATE="0")
    assert out["egress"] == "('10.0.0.9',) COMMANDLINE"
    assert out["allow_private"] == "False ENVIRONMENT"
    assert out["workers"] == "3 DEFAULT_MAP"
    assert _run(runner, "--config", str(path))["allow_private"] == "True DEFAULT_MAP"


def test_config_after_other_options_still_applies(runner: CliRunner, tmp_path: Path) -> None:
    path = _write(tmp_path, 'workers = 3\nlisten = "127.0.0.1:7"\n')
    out = _run(runner, "--workers", "2", "--config", str(path))
    assert out["workers"] == "2 COMMANDLINE"
    assert out["listen"] == "'127.0.0.1:7' DEFAULT_MAP"


def test_refusal_through_click(runner: CliRunner, tmp_path: Path) -> None:
    path = _write(tmp_path, "workers = 0\n")
    result = runner.invoke(toy, ["--config", str(path)])
    assert result.exit_code != 0
    assert f"{path}: key 'workers': 0 is not in the range" in result.output
