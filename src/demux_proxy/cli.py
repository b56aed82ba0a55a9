"""The command line: parse options into a Config and call in. No sockets here.

Every option also reads `DEMUX_PROXY_<NAME>` (e.g. DEMUX_PROXY_LISTEN, DEMUX_PROXY_EGRESS)
and, with `--config FILE` (or DEMUX_PROXY_CONFIG), a TOML file whose keys are the long
option names with underscores. The file becomes click's `default_map`, so a value comes
from the flag, else the environment, else the file, else the option's default.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar, cast

import click
from click.core import ParameterSource

from demux_proxy import __version__, config_file
from demux_proxy.config import Config, default_state_dir, env_note, parse_listen
from demux_proxy.egress import parse_addresses, resolve_egress
from demux_proxy.errors import ConfigError
from demux_proxy.options import (
    START_OPTIONS,
    Seconds,
    ca_cert_option,
    egress_options,
    env_sources,
    insecure_upstream_option,
    state_dir_option,
    upstream_ca_option,
)
from demux_proxy.options import env_name as _env
from demux_proxy.options import split_values as _split

F = TypeVar("F", bound=Callable[..., Any])

# ctx.meta key: the config file a command was given (for `demux-proxy config`).
_CONFIG_FILE = "demux_proxy.config_file"


def _config_option(f: F) -> F:
    return click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path),
        envvar=_env("config"),
        show_envvar=True,
        metavar="FILE",
        is_eager=True,
        expose_value=False,
        callback=_read_config_file,
        help="Take option values from this TOML file: keys are the long option names with "
        'underscores (listen = "127.0.0.1:8080", egress = ["10.0.0.5"], allow_private = '
        "true). A flag, then a DEMUX_PROXY_* variable, wins over it.",
    )(f)


def _read_config_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
    """Eager: load the file into ctx.default_map before the other options are resolved."""
    if path is None or ctx.resilient_parsing:
        return
    try:
        values = config_file.load(path, _file_options(), ctx, _CHECKS)
    except ConfigError as exc:
        _fail(exc)
    defaults = config_file.default_map(values, ctx.command.params)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_CONFIG_FILE] = path


def _file_options() -> dict[str, click.Option]:
    """The keys a config file may hold: `start`'s options, whichever command reads it."""
    return config_file.known_options(start.params)


def _check_auth(values: tuple[str, ...]) -> None:
    from demux_proxy.auth import ClientPolicy

    ClientPolicy.from_options(values, None, ())  # never echoes a password


def _check_allow_client(values: tuple[str, ...]) -> None:
    from demux_proxy.auth import ClientPolicy

    ClientPolicy.from_options((), None, _split(values))


def _check_destinations(values: tuple[str, ...]) -> None:
    from demux_proxy.policy import DestinationPolicy

    DestinationPolicy(deny=_split(values))


def _check_host_rate(values: tuple[str, ...]) -> None:
    from demux_proxy.limits import RateRules, parse_host_rate

    RateRules([parse_host_rate(v) for v in values])  # a pattern given twice is refused too


def _check_admin(value: str | None) -> None:
    if value:
        parse_listen(value, option="--admin")


# What start would reject in a value click's types let through, checked where the value
# is read (file, or `demux-proxy config`) so the error can say where it came from. Only
# syntax: whether an address is on this host is for `start` to find out.
_CHECKS: Mapping[str, config_file.Check] = {
    "listen": parse_listen,
    "host_rate": _check_host_rate,
    "admin": _check_admin,
    "egress": parse_addresses,
    "deny": _check_destinations,
    "allow_dest": _check_destinations,
    "allow_client": _check_allow_client,
    "auth": _check_auth,
}


def _standard_streams() -> None:
    """A closed stdin or stderr gets /dev/null: otherwise a socket would take its number
    and a stray write would reach a client. A closed stdout, where the log and every
    command's answer go, is refused (exit 2)."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for _ in closed:  # each open takes the lowest free number: these, in order
        os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # kept across exec
    if 0 in closed:  # Python found it closed at start and left sys.stdin None
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (lives as long as the process)
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    if 1 in closed:
        sys.stderr.write(
            "demux-proxy: error: stdout is closed, and the log goes there "
            "(send it to a file, or to /dev/null to drop it)\n"
        )
        sys.stderr.flush()
        sys.exit(2)


class _Group(click.Group):
    """click's usage errors as one line, as ours are ("demux-proxy: error: ..."), exit 2:
    not click's usage line, hint and message over three."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _standard_streams()
        stdout = _Stdout(sys.stdout)
        sys.stdout = cast(TextIO, stdout)
        try:
            try:
                self._main(*args, **kwargs)
            finally:
                stdout.flush()  # what is still buffered fails here, not at interpreter exit
        except OSError as exc:
            if exc is not stdout.error:  # a bug, not a full disk: its traceback is wanted
                raise
            _stdout_failed(exc, stdout.fileno())

    def _main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except _HELP_ERRORS as exc:  # no command given: the help text is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            _name_the_source(exc)
            if exc.ctx is not None:
                where = exc.ctx.command_path
            else:  # "start --listen" with no value: click has no context for it
                argv = kwargs.get("args") or sys.argv[1:]
                named = [a for a in argv[:1] if a in self.commands]
                where = " ".join(["demux-proxy", *named])
            click.echo(f"demux-proxy: error: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


_HELP_ERRORS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Stdout:
    """sys.stdout, keeping the error its last failed write or flush raised: that error,
    and no other OSError (a state dir, a socket), is told as "cannot write to standard
    output"."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_failed(exc: OSError, fd: int) -> NoReturn:
    """Exit 1 (as click does for EPIPE) on a failed write to stdout (a full disk: ENOSPC)."""
    # What is still buffered would fail again when the interpreter flushes at exit, with
    # an "Exception ignored" traceback and exit status 120: it goes to /dev/null instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdout.flush()
    if exc.errno != errno.EPIPE:  # a reader that went away needs no word (click's way)
        reason = exc.strerror or exc
        click.echo(f"demux-proxy: error: cannot write to standard output: {reason}", err=True)
    sys.exit(1)


def _name_the_source(exc: click.UsageError) -> None:
    """A bad value names where it came from: click adds "(env var: ...)" whether it
    came from there or not, so it goes unless the environment gave it. (Values from
    the config file never get here: config_file checks them and names file and key.)"""
    if not isinstance(exc, click.BadParameter) or exc.param_hint is not None:
        return
    param, ctx = exc.param, exc.ctx
    if param is None or ctx is None or param.name is None:
        return
    source = ctx.get_parameter_source(param.name)
    if source is ParameterSource.ENVIRONMENT or not param.opts:
        return
    exc.param_hint = " / ".join(f"'{opt}'" for opt in param.opts)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="demux-proxy")
def main() -> None:
    """An HTTP/HTTPS forward proxy that sends each request from the next local address."""


def _start_options(f: F) -> F:
    """`--config` and every option of `start`: shared by `start` and `config`."""
    decorated: Callable[..., Any] = f
    for decorate in reversed(START_OPTIONS):
        decorated = decorate(decorated)
    return cast(F, _config_option(decorated))


@main.command()
@_start_options
def start(
    listen: str,
    egress: tuple[str, ...],
    egress_interfaces: tuple[str, ...],
    allow_private: bool,
    deny: tuple[str, ...],
    allow_dest: tuple[str, ...],
    auth: tuple[str, ...],
    auth_file: Path | None,
    allow_client: tuple[str, ...],
    upstream_ca: Path | None,
    insecure_upstream: bool,
    state_dir: Path | None,
    ca_cert: Path | None,
    ca_key: Path | None,
    log_level: str,
    log_format: str,
    connect_timeout: float,
    response_timeout: float,
    idle_timeout: float,
    client_idle_timeout: float,
    head_timeout: float,
    handshake_timeout: float,
    max_header_bytes: int,
    rediscover: float | None,
    strategy: str,
    host_rate: tuple[str, ...],
    queue_timeout: float,
    ban_status: tuple[int, ...],
    retries: int,
    admin: str | None,
    max_connections: int,
    workers: int,
    shutdown_grace: float,
) -> None:
    """Start the proxy: each request leaves from the next egress address."""
    # Until the event loop's handler takes over (re-discovery), SIGHUP must not end
    # the process (its default): an ignored signal stays ignored across the exec.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Serves from a fresh interpreter without the command line's modules (launch.py);
    # imported here, so `--help` and `ca` stay free of the serving code.
    from demux_proxy.launch import serve_fresh

    try:
        host, port = parse_listen(listen)
        _check_host_rate(host_rate)  # here, not after the exec into the serving process
        config = Config(
            listen_host=host,
            listen_port=port,
            egress=tuple(resolve_egress(parse_addresses(egress), _split(egress_interfaces))),
            state_dir=state_dir or default_state_dir(),
            allow_private=allow_private,
            deny=tuple(_split(deny)),
            allow_dest=tuple(_split(allow_dest)),
            auth=auth,
            auth_file=auth_file,
            allow_client=tuple(_split(allow_client)),
            upstream_ca=upstream_ca,
            insecure_upstream=insecure_upstream,
            ca_cert=ca_cert,
            ca_key=ca_key,
            log_level=log_level.lower(),
            log_format=log_format,
            connect_timeout_s=connect_timeout,
            response_timeout_s=response_timeout,
            idle_timeout_s=idle_timeout,
            client_idle_timeout_s=client_idle_timeout,
            head_timeout_s=head_timeout,
            handshake_timeout_s=handshake_timeout,
            max_head_bytes=max_header_bytes,
            max_connections=max_connections,
            admin=parse_listen(admin, option="--admin") if admin else None,
            egress_discovered=not egress,
            egress_interfaces=tuple(_split(egress_interfaces)),
            rediscover_s=rediscover,
            strategy=strategy,
            host_rate=host_rate,
            queue_timeout_s=queue_timeout,
            ban_status=ban_status,
            retries=retries,
            shutdown_grace_s=shutdown_grace,
            workers=workers,
            env_sources=env_sources(click.get_current_context()),
        )
        serve_fresh(config)
    except ConfigError as exc:
        _fail(exc, exc.exit_status)  # only start tells what a service may retry (75)


@main.command("config")
@_start_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead.")
@click.pass_context
def config_command(ctx: click.Context, /, as_json: bool, **options: Any) -> None:
    """Print the configuration `start` would run with, and where each value comes from.

    Takes the same options (and environment, and --config file) as `start`. Each option is
    printed as a `key = value` line a config file could hold, followed by its source: `flag`,
    `env DEMUX_PROXY_...`, `file` or `default`. Passwords are masked (`user:****`). Values are
    checked as `start` checks them, short of touching the network: exit status 2 when one is
    wrong.
    """
    rows: list[tuple[str, Any, str, str | None]] = []
    for key, option in _file_options().items():
        name = option.name
        assert name is not None
        value = options[name]
        source = ctx.get_parameter_source(name)
        envvar = option.envvar if isinstance(option.envvar, str) else None
        check = _CHECKS.get(key)
        if check is not None and source in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        ):
            try:
                check(value)
            except (ConfigError, ValueError) as exc:
                where = f"{envvar}: " if source is ParameterSource.ENVIRONMENT else ""
                _fail(ConfigError(f"{where}{exc}"))
        origin = _SOURCES.get(source or ParameterSource.DEFAULT, "default")
        rows.append((key, _shown(name, value), origin, envvar if origin == "env" else None))
    try:
        refusal = _start_refusal(options)
    except (ConfigError, ValueError) as exc:
        _fail(ConfigError(str(exc)))
    if refusal is not None:  # settings `start` refuses together, each fine on its own
        _fail(ConfigError(refusal))

    path = ctx.meta.get(_CONFIG_FILE)
    if as_json:
        document = {
            "config_file": None if path is None else str(path),
            "options": {
                key: {"value": value, "source": origin, **({"envvar": var} if var else {})}
                for key, value, origin, var in rows
            },
        }
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"# demux-proxy start: {'config file ' + str(path) if path else 'no config file'}")
    lines = [(_toml_line(key, value), origin, var) for key, value, origin, var in rows]
    width = min(48, max(len(text) for text, _, _ in lines))
    for text, origin, var in lines:
        where = f"env {var}" if var else origin
        click.echo(f"{text:<{width}}  # {where}")
    if options.get("auth"):  # saved as is, this file would start a proxy without them
        click.echo(
            "demux-proxy: note: the auth line is commented out (passwords are not printed): "
            "write them in before starting from this file",
            err=True,
        )


def _start_refusal(options: Mapping[str, Any]) -> str | None:
    """What `start` would refuse in these options taken together, as it words it."""
    from demux_proxy.auth import ClientPolicy, start_refusal

    policy = ClientPolicy.from_options(
        options["auth"], options["auth_file"], _split(options["allow_client"])
    )
    admin = options["admin"]
    return start_refusal(
        parse_listen(options["listen"]),
        parse_listen(admin, option="--admin") if admin else None,
        policy,
        options["ca_cert"],
        options["ca_key"],
    )


_SOURCES = {
    ParameterSource.COMMANDLINE: "flag",
    ParameterSource.ENVIRONMENT: "env",
    ParameterSource.DEFAULT_MAP: "file",
    ParameterSource.DEFAULT: "default",
}

# Options whose values start splits on commas (and blanks): shown split.
_LISTS = frozenset({"egress", "egress_interfaces", "deny", "allow_dest", "allow_client"})


def _shown(name: str, value: Any) -> Any:
    """The value as JSON/TOML wants it: lists split, paths as text, passwords masked."""
    if name == "auth":
        return [_mask(item) for item in value]
    if name in _LISTS:
        return _split(value)
    if name == "state_dir" and value is None:
        return str(default_state_dir())
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        # Absolute: a config file's relative paths are read relative to the file, so a
        # printed "state" would name another directory (and CA) once saved elsewhere.
        return str(value.absolute())
    return value


def _mask(credential: str) -> str:
    user, sep, _ = credential.partition(":")
    return f"{user}:****" if sep else "****"


def _toml_line(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} = (not set)"
    if key == "auth" and value:
        # Commented out: saved as is, "user:****" would be a password anyone can guess.
        return f"# {key} = {_toml_value(value)}  (passwords masked: write them in)"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


@main.command()
@_config_option
@egress_options
def addresses(egress: tuple[str, ...], egress_interfaces: tuple[str, ...]) -> None:
    """List the egress addresses `start` would use with the same options."""
    try:
        found = resolve_egress(parse_addresses(egress), _split(egress_interfaces))
    except ConfigError as exc:
        _fail(exc)
    for e in found:
        click.echo(f"{e.address}\t{e.interface or '-'}")


@main.command()
@_config_option
@click.option(
    "--url",
    default="https://checkip.amazonaws.com",
    show_default=True,
    metavar="URL",
    help="A checkip service: answers each request with the client's address as plain text. "
    "Your own probe: the private-destination guard does not apply to it.",
)
@egress_options
@upstream_ca_option("the --url server")
@insecure_upstream_option("the --url server's certificate")
@click.option(
    "--timeout",
    type=Seconds(min=0.1),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds each address gets to connect and answer.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    metavar="N",
    help="Addresses probed at the same time.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def check(
    url: str,
    egress: tuple[str, ...],
    egress_interfaces: tuple[str, ...],
    upstream_ca: Path | None,
    insecure_upstream: bool,
    timeout: float,
    concurrency: int,
    as_json: bool,
) -> None:
    """Send one request from every egress address and report what the world sees.

    For each address (chosen as for `start`): the public address the --url server saw, the
    latency, and flags: FAILED (no answer: unusable), SHARED (another address shows the same
    public address, so it adds nothing), WRONG ROUTE (the kernel sends it out of an interface
    that does not own it: unusable on a cloud network; the `ip rule`/`ip route` lines that fix
    it are printed), NOT CHECKED (the URL's host has no address of its family, e.g. an IPv6
    address and an IPv4 URL: not a failure). Exit status 1 when any address is unusable or
    none could be checked, 2 on a usage error.
    """
    import orjson

    from demux_proxy.check import parse_target, render_text, run_check
    from demux_proxy.tls import upstream_context

    try:
        found = resolve_egress(parse_addresses(egress), _split(egress_interfaces))
        target = parse_target(url)
        tls = upstream_context(upstream_ca, insecure=insecure_upstream) if target.tls else None
    except ConfigError as exc:
        _fail(exc)

    interactive = sys.stderr.isatty()
    step = 1 if interactive else max(1, len(found) // 10)

    def progress(done: int, total: int) -> None:
        if interactive:
            click.echo(f"\rchecked {done}/{total}", err=True, nl=done == total)
        elif done == total or done % step == 0:
            click.echo(f"checked {done}/{total}", err=True)

    click.echo(f"checking {len(found)} address(es) against {target.url}", err=True)
    report = run_check(
        found,
        target.url,
        tls=tls,
        timeout_s=timeout,
        concurrency=concurrency,
        progress=progress,
    )
    if as_json:
        click.echo(orjson.dumps(report.to_json(target.url), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_text(report, target.url), nl=False)
    if report.nothing_checked:
        reasons = dict.fromkeys(row.result.not_checked for row in report.rows)
        click.echo(
            f"demux-proxy: error: no address could be checked: {'; '.join(map(str, reasons))}",
            err=True,
        )
    sys.exit(0 if report.ok else 1)


@main.group()
def ca() -> None:
    """The CA that signs intercepted sites: clients must trust its certificate."""


@ca.command("export")
@_config_option
@state_dir_option
@ca_cert_option
def ca_export(state_dir: Path | None, ca_cert: Path | None) -> None:
    """Print the CA certificate (PEM) to stdout: --ca-cert's, else the generated one
    (created if there is none yet)."""
    if ca_cert is not None:
        from demux_proxy.ca import read_ca_cert

        try:
            click.echo(read_ca_cert(ca_cert).decode(), nl=False)
        except ConfigError as exc:
            _fail(exc)
        return
    click.echo(_load_ca(state_dir).cert_pem.decode(), nl=False)


@ca.command("path")
@_config_option
@state_dir_option
@ca_cert_option
def ca_path(state_dir: Path | None, ca_cert: Path | None) -> None:
    """Print the path of the CA certificate `start` signs with: --ca-cert, else the
    generated one (created if there is none yet)."""
    if ca_cert is not None:
        if not ca_cert.is_file():  # as `ca export` and `start` would refuse it
            _fail(ConfigError(f"--ca-cert {ca_cert}: no such file"))
        click.echo(str(ca_cert))
        return
    click.echo(str(_load_ca(state_dir).cert_path))


def _load_ca(state_dir: Path | None) -> Any:
    from demux_proxy.ca import CertificateAuthority

    try:
        authority = CertificateAuthority.load_or_create(state_dir or default_state_dir())
    except ConfigError as exc:
        _fail(exc)
    authority.close()
    return authority


def _fail(exc: ConfigError, status: int = 2) -> Any:
    ctx = click.get_current_context(silent=True)
    message = env_note(str(exc), env_sources(ctx)) if ctx is not None else str(exc)
    click.echo(f"demux-proxy: error: {message}", err=True)
    sys.exit(status)
