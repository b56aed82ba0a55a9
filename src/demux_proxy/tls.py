"""TLS contexts towards upstream servers (verifying by default), and the SSLObject both
sides of the proxy use."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demux_proxy.errors import ConfigError

# OpenSSL's hashed-directory names: <8 hex digits of the subject hash>.<n>
_HASHED = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
# A fatal no_application_protocol alert (RFC 7301 3.2), as a TLS record.
NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"
_ALPN_EXTENSION = 16


def first_record_size(data: bytes | bytearray) -> int:
    """How many bytes the TLS record at the start of `data` takes with its header (5
    while the header itself is not all there), at most one record's limit (RFC 8446
    5.1: 2^14 bytes of plaintext; a larger length is OpenSSL's to refuse)."""
    if len(data) < 5:
        return 5
    return 5 + min(int.from_bytes(data[3:5]), 1 << 14)


def offered_alpn(data: bytes | bytearray) -> list[bytes] | None:
    """The protocol names (ALPN, RFC 7301 3.1) of the TLS ClientHello at the start of
    `data`; None where it offers none, or `data` does not hold all of a well-formed one
    in its first record (then the handshake goes on as usual, and OpenSSL judges)."""
    try:
        if data[0] != 0x16:
            return None
        size = int.from_bytes(data[3:5])
        record = bytes(data[5 : 5 + size])
        if len(record) < size or record[0] != 1:  # client_hello
            return None
        size = int.from_bytes(record[1:4])
        hello = record[4 : 4 + size]
        if len(hello) < size:
            return None
        i = 2 + 32  # legacy_version, random
        i += 1 + hello[i]  # legacy_session_id
        i += 2 + int.from_bytes(hello[i : i + 2])  # cipher_suites
        i += 1 + hello[i]  # legacy_compression_methods
        end = i + 2 + int.from_bytes(hello[i : i + 2])
        i += 2
        if end > len(hello):
            return None
        while i + 4 <= end:
            kind = int.from_bytes(hello[i : i + 2])
            size = int.from_bytes(hello[i + 2 : i + 4])
            i += 4
            if kind == _ALPN_EXTENSION:
                names = hello[i + 2 : i + size]  # after the list's own length
                offered = []
                j = 0
                while j < len(names):
                    offered.append(names[j + 1 : j + 1 + names[j]])
                    j += 1 + names[j]
                return offered
            i += size
    except IndexError:
        pass
    return None


def upstream_context(
    extra_ca: Path | None,
    *,
    insecure: bool,
    system: ssl.DefaultVerifyPaths | None = None,
) -> ssl.SSLContext:
    """Verify upstream certificates against the system store, else certifi, plus `extra_ca`.

    The original tool skipped verification, which made the proxy a downgrade: a client
    that trusts our CA could no longer tell a real server from an impostor.

    The system store is used as a hashed directory where the host has one: OpenSSL then
    reads an issuer's certificate when a chain first needs it, instead of parsing the
    whole bundle (about 140 certificates, 2.5 MB of every process's memory) at start.
    `system` is where the store lives (the default: what OpenSSL was built with).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    _load_system_store(ctx, system or ssl.get_default_verify_paths())
    if extra_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(extra_ca))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot load --upstream-ca {extra_ca}: {reason}") from exc
    return ctx


def _load_system_store(ctx: ssl.SSLContext, paths: ssl.DefaultVerifyPaths) -> None:
    if os.environ.get(paths.openssl_cafile_env) or os.environ.get(paths.openssl_capath_env):
        ctx.load_default_certs()  # SSL_CERT_FILE / SSL_CERT_DIR: what the user set, as set
        return
    if paths.capath and _is_hashed_dir(paths.capath):
        ctx.load_verify_locations(capath=paths.capath)  # read lazily, per issuer
    elif paths.cafile and Path(paths.cafile).exists():
        ctx.load_verify_locations(cafile=paths.cafile)
    else:
        import certifi  # only where the host has no store at all

        ctx.load_verify_locations(cafile=certifi.where())


def _is_hashed_dir(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return any(_HASHED.match(entry.name) for entry in entries)
    except OSError:
        return False


class DirectSSLObject(ssl.SSLObject):
    """An `ssl.SSLObject` whose `read`, `write` and `pending` are the C methods themselves.

    `ssl.SSLObject` wraps each of them in an interpreted method that only forwards to the
    C object (`_ssl._SSLSocket`). uvloop's TLS transport fetches these three methods once
    per connection, and `Stream` does too, so every record then skips an interpreted
    call: about 3,700 instructions per intercepted request (docs/performance.md).
    Installed as `SSLContext.sslobject_class` (the documented way to choose what
    `wrap_bio` returns) on every context of the proxy. Where the C object is not there
    (another Python), the stdlib methods are used.
    """

    @property
    def read(self) -> Callable[..., Any]:
        return _inner(self, "read") or super().read

    @property
    def write(self) -> Callable[..., Any]:
        return _inner(self, "write") or super().write

    @property
    def pending(self) -> Callable[[], int]:
        return _inner(self, "pending") or super().pending


def _inner(obj: ssl.SSLObject, name: str) -> Callable[..., Any] | None:
    inner = getattr(obj, "_sslobj", None)
    method: Callable[..., Any] | None = getattr(inner, name, None)
    return method
