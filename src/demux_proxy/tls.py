"""TLS contexts towards upstream servers: verifying by default."""

from __future__ import annotations

import ssl
from pathlib import Path

import certifi

from demux_proxy.errors import ConfigError


def upstream_context(extra_ca: Path | None, *, insecure: bool) -> ssl.SSLContext:
    """Verify upstream certificates against the system store, else certifi, plus `extra_ca`.

    The original tool skipped verification, which made the proxy a downgrade: a client
    that trusts our CA could no longer tell a real server from an impostor.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if not ctx.get_ca_certs() and not _system_store_present():
        ctx.load_verify_locations(cafile=certifi.where())
    if extra_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(extra_ca))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot load --upstream-ca {extra_ca}: {reason}") from exc
    return ctx


def _system_store_present() -> bool:
    paths = ssl.get_default_verify_paths()
    return any(p and Path(p).exists() for p in (paths.cafile, paths.capath))
