"""Assemble the proxy from a Config and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import ssl

import uvloop

from demux_proxy import __version__, log
from demux_proxy.ca import CertificateAuthority
from demux_proxy.config import Config
from demux_proxy.errors import ConfigError
from demux_proxy.exchange import Forwarder
from demux_proxy.pool import Pool
from demux_proxy.scheduler import RoundRobin
from demux_proxy.server import ProxyServer
from demux_proxy.tls import upstream_context
from demux_proxy.upstream import UpstreamConnection


def load_ca(config: Config) -> CertificateAuthority:
    if config.ca_cert is not None or config.ca_key is not None:
        if config.ca_cert is None or config.ca_key is None:
            raise ConfigError("--ca-cert and --ca-key go together: give both or neither")
        return CertificateAuthority.load(config.ca_cert, config.ca_key)
    return CertificateAuthority.load_or_create(config.state_dir)


def run(config: Config) -> None:
    """Run until a signal; raises ConfigError for anything wrong at start."""
    events = log.setup(config.log_level, config.log_format)
    ca = load_ca(config)
    tls = upstream_context(config.upstream_ca, insecure=config.insecure_upstream)
    try:
        uvloop.run(_main(config, ca, tls, events))
    finally:
        ca.close()


async def _main(
    config: Config,
    ca: CertificateAuthority,
    tls: ssl.SSLContext,
    events: log.EventLog,
) -> None:
    pool: Pool[UpstreamConnection] = Pool(
        max_idle_per_key=config.pool_max_idle_per_key, idle_s=config.pool_idle_s
    )
    forwarder = Forwarder(config, RoundRobin(config.egress), pool, tls, events)
    server = ProxyServer(config, ca, forwarder, events)
    try:
        listener = await server.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use (is another proxy running?)"
        raise ConfigError(
            f"cannot listen on {config.listen_host}:{config.listen_port}: {reason}"
        ) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = listener.sockets[0].getsockname()[1]
    events.info(
        "Starting Proxy",
        listen=f"{config.listen_host}:{port}",
        egress=[e.address for e in config.egress],
        ca=str(ca.cert_path),
        version=__version__,
    )
    pruner = asyncio.create_task(_prune(pool, config.pool_idle_s))
    try:
        await stop.wait()
        events.info("Stopping Proxy", grace_s=config.shutdown_grace_s)
        await server.shutdown()
    finally:
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner
        pool.close_all()
        listener.close()
    events.info("Proxy stopped")


async def _prune(pool: Pool[UpstreamConnection], every_s: float) -> None:
    while True:
        await asyncio.sleep(max(1.0, every_s / 3))
        pool.prune()
