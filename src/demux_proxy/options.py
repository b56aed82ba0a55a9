"""Every option of `demux-proxy start`, declared once: `start` and `config` both take them.

Each option also reads `DEMUX_PROXY_<NAME>`; the long names with underscores are the
keys of the `--config` TOML file (config_file.py derives them from these declarations).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from demux_proxy.config import DEFAULT_LISTEN, EnvSource

_Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class Seconds(click.FloatRange):
    """A FloatRange that refuses nan and inf, which it lets through: a nan timeout was
    accepted at start and then failed every request."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class _Credential(click.types.StringParamType):
    """USER:PASS. From the environment one per line: click would split a repeatable
    option's variable on blanks, and a password may hold a space."""

    envvar_list_splitter = "\n"


def _usable_cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), not all the host has."""
    try:
        return max(1, min(256, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):  # not Linux
        return max(1, min(256, os.cpu_count() or 1))


def split_values(values: Iterable[str]) -> list[str]:
    """A list option's values as items: each value may hold several, comma- or
    blank-separated (`--deny a.test,b.test`); empty items are dropped."""
    return [v for value in values for v in value.replace(",", " ").split()]


def _listed(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    """A list option given with nothing in it (`--allow-dest ''`, `--allow-dest "$UNSET"`)
    is an error: taken as not given, it would lift the restriction it was there to set
    (every destination allowed) or silently mean something else (discovery for --egress)."""
    if value and not split_values(value):
        raise click.BadParameter("empty: give at least one value, or leave the option out")
    return value


def env_sources(ctx: click.Context) -> tuple[EnvSource, ...]:
    """The options of `ctx` that the environment set; no values of secret ones."""
    found: list[EnvSource] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
            continue
        value = ctx.params.get(param.name)
        texts = [str(v) for v in (value if isinstance(value, tuple) else (value,))]
        values = () if param.name == "auth" else tuple({*texts, *split_values(texts)})
        found.append((param.opts[0], str(param.envvar), values))
    return tuple(found)


def env_name(name: str) -> str:
    return "DEMUX_PROXY_" + name.upper().replace("-", "_")


_env = env_name
F = TypeVar("F", bound=Callable[..., Any])


def ca_cert_option(f: F) -> F:
    return click.option(
        "--ca-cert",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("ca-cert"),
        show_envvar=True,
        metavar="PEM",
        help="Sign intercepted sites with this CA certificate instead of the generated one.",
    )(f)


def state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=_env("state-dir"),
        show_envvar=True,
        help="Where the generated CA lives (created 0700; the key 0600). "
        "Default: $XDG_DATA_HOME/demux-proxy, else ~/.local/share/demux-proxy.",
    )(f)


def egress_options(f: F) -> F:
    f = click.option(
        "--egress-interface",
        "egress_interfaces",
        multiple=True,
        callback=_listed,
        metavar="NAME",
        envvar=_env("egress-interface"),
        show_envvar=True,
        help="Use the IPv4 and global IPv6 addresses of this interface (repeatable).",
    )(f)
    return click.option(
        "--egress",
        "egress",
        multiple=True,
        callback=_listed,
        envvar=_env("egress"),
        show_envvar=True,
        metavar="ADDR[,ADDR...]",
        help="Source addresses to rotate through (repeatable, comma-separated). Default: "
        "every non-loopback IPv4 and global IPv6 address of every interface that is up.",
    )(f)


def upstream_ca_option(what: str) -> _Decorator:
    return click.option(
        "--upstream-ca",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("upstream-ca"),
        show_envvar=True,
        metavar="PEM",
        help=f"Also trust this CA for {what} (on top of the system store or certifi).",
    )


def insecure_upstream_option(what: str) -> _Decorator:
    return click.option(
        "--insecure-upstream",
        is_flag=True,
        envvar=_env("insecure-upstream"),
        show_envvar=True,
        help=f"Do not verify {what}. Dangerous: for testing only.",
    )


START_OPTIONS: tuple[_Decorator, ...] = (
    click.option(
        "--listen",
        default=DEFAULT_LISTEN,
        show_default=True,
        envvar=_env("listen"),
        show_envvar=True,
        metavar="HOST:PORT",
        help="Address to accept clients on. Loopback by default: the proxy is not for the world.",
    ),
    egress_options,
    click.option(
        "--allow-private",
        is_flag=True,
        envvar=_env("allow-private"),
        show_envvar=True,
        help="Let requests reach private, loopback and link-local destinations "
        "(refused with 403 by default, cloud metadata included).",
    ),
    click.option(
        "--deny",
        multiple=True,
        callback=_listed,
        envvar=_env("deny"),
        show_envvar=True,
        metavar="HOST|CIDR",
        help="Refuse these destinations (exact host, *.domain or CIDR; repeatable). Wins over "
        "everything else.",
    ),
    click.option(
        "--allow-dest",
        "allow_dest",
        multiple=True,
        callback=_listed,
        envvar=_env("allow-dest"),
        show_envvar=True,
        metavar="HOST|CIDR",
        help="Only allow these destinations (repeatable); an allowed CIDR also admits private "
        "addresses inside it.",
    ),
    click.option(
        "--auth",
        "auth",
        multiple=True,
        type=_Credential(),
        envvar=_env("auth"),
        show_envvar=True,
        metavar="USER:PASS",
        help="Require Basic proxy authentication with these credentials (repeatable; in the "
        "environment variable, one per line). Needed, or --allow-client, to listen on a "
        "non-loopback address.",
    ),
    click.option(
        "--auth-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("auth-file"),
        show_envvar=True,
        help="Credentials, one 'user:password' or 'user:<bcrypt or argon2 hash>' per line.",
    ),
    click.option(
        "--allow-client",
        "allow_client",
        multiple=True,
        callback=_listed,
        envvar=_env("allow-client"),
        show_envvar=True,
        metavar="CIDR",
        help="Only accept clients from these networks (repeatable).",
    ),
    upstream_ca_option("upstream servers"),
    insecure_upstream_option("upstream certificates"),
    state_dir_option,
    ca_cert_option,
    click.option(
        "--ca-key",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("ca-key"),
        show_envvar=True,
        metavar="PEM",
        help="The private key of --ca-cert.",
    ),
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        show_default=True,
        envvar=_env("log-level"),
        show_envvar=True,
        help="Least severe level logged.",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["json", "text"]),
        default="json",
        show_default=True,
        envvar=_env("log-format"),
        show_envvar=True,
        help="json: one JSON object per line on stdout, as the original tool wrote; "
        "text: for people.",
    ),
    click.option(
        "--connect-timeout",
        type=Seconds(min=0.1),
        default=10.0,
        show_default=True,
        envvar=_env("connect-timeout"),
        show_envvar=True,
        help="Seconds to connect (and TLS handshake) to an upstream; then 504.",
    ),
    click.option(
        "--response-timeout",
        type=Seconds(min=0.1),
        default=120.0,
        show_default=True,
        envvar=_env("response-timeout"),
        show_envvar=True,
        help="Seconds to wait for an upstream's response head; then 504.",
    ),
    click.option(
        "--idle-timeout",
        type=Seconds(min=0.1),
        default=120.0,
        show_default=True,
        envvar=_env("idle-timeout"),
        show_envvar=True,
        help=(
            "Seconds without a byte mid-body, either way (a peer that sends nothing or "
            "takes nothing), before the transfer is declared dead."
        ),
    ),
    click.option(
        "--client-idle-timeout",
        type=Seconds(min=0.1),
        default=75.0,
        show_default=True,
        envvar=_env("client-idle-timeout"),
        show_envvar=True,
        help="Seconds an idle client keep-alive connection is kept open.",
    ),
    click.option(
        "--head-timeout",
        type=Seconds(min=0.1),
        default=30.0,
        show_default=True,
        envvar=_env("head-timeout"),
        show_envvar=True,
        help="Seconds a client has to send a whole request head once it started (408 after).",
    ),
    click.option(
        "--handshake-timeout",
        type=Seconds(min=0.1),
        default=10.0,
        show_default=True,
        envvar=_env("handshake-timeout"),
        show_envvar=True,
        help="Seconds for a client's TLS handshake after CONNECT.",
    ),
    click.option(
        "--max-header-bytes",
        type=click.IntRange(min=1024, max=1 << 20),
        default=64 * 1024,
        show_default=True,
        envvar=_env("max-header-bytes"),
        show_envvar=True,
        help="Largest request or response head accepted (431 / 502 beyond).",
    ),
    click.option(
        "--rediscover",
        type=Seconds(min=1),
        envvar=_env("rediscover"),
        show_envvar=True,
        metavar="SECONDS",
        help="Look for added or removed addresses this often (also on SIGHUP), when egress "
        "is discovered rather than named with --egress.",
    ),
    click.option(
        "--strategy",
        type=click.Choice(["round-robin", "random", "least-busy"]),
        default="round-robin",
        show_default=True,
        envvar=_env("strategy"),
        show_envvar=True,
        help="How the next egress address is chosen among those that may send.",
    ),
    click.option(
        "--host-rate",
        "host_rate",
        multiple=True,
        metavar="HOST=RATE[:BURST]",
        envvar=_env("host-rate"),
        show_envvar=True,
        help="Each egress address sends at most RATE (5/s, 300/min) to HOST (exact or "
        "*.domain); requests beyond wait in a FIFO queue per host (repeatable).",
    ),
    click.option(
        "--queue-timeout",
        type=Seconds(min=0),
        default=30.0,
        show_default=True,
        envvar=_env("queue-timeout"),
        show_envvar=True,
        help="Seconds a request may wait for an address with budget; then 503 with Retry-After.",
    ),
    click.option(
        "--ban-status",
        "ban_status",
        multiple=True,
        type=click.IntRange(400, 599),
        envvar=_env("ban-status"),
        show_envvar=True,
        help="Statuses that, like 429 and 503, cool the (address, host) pair down "
        "(repeatable, e.g. 403).",
    ),
    click.option(
        "--retries",
        type=click.IntRange(min=0, max=16),
        default=2,
        show_default=True,
        envvar=_env("retries"),
        show_envvar=True,
        help="Times an idempotent request without a body is sent again from another "
        "address after a cooling status.",
    ),
    click.option(
        "--admin",
        metavar="HOST:PORT",
        envvar=_env("admin"),
        show_envvar=True,
        help="Serve /metrics (Prometheus), /status, /status.json and /healthz here. Off by "
        "default. A non-loopback address needs --auth/--auth-file and asks for those "
        "credentials (loopback asks for none).",
    ),
    click.option(
        "--max-connections",
        type=click.IntRange(min=1),
        default=10_000,
        show_default=True,
        envvar=_env("max-connections"),
        show_envvar=True,
        help="Concurrent clients per worker; past it new connections wait in the listen "
        "backlog, they are not dropped.",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=1, max=256),
        default=_usable_cores(),
        show_default="the number of cores it may run on",
        envvar=_env("workers"),
        show_envvar=True,
        help="Processes accepting clients on the listen port (SO_REUSEPORT). Rotation stays "
        "global across them.",
    ),
    click.option(
        "--shutdown-grace",
        type=Seconds(min=0),
        default=30.0,
        show_default=True,
        envvar=_env("shutdown-grace"),
        show_envvar=True,
        help="On SIGTERM/SIGINT, seconds that requests in flight get to finish.",
    ),
)
