"""Assemble the proxy from a Config and run it until SIGTERM/SIGINT.

With `workers == 1` the proxy runs in this process. With more, `workers.supervise`
forks them after everything shareable was built here once: the CA (so every worker signs
with the same leaf key), the upstream TLS context and the shared rotation cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import resource
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import TYPE_CHECKING, Any

import uvloop

from demux_proxy import __version__, log, metrics
from demux_proxy.auth import ClientPolicy, is_loopback, start_refusal
from demux_proxy.ca import CertificateAuthority
from demux_proxy.config import Config
from demux_proxy.egress import resolve_egress
from demux_proxy.errors import ConfigError, HostNotReady
from demux_proxy.exchange import Forwarder
from demux_proxy.limits import PROBE_LEASE_S, Cooldowns, RateRules, parse_host_rate
from demux_proxy.policy import DestinationPolicy
from demux_proxy.pool import Pool
from demux_proxy.route import bracketed
from demux_proxy.scheduler import Cursor, LocalCursor, Scheduler, SharedBuckets
from demux_proxy.server import ProxyServer
from demux_proxy.tls import upstream_context
from demux_proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from demux_proxy.admin import AdminServer

SESSIONS_PER_GENERATION = 1 << 32
CA_WARN_BEFORE = timedelta(days=30)


def load_ca(config: Config) -> CertificateAuthority:
    """The user's CA (--ca-cert and --ca-key: `start_refusal` saw both or neither), else
    the one in the state directory, made there at first use."""
    if config.ca_cert is not None and config.ca_key is not None:
        return CertificateAuthority.load(config.ca_cert, config.ca_key)
    return CertificateAuthority.load_or_create(config.state_dir)


def _warn_if_ending(ca: CertificateAuthority, events: log.EventLog) -> None:
    """Said at start: once the CA ends, CONNECT is refused (503) until a restart with a
    new one, and clients must trust that one first."""
    left = ca.expires - datetime.now(UTC)
    if left < CA_WARN_BEFORE:
        events.warning(
            "CA certificate expires soon: HTTPS will be refused then",
            ca=str(ca.cert_path),
            expires=ca.expires.isoformat(),
            days_left=left.days,
        )


def run(config: Config) -> None:
    """Run until a signal; raises ConfigError for anything wrong at start."""
    policy = ClientPolicy.from_options(config.auth, config.auth_file, config.allow_client)
    destinations = DestinationPolicy(
        allow_private=config.allow_private, deny=config.deny, allow_dest=config.allow_dest
    )
    listen = (config.listen_host, config.listen_port)
    refusal = start_refusal(listen, config.admin, policy, config.ca_cert, config.ca_key)
    if refusal is not None:
        raise ConfigError(refusal)
    events = log.setup(config.log_level, config.log_format)
    _raise_fd_limit()
    tune_allocator()
    metrics_dir = metrics.enable() if config.admin is not None else None
    ca = load_ca(config)
    _warn_if_ending(ca, events)
    try:
        tls = upstream_context(config.upstream_ca, insecure=config.insecure_upstream)
        shared = Shared(config, ca, tls, events, policy, destinations)
        if config.workers > 1:
            # Imported only here: one process has no use for multiprocessing.
            from demux_proxy.workers import supervise

            supervise(shared)
        else:
            uvloop.run(serve(shared, LocalCursor()))
    finally:
        events.flush(log.EXIT_WAIT_S)  # also when serving failed: the lines before it are the story
        ca.close()
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


def listen_error(host: str, port: int, exc: OSError, option: str = "") -> ConfigError:
    """The one line a user gets when a listen address (`option`'s, if not --listen's)
    cannot be had."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason = "address already in use (is another proxy running?)"
    what = f"cannot listen on {option + ' ' if option else ''}{host}:{port}: {reason}"
    if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):  # may be free, or come, later
        return HostNotReady(what)
    return ConfigError(what)


def _raise_fd_limit() -> None:
    """Each client and upstream connection is a file descriptor: the usual soft limit of
    1024 caps a proxy at a few hundred clients, so take the hard limit the host allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# glibc's malloc serves blocks of 128 KiB and more with mmap: a fresh mapping that is
# page-faulted in and unmapped on free, until its adaptive threshold has seen enough
# frees. Large bodies move in 64-512 KiB pieces, so a fresh process paid that on every
# read (a first 100 MB download: 686 MB/s, against 1253 MB/s with these settings).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # body buffers come from the heap
TRIM_THRESHOLD = 4 << 20  # free heap above this goes back to the system


def _libc(name: str) -> Any:
    """A function of the C library this process runs on, or None where there is no glibc."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Fix glibc's malloc thresholds for body-sized buffers; False where there is no glibc."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_start_up_memory() -> bool:
    """Give back the heap that start-up freed (CA and key parsing, contexts): with the trim
    threshold above, glibc would otherwise keep up to 4 MiB of it. False without glibc."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(malloc_trim(0))


def announce(events: log.EventLog, config: Config, ca: CertificateAuthority, port: int) -> None:
    fields: dict[str, object] = {
        "listen": f"{bracketed(config.listen_host)}:{port}",
        "egress": [e.address for e in config.egress],
        "ca": str(ca.cert_path),
        "workers": config.workers,
        "version": __version__,
    }
    if config.admin is not None:
        fields["admin"] = f"{bracketed(config.admin[0])}:{config.admin[1]}"
    events.emit(log.INFO, "Starting Proxy", fields)
    if config.rediscover_s and not config.egress_discovered:
        events.warning("--rediscover does nothing: the egress addresses are named with --egress")


@dataclass(frozen=True, slots=True)
class Shared:
    """What run() builds once and every worker inherits across the fork."""

    config: Config
    ca: CertificateAuthority
    tls: ssl.SSLContext
    events: log.EventLog
    policy: ClientPolicy
    destinations: DestinationPolicy


async def serve(
    shared: Shared,
    cursor: Cursor,
    *,
    worker: int = 0,
    ready: Callable[[int], None] | None = None,
    buckets: SharedBuckets | None = None,
    rediscover: bool = False,
    generation: int = 0,
) -> None:
    """One event loop's proxy: listen, serve until SIGTERM/SIGINT, drain, return.
    `rediscover`: look for the host's addresses now (a restarted worker); `generation`:
    how many workers of this index came before (for unique session ids)."""
    config, ca, tls, events = shared.config, shared.ca, shared.tls, shared.events
    policy, destinations = shared.policy, shared.destinations
    pool: Pool[UpstreamConnection] = Pool(
        max_idle_per_key=config.pool_max_idle_per_key,
        idle_s=config.pool_idle_s,
        max_idle=_max_idle_upstream(),
    )
    # Session ids stay unique across workers: worker i of N numbers i+1, i+1+N, ...; its
    # g-th replacement (a restart) starts past g * N * 2**32, above all its forerunners'.
    sessions = count(
        generation * config.workers * SESSIONS_PER_GENERATION + worker + 1, config.workers
    )
    scheduler = Scheduler(
        config.egress,
        strategy=config.strategy,
        cursor=cursor,
        rules=RateRules([parse_host_rate(r) for r in config.host_rate]),
        cooldowns=Cooldowns(probe_s=PROBE_LEASE_S),
        workers=config.workers,
        buckets=buckets,
    )
    if rediscover and config.egress_discovered:
        _rediscover(config, scheduler, events)
    recorder: metrics.Recorder = (
        metrics.Metrics(config.egress) if config.admin is not None else metrics.NoMetrics()
    )
    forwarder = Forwarder(
        config, scheduler, pool, tls, events, destinations, sessions, recorder=recorder
    )
    server = ProxyServer(config, ca, forwarder, events, policy, destinations)
    try:
        port = await server.start()
    except OSError as exc:
        raise listen_error(config.listen_host, config.listen_port, exc) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rediscovery: asyncio.Task[None] | None = None
    # SIGHUP must never kill the proxy (its default action): it re-discovers or says why not.
    loop.add_signal_handler(signal.SIGHUP, _rediscover, config, scheduler, events)
    if config.egress_discovered and config.rediscover_s:
        rediscovery = asyncio.create_task(
            _rediscover_every(config.rediscover_s, config, scheduler, events)
        )
    destinations.set_self(_own_addresses(config.listen_host), port)
    admin: AdminServer | None = None
    if config.admin is not None:
        from demux_proxy.admin import AdminServer  # with prometheus-client: only for --admin

        admin = AdminServer(
            lambda: scheduler.egress,
            policy,
            events,
            require_auth=not is_loopback(config.admin[0]),
            workers=config.workers,
        )
        try:
            admin_port = await admin.start(*config.admin)
        except OSError as exc:
            server.close_listener()
            raise listen_error(*config.admin, exc, option="--admin") from exc
        config = replace(config, admin=(config.admin[0], admin_port))
    if ready is None:
        announce(events, config, ca, port)
    else:
        ready(port)
    release_start_up_memory()
    pruner = asyncio.create_task(_prune(pool, scheduler, config.pool_idle_s, recorder))
    try:
        await stop.wait()
        events.info("Stopping Proxy", grace_s=config.shutdown_grace_s, worker=worker)
        await server.shutdown()
    finally:
        for task in (pruner, rediscovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        pool.close_all()
        server.close_listener()
        if admin is not None:
            admin.close()
    events.info("Proxy stopped", worker=worker)
    events.flush(log.EXIT_WAIT_S)


def _max_idle_upstream() -> int:
    """Idle upstream connections kept in all: a quarter of the descriptors the process
    may open, so that clients and connections in use always have the rest."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft // 4)


def _own_addresses(listen_host: str) -> set[str]:
    """The addresses a request could reach this listener on (all of them for a wildcard)."""
    if listen_host not in ("0.0.0.0", "::"):
        return {listen_host}
    import psutil  # only for a wildcard listener: the serving process does without it

    return {
        a.address.split("%", 1)[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }


def _rediscover(config: Config, scheduler: Scheduler, events: log.EventLog) -> None:
    """Pick up addresses added to or removed from the host, without a restart."""
    if not config.egress_discovered:
        events.info("SIGHUP: egress addresses are named with --egress; nothing to re-discover")
        return
    skipped: list[str] = []  # a named interface gone down or away: its addresses go
    try:
        found = resolve_egress([], config.egress_interfaces, skipped=skipped)
    except ConfigError as exc:  # no address left: keep the old list, say why
        events.error("egress re-discovery found nothing usable", error=str(exc), down=skipped)
        return
    if skipped:
        events.warning("egress interfaces down or gone: their addresses left out", down=skipped)
    added, removed = scheduler.update(found)
    if added or removed:
        events.info("egress addresses changed", added=added, removed=removed)


async def _rediscover_every(
    seconds: float, config: Config, scheduler: Scheduler, events: log.EventLog
) -> None:
    while True:
        await asyncio.sleep(seconds)
        _rediscover(config, scheduler, events)


async def _prune(
    pool: Pool[UpstreamConnection],
    scheduler: Scheduler,
    every_s: float,
    recorder: metrics.Recorder,
) -> None:
    """Housekeeping every few seconds: idle pools, expired cooldowns, the gauges."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(min(2.0, max(1.0, every_s / 3)))
        pool.prune()
        now = loop.time()
        scheduler.cooldowns.prune(now)
        scheduler.health.prune(now)
        recorder.pooled(pool.idle_by_egress())
        recorder.cooling(scheduler.cooldowns.cooling_by_egress(now))
