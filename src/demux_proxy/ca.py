"""The proxy's certificate authority.

Creates, loads and exports the CA that clients must trust, mints leaf certificates for the
hosts being intercepted, and hands out ready server-side ``ssl.SSLContext`` objects, cached
per host name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import ssl
import stat
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from demux_proxy.errors import ConfigError
from demux_proxy.tls import DirectSSLObject

CAKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Leaf contexts kept, least recently used out first. Each is about 26 KB of RSS (an
# OpenSSL SSL_CTX with its certificate and key: measured, docs/performance.md "Memory"),
# so 1,024 hosts cost ~27 MB a worker at most; a host past that mints again, ~1 ms.
_CACHE_SIZE = 1024
_LEAF_LIFETIME = timedelta(days=397)  # browsers refuse leaf certificates valid over 398 days
_RENEW_BEFORE = timedelta(days=1)  # a cached leaf this close to its end is minted again
_CA_LIFETIME = timedelta(days=3650)
_BACKDATE = timedelta(days=1)  # tolerate clients whose clocks run a little behind
# Labels of 1-63 characters (RFC 1035 2.3.4); no wildcards: SNI never has them.
_HOST_RE = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")
_PEM = serialization.Encoding.PEM
_log = logging.getLogger("demux_proxy")  # log.setup routes it into the JSON log


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _file_mode(path: Path, what: str) -> tuple[int, int]:
    """(permission bits, owner uid) of ``path``, or of its target if it is a symlink."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    return stat.S_IMODE(st.st_mode), st.st_uid


def _make_private(path: Path, mode: int, what: str) -> None:
    """Take group and others' access away from a state-dir file or the dir itself.

    A careless copy can leave the CA key 0644, and a pre-existing state dir may be 0755;
    that key signs certificates every client trusts. Ours, we fix (and say so); someone
    else's, we may not touch, so we refuse to start. Owned by another user (root aside,
    who may share a key with a service's group), it is refused whatever its mode: its
    owner could replace the CA key. Through a symlink (a key kept on another volume), the
    target is judged, never changed: a chmod through a link planted in the state dir
    could tighten any file of ours.
    """
    old, uid = _file_mode(path, what)
    me = os.getuid()
    if uid not in (me, 0):
        raise ConfigError(
            f"{what} {path} is owned by uid {uid}, not by this user (uid {me}) or root: its "
            "owner could replace the CA key; chown it, or choose another --state-dir"
        )
    if not old & 0o077:
        return
    if uid != me or path.is_symlink():
        where = path.resolve()
        raise ConfigError(
            f"{what} {path} is mode {old:04o}, open to other users"
            + (f" (through a symlink to {where})" if path.is_symlink() else "")
            + (f", and owned by uid {uid}, not us" if uid != me else "")
            + f": run `chmod {mode:o} {where}`"
            + (" as its owner" if uid != me else "")
        )
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(f"cannot chmod {what} {path}: {exc.strerror or exc}") from exc
    _log.warning("%s %s was mode %04o, open to other users: made it %04o", what, path, old, mode)


# A CA key this young without its certificate is another process creating the CA.
_CREATING_S: Final = 10.0


def _being_created(key_path: Path, cert_path: Path) -> bool:
    """Wait (bounded) for the certificate of a key another process has just written:
    True once it is there, False for a key left alone (an older one, or no cert soon)."""
    try:
        if time.time() - key_path.stat().st_mtime > _CREATING_S:
            return False
    except OSError:
        return False
    deadline = time.monotonic() + _CREATING_S
    while time.monotonic() < deadline:
        if cert_path.exists():
            return True
        time.sleep(0.05)
    return False


def _write_new(path: Path, data: bytes, mode: int, durable: bool = False) -> None:
    """Write a file that must not exist yet; the mode is set at creation, never via umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if durable:  # only the CA files must survive a crash; runtime files are throwaway
            f.flush()
            os.fsync(f.fileno())


def _private_dir() -> Path:
    """A new directory only we may enter (0700), in $TMPDIR or /tmp.

    Not tempfile.mkdtemp: tempfile imports shutil, and shutil zlib, bz2 and lzma, about
    0.7 MB resident in every serving process for one call.
    """
    base = Path(os.environ.get("TMPDIR") or "/tmp")
    for _ in range(100):
        path = base / f"demux-proxy-{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create a private directory in {base}: {exc}") from exc
        return path
    raise ConfigError(f"cannot create a private directory in {base}: every name taken")


def _remove_dir(path: Path) -> None:
    """Remove `_private_dir`'s directory and the files in it (it holds no directories)."""
    try:
        for entry in os.scandir(path):
            os.unlink(entry.path)
        os.rmdir(path)
    except OSError:
        pass  # best effort: what is left is 0700 and holds throwaway files


def _memory_file(name: str, data: bytes) -> int:
    """An anonymous in-memory file (memfd) holding `data`, owner-only, closed on exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


class _PemFiles:
    """What `ssl` reads the leaf key and each new leaf certificate from: it loads them only
    from paths.

    On Linux, anonymous in-memory files named by /proc/self/fd/N: nothing on disk for a
    /tmp cleaner (systemd-tmpfiles) to delete under a proxy that runs for weeks, and the
    key never touches a disk. Forked workers inherit the descriptors, so the paths hold
    there too. Elsewhere, a private 0700 directory in $TMPDIR, made again (with the key)
    when something removed it.
    """

    def __init__(self, key_pem: bytes) -> None:
        self._key_pem = key_pem
        self._key_fd = -1
        self._dir: Path | None = None
        self._counter = 0
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self._key_fd = _memory_file("demux-proxy-leaf-key", key_pem)
        else:
            self._dir = self._new_dir()

    def _new_dir(self) -> Path:
        path = _private_dir()
        _write_new(path / "leaf-key.pem", self._key_pem, 0o600)
        return path

    def load(self, ctx: ssl.SSLContext, cert_pem: bytes) -> None:
        """`ctx.load_cert_chain` with `cert_pem` and the leaf key. OSError when out of
        descriptors (or, off Linux, when $TMPDIR cannot be written)."""
        if self._dir is None:
            fd = _memory_file("demux-proxy-leaf", cert_pem)
            try:
                ctx.load_cert_chain(f"/proc/self/fd/{fd}", f"/proc/self/fd/{self._key_fd}")
            finally:
                os.close(fd)
            return
        if not (self._dir / "leaf-key.pem").exists():  # removed under us
            _remove_dir(self._dir)
            self._dir = self._new_dir()
        self._counter += 1  # file names never derive from the (client-chosen) host name
        # The pid keeps names apart between --workers processes sharing this directory.
        cert_file = self._dir / f"leaf-{os.getpid()}-{self._counter}.pem"
        try:
            _write_new(cert_file, cert_pem, 0o600)
            ctx.load_cert_chain(cert_file, self._dir / "leaf-key.pem")
        finally:
            cert_file.unlink(missing_ok=True)

    def close(self) -> None:
        if self._key_fd >= 0:
            os.close(self._key_fd)
            self._key_fd = -1
        if self._dir is not None:
            _remove_dir(self._dir)
            self._dir = None


def read_ca_cert(path: Path) -> bytes:
    """The PEM of a CA certificate file of the user's (--ca-cert), checked to parse."""
    data = _read(path, "CA cert")
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"cannot parse CA cert {path}: {exc}") from exc
    return data


def valid_name(name: str) -> bool:
    """Whether a leaf certificate can be made for `name` (a DNS name or an IP literal)."""
    try:
        _normalize(name)
    except ValueError:
        return False
    return True


def _normalize(name: str) -> tuple[str, IPAddress | None]:
    """Return (cache key, IP address or None) for a DNS name or IP literal."""
    host = name.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return str(ip), ip  # canonical form, so "::1" and "0::1" share a cache entry
    host = host.lower()
    if host.endswith("."):  # "a.test." is "a.test": one leaf, named without the dot
        host = host[:-1]
    if not host.isascii():
        try:  # certificates carry A-labels only
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"not a valid host name: {name!r}") from exc
    if len(host) > 253 or not _HOST_RE.fullmatch(host):
        raise ValueError(f"not a valid host name: {name!r}")
    return host, None


class CertificateAuthority:
    """A CA key and certificate, plus a cache of per-host server TLS contexts."""

    cert_path: Path
    cert_pem: bytes

    def __init__(
        self,
        cert: x509.Certificate,
        key: CAKey,
        cert_path: Path,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        self.cert_path = cert_path
        self.cert_pem = cert.public_bytes(_PEM)
        # What each leaf is sent with: this CA, then the certificates that followed it in
        # its file (the intermediates between it and a root that clients trust).
        self._chain_pem = self.cert_pem + b"".join(c.public_bytes(_PEM) for c in chain)
        self.expires = cert.not_valid_after_utc
        self._expires_ts = self.expires.timestamp()
        self._cert = cert
        self._key = key
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        # One leaf key for every host: generating a key per host would cost far more than
        # signing, and the key never leaves this process (but for `_PemFiles`: see there).
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        # host -> (its context, when to mint it again): a proxy up for a year outlives a
        # leaf, and the least recently used order alone would keep serving it expired.
        self._cache: OrderedDict[str, tuple[ssl.SSLContext, float]] = OrderedDict()
        key_pem = self._leaf_key.private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._files = _PemFiles(key_pem)
        self._cleanup = weakref.finalize(self, self._files.close)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> CertificateAuthority:
        """Load the CA kept in ``state_dir``, creating it on first use."""
        cert_path, key_path = state_dir / "ca.pem", state_dir / "ca-key.pem"
        try:
            has_cert, has_key = cert_path.exists(), key_path.exists()
        except OSError as exc:
            raise ConfigError(f"cannot access state dir {state_dir}: {exc.strerror}") from exc
        if has_cert and has_key:
            _make_private(state_dir, 0o700, "state dir")  # first: it guards the key's name
            _make_private(key_path, 0o600, "CA key")
            return cls.load(cert_path, key_path)
        if has_key and not has_cert and _being_created(key_path, cert_path):
            return cls.load_or_create(state_dir)  # another start made it meanwhile
        if has_cert or has_key:
            present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
            raise ConfigError(
                f"found {present} but not {missing}; restore it, or remove {present} "
                "to create a new CA (clients must then trust the new one)"
            )
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state dir {state_dir}: {exc.strerror}") from exc
        _make_private(state_dir, 0o700, "state dir")  # it may have existed, empty, as 0755
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_ca_cert(key)
        key_pem = key.private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            _write_new(key_path, key_pem, 0o600, durable=True)
        except FileExistsError:
            # Another start on the same fresh state dir got there first: use its CA.
            if _being_created(key_path, cert_path):
                return cls.load_or_create(state_dir)
            raise ConfigError(f"cannot write CA key {key_path}: it appeared meanwhile") from None
        except OSError as exc:
            raise ConfigError(f"cannot write CA key {key_path}: {exc.strerror}") from exc
        # The cert goes in last and via rename, so a crash never leaves a half-written cert.
        tmp = state_dir / f".ca.pem.{secrets.token_hex(4)}.tmp"
        try:
            _write_new(tmp, cert.public_bytes(_PEM), 0o644, durable=True)
            os.chmod(tmp, 0o644)  # public by design, whatever the umask
            os.replace(tmp, cert_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            key_path.unlink(missing_ok=True)  # a lone key would block the next start
            raise ConfigError(f"cannot write CA cert {cert_path}: {exc.strerror}") from exc
        return cls(cert, key, cert_path)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load an existing CA (EC or RSA key) from PEM files, checking it is usable.

        A key readable by others is refused, not fixed: it is the user's file (group access
        is fine, 0640 is how a key is shared with a service's group).
        """
        cert_data = _read(cert_path, "CA cert")
        key_mode = _file_mode(key_path, "CA key")[0]
        if key_mode & 0o007:
            raise ConfigError(
                f"CA key {key_path} is mode {key_mode:04o}, open to all users: "
                f"run `chmod 600 {key_path}` (or 640 to share it with a group)"
            )
        key_data = _read(key_path, "CA key")
        try:
            # The CA first, then what chains it to a root (a bundle, as PKI tools write it).
            cert, *chain = x509.load_pem_x509_certificates(cert_data)
        except ValueError as exc:
            raise ConfigError(f"cannot parse CA cert {cert_path}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # TypeError is what cryptography raises for a passphrase-protected key.
            raise ConfigError(f"cannot parse CA key {key_path}: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"CA key {key_path}: unsupported key type (use RSA or EC)")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        public = key.public_key().public_bytes(*spki)
        if public != cert.public_key().public_bytes(*spki):
            for n, other in enumerate(chain, start=2):
                if public == other.public_key().public_bytes(*spki):  # a bundle out of order
                    raise ConfigError(
                        f"CA cert {cert_path}: the certificate of CA key {key_path} is number "
                        f"{n} in the file; put it first, then each issuer"
                    )
            raise ConfigError(f"CA key {key_path} does not match CA cert {cert_path}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"CA cert {cert_path} is not a CA certificate (BasicConstraints)")
        if cert.not_valid_after_utc <= datetime.now(UTC):
            raise ConfigError(f"CA cert {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        for child, parent in zip([cert, *chain], chain, strict=False):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise ConfigError(
                    f"CA cert {cert_path}: {parent.subject.rfc4514_string()!r} did not issue "
                    f"{child.subject.rfc4514_string()!r}; put the CA first, then each issuer"
                ) from None
        return cls(cert, key, cert_path, chain)

    def server_context(self, name: str) -> ssl.SSLContext:
        """Return a server TLS context presenting a leaf certificate for ``name``.

        ``name`` is a DNS name or an IP literal (brackets allowed); ValueError if it is neither.
        """
        if not self._cleanup.alive:
            raise RuntimeError("CertificateAuthority is closed")
        key, ip = _normalize(name)
        # Minting below is synchronous: under asyncio nothing can run between this lookup and
        # the insert, so concurrent connections to one host mint its certificate only once.
        hit = self._cache.get(key)
        if hit is not None and hit[1] > time.time():
            self._cache.move_to_end(key)
            return hit[0]
        ctx, renew_at = self._mint(key, ip)
        self._cache[key] = (ctx, renew_at)
        self._cache.move_to_end(key)  # a renewed entry kept its old place
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return ctx

    def expired(self) -> bool:
        """Whether the CA certificate has ended: a leaf it signs now is refused by clients."""
        return time.time() >= self._expires_ts

    def _mint(self, name: str, ip: IPAddress | None) -> tuple[ssl.SSLContext, float]:
        """A context for `name`, and when to mint it again: a day before its leaf ends, or
        when it ends if the CA ends then too (no later leaf can be made)."""
        now = datetime.now(UTC)
        ends = min(now + _LEAF_LIFETIME, self.expires)
        renew_at = ends if ends == self.expires else ends - _RENEW_BEFORE
        san: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(name)
        leaf_public = self._leaf_key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(leaf_public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(ends)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_public), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.sslobject_class = DirectSSLObject  # Stream calls its C methods straight
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        self._files.load(ctx, cert.public_bytes(_PEM) + self._chain_pem)
        return ctx, renew_at.timestamp()

    def close(self) -> None:
        """Drop the leaf key's file; contexts already handed out keep working."""
        self._cleanup()
        self._cache.clear()

    def __repr__(self) -> str:
        subject = self._cert.subject.rfc4514_string()
        return f"<CertificateAuthority {subject!r} leaves={len(self._cache)}>"


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.now(UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"demux-proxy CA {secrets.token_hex(4)}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "demux-proxy"),
        ]
    )
    ku = _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
