"""One frozen, typed Config: every option of `demux-proxy start`, units in the names."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from demux_proxy.egress import Egress
from demux_proxy.errors import ConfigError
from demux_proxy.http1.parser import DEFAULT_MAX_HEAD_BYTES

DEFAULT_LISTEN = "127.0.0.1:8080"
EnvSource = tuple[str, str, tuple[str, ...]]  # (--option, its variable, values it gave)


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str
    listen_port: int
    egress: tuple[Egress, ...]
    state_dir: Path
    allow_private: bool = False
    # Who may use the proxy: --auth USER:PASS, --auth-file, --allow-client CIDR.
    auth: tuple[str, ...] = ()
    auth_file: Path | None = None
    allow_client: tuple[str, ...] = ()
    # Destination rules beyond the default refusals: HOST, *.DOMAIN or CIDR each.
    deny: tuple[str, ...] = ()
    allow_dest: tuple[str, ...] = ()
    upstream_ca: Path | None = None
    insecure_upstream: bool = False
    ca_cert: Path | None = None
    ca_key: Path | None = None
    # Processes accepting on the listen port (SO_REUSEPORT); 1 runs in this process.
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"
    # Waits, each bounded. Connect and handshake are short: a healthy server answers a SYN
    # in milliseconds; 10 s covers a slow path without pinning a client for minutes.
    connect_timeout_s: float = 10.0
    # Time to the upstream's response head: generous, as slow APIs take tens of seconds.
    response_timeout_s: float = 120.0
    # No byte either way for this long mid-body: the transfer is declared dead.
    idle_timeout_s: float = 120.0
    # An idle client keep-alive connection is closed after this (nginx: 75 s).
    client_idle_timeout_s: float = 75.0
    # Once a request's first byte is in, its whole head must follow within this
    # (slowloris); TLS handshakes towards clients get the handshake bound.
    head_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    # SIGTERM: requests in flight get this long to finish before they are cut.
    shutdown_grace_s: float = 30.0
    # Idle upstream connections kept per (egress, scheme, host, port) and for how long:
    # below nginx's 75 s; a server that says a shorter one in Keep-Alive (Apache, Node:
    # 5 s) has its connections retired a second before it (exchange, pool.Pooled). One
    # that died anyway is detected by its EOF, and an idempotent request retried once.
    pool_max_idle_per_key: int = 16
    pool_idle_s: float = 30.0
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    # Concurrent client connections per worker; past it, new ones wait in the listen
    # backlog (not dropped) until one ends.
    max_connections: int = 10_000
    # Scheduling (see scheduler.py): strategy, per-host budgets, the queue for budget,
    # statuses that cool an (address, host) pair down, transparent retries.
    strategy: str = "round-robin"
    # Egress found by discovery (no --egress given) is looked for again on SIGHUP and,
    # when set, every rediscover_s seconds; egress_interfaces narrows the search.
    egress_discovered: bool = False
    egress_interfaces: tuple[str, ...] = ()
    rediscover_s: float | None = None
    host_rate: tuple[str, ...] = ()
    queue_timeout_s: float = 30.0
    ban_status: tuple[int, ...] = ()
    retries: int = 2
    # --admin HOST:PORT: /metrics, /status, /status.json, /healthz; None when off.
    admin: tuple[str, int] | None = None
    # The options the environment set (options.env_sources): errors at start name them.
    env_sources: tuple[EnvSource, ...] = ()


def env_note(message: str, sources: Iterable[EnvSource]) -> str:
    """`message`, naming the variable that set the option it is about when that came from
    the environment, as click does for its own errors: a unit file or container sets it,
    far from any command line. An option is about it when the message names it or quotes
    one of its values ("not an IP address: '10.0.0.300'")."""
    for option, variable, values in sources:
        if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", message) or any(
            repr(value) in message for value in values
        ):
            return f"{message} (env var: {variable!r})"
    return message


def parse_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (every IPv4 address) into (host, port)."""
    value = value.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{option} wants HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "":
        host = "0.0.0.0"
    elif host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{option} host must be an IP address, got {host!r}") from None
    return host, int(port_text)


def default_state_dir() -> Path:
    """$XDG_DATA_HOME/demux-proxy, else ~/.local/share/demux-proxy (XDG base directory spec:
    a relative $XDG_DATA_HOME is invalid and is ignored, not read from the current one)."""
    base = os.environ.get("XDG_DATA_HOME")
    if base and os.path.isabs(base):
        return Path(base) / "demux-proxy"
    return Path.home() / ".local" / "share" / "demux-proxy"
