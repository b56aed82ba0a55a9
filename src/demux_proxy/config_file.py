"""The `--config FILE`: TOML whose keys are a command's long option names, as click defaults.

`listen = "127.0.0.1:8080"` sets `--listen`, `egress_interface = ["eth1"]` sets
`--egress-interface`, `allow_private = true` sets the flag. The values are handed to click
as the context's `default_map`, which click consults after the command line and the
environment and before the option's own default: flag > environment > file > default.

Everything is checked before the command runs: an unknown key, a value of the wrong TOML
type, or one the option's click type (or an extra check) rejects is a `ConfigError`
naming the file and the key. The set of keys is derived from the options themselves,
never listed by hand, so a new option is a new key.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from demux_proxy.errors import ConfigError

# An extra check of a key's value (after click's own type): raises ConfigError (or
# ValueError) with the reason, e.g. `parse_listen` for `listen`.
Check = Callable[[Any], object]


def option_key(param: click.Parameter) -> str | None:
    """The file key of an option: its (first) long name with underscores, or None."""
    if not isinstance(param, click.Option):
        return None
    for decl in param.opts:
        if decl.startswith("--"):
            return decl[2:].replace("-", "_")
    return None


def known_options(params: Iterable[click.Parameter]) -> dict[str, click.Option]:
    """Key -> option for every option that carries a value (`--config`, `--help`... do not)."""
    known: dict[str, click.Option] = {}
    for param in params:
        key = option_key(param)
        if key is not None and param.expose_value and isinstance(param, click.Option):
            known[key] = param
    return known


def read(path: Path) -> dict[str, Any]:
    """The file's top-level TOML table; ConfigError `FILE: reason` when it cannot be had."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def convert(
    path: Path,
    data: Mapping[str, Any],
    known: Mapping[str, click.Option],
    ctx: click.Context,
    checks: Mapping[str, Check] | None = None,
) -> dict[str, Any]:
    """Key -> value checked against its option, ready for click as a default.

    Multiple options take an array (a single string is one element) and come back as a
    tuple; flags take booleans; relative paths are made relative to the file's directory.
    """
    values: dict[str, Any] = {}
    for key, raw in data.items():
        option = known.get(key)
        if option is None:
            raise ConfigError(f"{path}: {_unknown(key, known)}")
        try:
            value = _normalise(raw, option, path.parent)
            option.type_cast_value(ctx, value)  # click's own verdict, the value unchanged
            check = (checks or {}).get(key)
            if check is not None:
                check(value)
        except click.BadParameter as exc:
            raise ConfigError(f"{path}: key {key!r}: {exc.message}") from None
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{path}: key {key!r}: {exc}") from None
        values[key] = value
    return values


def default_map(values: Mapping[str, Any], params: Iterable[click.Parameter]) -> dict[str, Any]:
    """Parameter name -> value for the params (of one command) that have a key in `values`.

    Keys for options this command does not have are left out: one file serves `start` and
    the commands that share some of its options.
    """
    result: dict[str, Any] = {}
    for param in params:
        key = option_key(param)
        if key is not None and key in values and param.name is not None:
            result[param.name] = values[key]
    return result


def load(
    path: Path,
    known: Mapping[str, click.Option],
    ctx: click.Context,
    checks: Mapping[str, Check] | None = None,
) -> dict[str, Any]:
    """`read` then `convert`."""
    return convert(path, read(path), known, ctx, checks)


def _unknown(key: str, known: Mapping[str, click.Option]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (known: {', '.join(names)})"


def _normalise(raw: Any, option: click.Option, base: Path) -> Any:
    if option.multiple:
        if not isinstance(raw, list):  # one value: one element (ban_status = 429)
            return (_scalar(raw, option, base, in_array=False),)
        return tuple(_scalar(item, option, base, in_array=True) for item in raw)
    return _scalar(raw, option, base, in_array=False)


def _scalar(raw: Any, option: click.Option, base: Path, *, in_array: bool) -> Any:
    kind = option.type
    where = " in the array" if in_array else ""
    if option.is_flag or isinstance(kind, click.types.BoolParamType):
        if not isinstance(raw, bool):
            raise ValueError(f"expected a boolean (true or false), got {_toml_type(raw)}{where}")
        return raw
    if isinstance(kind, click.types.IntParamType):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected an integer, got {_toml_type(raw)}{where}")
        return raw
    if isinstance(kind, click.types.FloatParamType):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {_toml_type(raw)}{where}")
        if not math.isfinite(raw):
            raise ValueError(f"expected a finite number, got {raw}")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {_toml_type(raw)}{where}")
    if isinstance(kind, click.Path) and raw and raw != "-":
        # `~` is the home directory (no shell expands it here); a relative path is
        # relative to the file's directory, wherever the command runs from.
        return str(base / Path(raw).expanduser())
    return raw


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"
