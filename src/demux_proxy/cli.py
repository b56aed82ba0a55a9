"""The command line: parse options into a Config and call in. No sockets here.

Every option also reads `DEMUX_PROXY_<NAME>` (e.g. DEMUX_PROXY_LISTEN, DEMUX_PROXY_EGRESS);
flags win over the environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from demux_proxy import __version__
from demux_proxy.config import DEFAULT_LISTEN, Config, default_state_dir, parse_listen
from demux_proxy.egress import parse_addresses, resolve_egress
from demux_proxy.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def _env(name: str) -> str:
    return "DEMUX_PROXY_" + name.upper().replace("-", "_")


def _state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=_env("state-dir"),
        show_envvar=True,
        help="Where the generated CA lives (created 0700; the key 0600). "
        "Default: $XDG_DATA_HOME/demux-proxy, else ~/.local/share/demux-proxy.",
    )(f)


def _egress_options(f: F) -> F:
    f = click.option(
        "--egress-interface",
        "egress_interfaces",
        multiple=True,
        envvar=_env("egress-interface"),
        show_envvar=True,
        help="Use every address of this interface (repeatable).",
    )(f)
    return click.option(
        "--egress",
        "egress",
        multiple=True,
        envvar=_env("egress"),
        show_envvar=True,
        metavar="ADDR[,ADDR...]",
        help="Source addresses to rotate through (repeatable, comma-separated). Default: "
        "every non-loopback IPv4 and global IPv6 address of every interface that is up.",
    )(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="demux-proxy")
def main() -> None:
    """An HTTP/HTTPS forward proxy that sends each request from the next local address."""


@main.command()
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    envvar=_env("listen"),
    show_envvar=True,
    metavar="HOST:PORT",
    help="Address to accept clients on. Loopback by default: the proxy is not for the world.",
)
@_egress_options
@click.option(
    "--allow-private",
    is_flag=True,
    envvar=_env("allow-private"),
    show_envvar=True,
    help="Let requests reach private, loopback and link-local destinations "
    "(refused with 403 by default, cloud metadata included).",
)
@click.option(
    "--deny",
    multiple=True,
    envvar=_env("deny"),
    show_envvar=True,
    metavar="HOST|CIDR",
    help="Refuse these destinations (exact host, *.domain or CIDR; repeatable). Wins over "
    "everything else.",
)
@click.option(
    "--allow-dest",
    "allow_dest",
    multiple=True,
    envvar=_env("allow-dest"),
    show_envvar=True,
    metavar="HOST|CIDR",
    help="Only allow these destinations (repeatable); an allowed CIDR also admits private "
    "addresses inside it.",
)
@click.option(
    "--auth",
    "auth",
    multiple=True,
    envvar=_env("auth"),
    show_envvar=True,
    metavar="USER:PASS",
    help="Require Basic proxy authentication with these credentials (repeatable). Needed, "
    "or --allow-client, to listen on a non-loopback address.",
)
@click.option(
    "--auth-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("auth-file"),
    show_envvar=True,
    help="Credentials, one 'user:password' or 'user:<bcrypt or argon2 hash>' per line.",
)
@click.option(
    "--allow-client",
    "allow_client",
    multiple=True,
    envvar=_env("allow-client"),
    show_envvar=True,
    metavar="CIDR",
    help="Only accept clients from these networks (repeatable).",
)
@click.option(
    "--upstream-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("upstream-ca"),
    show_envvar=True,
    metavar="PEM",
    help="Also trust this CA for upstream servers (on top of the system store or certifi).",
)
@click.option(
    "--insecure-upstream",
    is_flag=True,
    envvar=_env("insecure-upstream"),
    show_envvar=True,
    help="Do not verify upstream certificates. Dangerous: for testing only.",
)
@_state_dir_option
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("ca-cert"),
    show_envvar=True,
    metavar="PEM",
    help="Sign intercepted sites with this CA certificate instead of the generated one.",
)
@click.option(
    "--ca-key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("ca-key"),
    show_envvar=True,
    metavar="PEM",
    help="The private key of --ca-cert.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar=_env("log-level"),
    show_envvar=True,
    help="Least severe level logged.",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default="json",
    show_default=True,
    envvar=_env("log-format"),
    show_envvar=True,
    help="json: one JSON object per line on stdout, as the original tool wrote; text: for people.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    envvar=_env("connect-timeout"),
    show_envvar=True,
    help="Seconds to connect (and TLS handshake) to an upstream; then 504.",
)
@click.option(
    "--response-timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    envvar=_env("response-timeout"),
    show_envvar=True,
    help="Seconds to wait for an upstream's response head; then 504.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    envvar=_env("idle-timeout"),
    show_envvar=True,
    help="Seconds without a byte mid-body before the transfer is declared dead.",
)
@click.option(
    "--client-idle-timeout",
    type=click.FloatRange(min=0.1),
    default=75.0,
    show_default=True,
    envvar=_env("client-idle-timeout"),
    show_envvar=True,
    help="Seconds an idle client keep-alive connection is kept open.",
)
@click.option(
    "--head-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    envvar=_env("head-timeout"),
    show_envvar=True,
    help="Seconds a client has to send a whole request head once it started (408 after).",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    envvar=_env("handshake-timeout"),
    show_envvar=True,
    help="Seconds for a client's TLS handshake after CONNECT.",
)
@click.option(
    "--max-header-bytes",
    type=click.IntRange(min=1024, max=1 << 20),
    default=64 * 1024,
    show_default=True,
    envvar=_env("max-header-bytes"),
    show_envvar=True,
    help="Largest request or response head accepted (431 / 502 beyond).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=256),
    default=os.cpu_count() or 1,
    show_default="the number of cores",
    envvar=_env("workers"),
    show_envvar=True,
    help="Processes accepting clients on the listen port (SO_REUSEPORT). Rotation stays "
    "global across them.",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    envvar=_env("shutdown-grace"),
    show_envvar=True,
    help="On SIGTERM/SIGINT, seconds that requests in flight get to finish.",
)
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
    workers: int,
    shutdown_grace: float,
) -> None:
    """Start the proxy: each request leaves from the next egress address."""
    from demux_proxy.app import run  # keeps `--help` and `ca` free of uvloop start-up

    try:
        host, port = parse_listen(listen)
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
            shutdown_grace_s=shutdown_grace,
            workers=workers,
        )
        run(config)
    except ConfigError as exc:
        _fail(exc)


@main.command()
@_egress_options
def addresses(egress: tuple[str, ...], egress_interfaces: tuple[str, ...]) -> None:
    """List the egress addresses `start` would use with the same options."""
    try:
        found = resolve_egress(parse_addresses(egress), _split(egress_interfaces))
    except ConfigError as exc:
        _fail(exc)
    for e in found:
        click.echo(f"{e.address}\t{e.interface or '-'}")


@main.command()
@click.option(
    "--url",
    default="https://checkip.amazonaws.com",
    show_default=True,
    metavar="URL",
    help="A checkip service: answers each request with the client's address as plain text. "
    "Your own probe: the private-destination guard does not apply to it.",
)
@_egress_options
@click.option(
    "--upstream-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("upstream-ca"),
    show_envvar=True,
    metavar="PEM",
    help="Also trust this CA for the --url server (on top of the system store or certifi).",
)
@click.option(
    "--insecure-upstream",
    is_flag=True,
    envvar=_env("insecure-upstream"),
    show_envvar=True,
    help="Do not verify the --url server's certificate. For testing only.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
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
    it are printed). Exit status 1 when any address is unusable, 2 on a usage error.
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
    sys.exit(0 if report.ok else 1)


@main.group()
def ca() -> None:
    """The CA that signs intercepted sites: clients must trust its certificate."""


@ca.command("export")
@_state_dir_option
def ca_export(state_dir: Path | None) -> None:
    """Print the CA certificate (PEM) to stdout; creates the CA if there is none yet."""
    click.echo(_load_ca(state_dir).cert_pem.decode(), nl=False)


@ca.command("path")
@_state_dir_option
def ca_path(state_dir: Path | None) -> None:
    """Print the path of the CA certificate file; creates the CA if there is none yet."""
    click.echo(str(_load_ca(state_dir).cert_path))


def _load_ca(state_dir: Path | None) -> Any:
    from demux_proxy.ca import CertificateAuthority

    try:
        authority = CertificateAuthority.load_or_create(state_dir or default_state_dir())
    except ConfigError as exc:
        _fail(exc)
    authority.close()
    return authority


def _split(values: tuple[str, ...]) -> list[str]:
    return [v for value in values for v in value.replace(",", " ").split()]


def _fail(exc: ConfigError) -> Any:
    click.echo(f"demux-proxy: error: {exc}", err=True)
    sys.exit(2)
