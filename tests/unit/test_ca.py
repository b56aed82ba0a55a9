"""Tests for demux_proxy.ca: real files, real certificates, real TLS handshakes (no mocks)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from demux_proxy import ca as ca_module
from demux_proxy.ca import CertificateAuthority
from demux_proxy.errors import ConfigError
from tests.cas import rsa_ca, write_ca
from tests.netns import ipv6_loopback_available

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.load_or_create(tmp_path / "state")
    yield authority
    authority.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _client_ctx(authority: CertificateAuthority, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=authority.cert_pem.decode())
    ctx.check_hostname = check_hostname  # the chain is verified either way (CERT_REQUIRED)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_hostname: str | None,
    family: socket.AddressFamily = socket.AF_INET,
) -> tuple[x509.Certificate, str | None, bytes]:
    """Run one TLS connection; return the server's cert, the ALPN protocol and data read."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    server_errors: list[BaseException] = []
    with socket.create_server((host, 0), family=family) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            # Exceptions are collected, not raised: an unhandled thread exception would turn
            # into a pytest warning, and the client side reports the failure anyway.
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except BaseException as exc:
                server_errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection((host, port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                alpn = tls.selected_alpn_protocol()
                data = tls.recv(5)
        finally:
            thread.join(10)
    assert der is not None
    assert not server_errors, server_errors
    return x509.load_der_x509_certificate(der), alpn, data


def _leaf(authority: CertificateAuthority, name: str) -> x509.Certificate:
    """The leaf certificate served for ``name``, fetched over a chain-verified connection."""
    client = _client_ctx(authority, check_hostname=False)
    return _handshake(authority.server_context(name), client, None)[0]


def _ca_cert(authority: CertificateAuthority) -> x509.Certificate:
    return x509.load_pem_x509_certificate(authority.cert_pem)


@pytest.fixture
def warnings_seen(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """caplog for the "demux_proxy" logger, even after log.setup() stopped its propagation."""
    monkeypatch.setattr(logging.getLogger("demux_proxy"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="demux_proxy")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "demux_proxy" and r.levelno == logging.WARNING
    ]


# --- load_or_create -------------------------------------------------------------------------


def test_load_or_create_makes_private_files(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    first = CertificateAuthority.load_or_create(state)
    try:
        assert _mode(state) == 0o700
        assert _mode(state / "ca-key.pem") == 0o600
        assert _mode(state / "ca.pem") == 0o644
        assert first.cert_path == state / "ca.pem"
        assert x509.load_pem_x509_certificate((state / "ca.pem").read_bytes()) == _ca_cert(first)
        assert sorted(p.name for p in state.iterdir()) == ["ca-key.pem", "ca.pem"]
    finally:
        first.close()
    second = CertificateAuthority.load_or_create(state)
    try:
        assert second.cert_pem == first.cert_pem
    finally:
        second.close()


def test_created_ca_certificate_fields(ca: CertificateAuthority) -> None:
    cert = _ca_cert(ca)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str)
    assert cn.startswith("demux-proxy CA ")
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert org == "demux-proxy"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3652)
    assert "demux-proxy CA" in repr(ca) and "leaves=0" in repr(ca)


@pytest.mark.parametrize("missing", ["ca.pem", "ca-key.pem"])
def test_load_or_create_refuses_half_a_ca(tmp_path: Path, missing: str) -> None:
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    (state / missing).unlink()
    with pytest.raises(ConfigError, match=missing):
        CertificateAuthority.load_or_create(state)


def test_garbage_key_file_names_the_path(tmp_path: Path) -> None:
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    key_path = state / "ca-key.pem"
    key_path.write_bytes(b"not a key at all\n")
    with pytest.raises(ConfigError, match="cannot parse CA key") as info:
        CertificateAuthority.load_or_create(state)
    assert str(key_path) in str(info.value)


def test_garbage_cert_file_names_the_path(tmp_path: Path) -> None:
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    (state / "ca.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(ConfigError, match="cannot parse CA cert") as info:
        CertificateAuthority.load_or_create(state)
    assert str(state / "ca.pem") in str(info.value)


def test_load_or_create_tightens_an_open_key(
    tmp_path: Path, warnings_seen: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    key_path = state / "ca-key.pem"
    key_path.chmod(0o644)  # a careless copy
    CertificateAuthority.load_or_create(state).close()
    assert _mode(key_path) == 0o600
    [line] = _warnings(warnings_seen)
    assert str(key_path) in line and "0644" in line and "0600" in line


def test_load_or_create_tightens_an_open_state_dir(
    tmp_path: Path, warnings_seen: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    state.chmod(0o755)
    CertificateAuthority.load_or_create(state).close()
    assert _mode(state) == 0o700
    assert _mode(state / "ca-key.pem") == 0o600  # was already: no second warning
    [line] = _warnings(warnings_seen)
    assert str(state) in line and "0755" in line and "0700" in line


def test_load_or_create_tightens_an_open_empty_state_dir(
    tmp_path: Path, warnings_seen: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # whatever the umask
    CertificateAuthority.load_or_create(state).close()
    assert _mode(state) == 0o700
    assert _mode(state / "ca-key.pem") == 0o600
    assert len(_warnings(warnings_seen)) == 1


def test_load_or_create_judges_a_symlinked_key_by_its_target_and_never_changes_it(
    tmp_path: Path, warnings_seen: pytest.LogCaptureFixture
) -> None:
    """A key kept elsewhere is used through its link; open to others, it is refused, not
    tightened: a chmod through a link in the state dir could reach any file of ours (as
    root, a reviewer's link to /etc/shadow made it 0600)."""
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    key_path, target = state / "ca-key.pem", tmp_path / "elsewhere-key.pem"
    key_path.rename(target)
    key_path.symlink_to(target)
    CertificateAuthority.load_or_create(state).close()  # 0600 behind the link: used
    target.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        CertificateAuthority.load_or_create(state)
    assert f"chmod 600 {target}" in str(info.value) and "symlink" in str(info.value)
    assert _mode(target) == 0o644
    assert key_path.is_symlink() and not _warnings(warnings_seen)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root: only root can chown to another uid")
@pytest.mark.parametrize(
    ("name", "mode"),
    [("ca-key.pem", 0o644), ("ca-key.pem", 0o600), ("", 0o755), ("", 0o700)],
    ids=["open-key", "key", "open-dir", "dir"],
)
def test_load_or_create_refuses_files_of_another_user(tmp_path: Path, name: str, mode: int) -> None:
    """Whoever owns the state dir or the key can replace the key: refused whatever the
    mode (a 0700 state dir of another user was used, a key of theirs loaded)."""
    state = tmp_path / "state"
    CertificateAuthority.load_or_create(state).close()
    path = state / name if name else state
    try:
        os.chown(path, 12345, -1)
    except OSError as exc:  # e.g. a user namespace that maps no uid 12345
        pytest.skip(f"cannot chown to uid 12345: {exc}")
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        CertificateAuthority.load_or_create(state)
    message = str(info.value)
    assert str(path) in message and "owned by uid 12345" in message
    assert _mode(path) == mode  # not ours: left alone


# --- load -----------------------------------------------------------------------------------


def test_load_missing_or_unreadable_file(tmp_path: Path) -> None:
    tca = trustme.CA()
    cert_path, key_path = write_ca(tmp_path, tca.cert_pem.bytes(), tca.private_key_pem.bytes())
    with pytest.raises(ConfigError, match=r"cannot read CA key .*nope\.pem: No such file"):
        CertificateAuthority.load(cert_path, tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=f"cannot read CA cert {tmp_path}: Is a directory"):
        CertificateAuthority.load(tmp_path, key_path)


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_load_trustme_ca(tmp_path: Path, key_type: trustme.KeyType) -> None:
    tca = trustme.CA(key_type=key_type)
    cert_path, key_path = write_ca(tmp_path, tca.cert_pem.bytes(), tca.private_key_pem.bytes())
    authority = CertificateAuthority.load(cert_path, key_path)
    try:
        assert authority.cert_path == cert_path
        # The trustme client config trusts only that CA, so success proves who signed the leaf.
        client = ssl.create_default_context()
        tca.configure_trust(client)
        _, _, data = _handshake(authority.server_context("trustme.test"), client, "trustme.test")
        assert data == b"hello"
    finally:
        authority.close()


def test_an_intermediate_ca_sends_its_chain(tmp_path: Path) -> None:
    """--ca-cert holding an intermediate CA and the one above it (a root clients trust
    is above both): the leaf went out with the first only, which no client could chain
    to the root. Each certificate after the first goes out with every leaf."""
    root = trustme.CA()
    upper = root.create_child_ca()
    lower = upper.create_child_ca()
    bundle = lower.cert_pem.bytes() + upper.cert_pem.bytes()
    cert_path, key_path = write_ca(tmp_path, bundle, lower.private_key_pem.bytes())
    authority = CertificateAuthority.load(cert_path, key_path)
    try:
        assert authority.cert_pem == lower.cert_pem.bytes()  # the CA itself, as before
        client = ssl.create_default_context()
        root.configure_trust(client)  # the root only
        _, _, data = _handshake(authority.server_context("chain.test"), client, "chain.test")
        assert data == b"hello"
    finally:
        authority.close()
    # Out of order, or with a stranger in it, the file is refused with what to do (the
    # first said the key did not match, which it does, only not the first certificate).
    for bad, what in (
        (upper.cert_pem.bytes() + lower.cert_pem.bytes(), "is number 2 in the file; put it first"),
        (bundle + trustme.CA().cert_pem.bytes(), "did not issue"),
    ):
        cert_path.write_bytes(bad)
        with pytest.raises(ConfigError, match=what):
            CertificateAuthority.load(cert_path, key_path)


@pytest.mark.parametrize("mode", [0o604, 0o644, 0o602], ids=oct)
def test_load_refuses_a_key_open_to_others(tmp_path: Path, mode: int) -> None:
    tca = trustme.CA()
    cert_path, key_path = write_ca(tmp_path, tca.cert_pem.bytes(), tca.private_key_pem.bytes())
    key_path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        CertificateAuthority.load(cert_path, key_path)
    assert str(key_path) in str(info.value) and f"{mode:04o}" in str(info.value)
    assert _mode(key_path) == mode  # the user's file: refused, not changed


def test_load_refuses_a_symlink_to_an_open_key(tmp_path: Path) -> None:
    tca = trustme.CA()
    cert_path, target = write_ca(tmp_path, tca.cert_pem.bytes(), tca.private_key_pem.bytes())
    target.chmod(0o604)
    link = tmp_path / "link-key.pem"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="chmod 600"):
        CertificateAuthority.load(cert_path, link)


def test_load_accepts_a_group_readable_key(tmp_path: Path) -> None:
    # Passes on the old code too: it guards against a check stricter than asked for.
    tca = trustme.CA()
    cert_path, key_path = write_ca(tmp_path, tca.cert_pem.bytes(), tca.private_key_pem.bytes())
    key_path.chmod(0o640)  # how a key is shared with a service's group
    link = tmp_path / "link-key.pem"
    link.symlink_to(key_path)  # a symlink (itself 0777) is judged by its target
    for path in (key_path, link):
        CertificateAuthority.load(cert_path, path).close()
    assert _mode(key_path) == 0o640


def test_load_refuses_non_ca_certificate(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("leaf.test")
    cert_path, key_path = write_ca(
        tmp_path, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()
    )
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        CertificateAuthority.load(cert_path, key_path)


def test_load_refuses_mismatched_key(tmp_path: Path) -> None:
    cert_path, key_path = write_ca(
        tmp_path, trustme.CA().cert_pem.bytes(), trustme.CA().private_key_pem.bytes()
    )
    with pytest.raises(ConfigError, match="does not match"):
        CertificateAuthority.load(cert_path, key_path)


def test_load_refuses_expired_ca(tmp_path: Path) -> None:
    cert_pem, key_pem = rsa_ca(timedelta(seconds=-1), with_ski=True)
    with pytest.raises(ConfigError, match="expired"):
        CertificateAuthority.load(*write_ca(tmp_path, cert_pem, key_pem))


@pytest.mark.parametrize("with_ski", [True, False])
def test_rsa_ca_signs_verifiable_leaves(tmp_path: Path, with_ski: bool) -> None:
    cert_pem, key_pem = rsa_ca(timedelta(days=30), with_ski=with_ski)
    authority = CertificateAuthority.load(*write_ca(tmp_path, cert_pem, key_pem))
    try:
        leaf, _, data = _handshake(
            authority.server_context("rsa.test"), _client_ctx(authority), "rsa.test"
        )
        assert data == b"hello"
        ca_cert = _ca_cert(authority)
        assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
        leaf.verify_directly_issued_by(ca_cert)
        # Without a CA SKI the AKI falls back to the hash of the CA public key: same value.
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        expected = x509.SubjectKeyIdentifier.from_public_key(ca_cert.public_key()).digest
        assert aki.key_identifier == expected
        # A leaf must not outlive its CA (which here expires in 30 days).
        assert leaf.not_valid_after_utc == ca_cert.not_valid_after_utc
    finally:
        authority.close()


# --- server_context and leaves --------------------------------------------------------------


def test_handshake_with_dns_name(ca: CertificateAuthority) -> None:
    _, alpn, data = _handshake(ca.server_context("example.test"), _client_ctx(ca), "example.test")
    assert data == b"hello"
    assert alpn is None  # the client offered no ALPN
    client = _client_ctx(ca)
    client.set_alpn_protocols(["h2", "http/1.1"])
    _, alpn, _ = _handshake(ca.server_context("example.test"), client, "example.test")
    assert alpn == "http/1.1"


def test_hostname_verification_is_really_on(ca: CertificateAuthority) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca.server_context("example.test"), _client_ctx(ca), "other.test")


def test_context_settings(ca: CertificateAuthority) -> None:
    # Checked on the object: a TLS 1.1 client cannot even be built without a
    # DeprecationWarning, and OpenSSL's own security level may refuse it client-side.
    ctx = ca.server_context("example.test")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER


def test_handshake_with_ipv4_literal(ca: CertificateAuthority) -> None:
    # check_hostname is on: Python verifies an IP server_hostname against IP SANs.
    leaf, _, data = _handshake(ca.server_context("127.0.0.1"), _client_ctx(ca), "127.0.0.1")
    assert data == b"hello"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_ipv6_literal_with_and_without_brackets(ca: CertificateAuthority) -> None:
    ctx = ca.server_context("[::1]")
    assert ca.server_context("::1") is ctx
    assert ca.server_context("0:0::1") is ctx
    leaf = _leaf(ca, "::1")  # fetched over IPv4, so this part runs everywhere
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["::1"]
    if ipv6_loopback_available():
        _, _, data = _handshake(ctx, _client_ctx(ca), "::1", family=socket.AF_INET6)
        assert data == b"hello"


def test_leaf_certificate_fields(ca: CertificateAuthority) -> None:
    leaf = _leaf(ca, "www.example.test")
    ca_cert = _ca_cert(ca)
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.test"]
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "www.example.test"
    assert leaf.issuer == ca_cert.subject
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(days=398)
    assert leaf.not_valid_before_utc < datetime.now(UTC) < leaf.not_valid_after_utc
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    leaf.verify_directly_issued_by(ca_cert)


def test_long_name_truncates_only_the_common_name(ca: CertificateAuthority) -> None:
    name = ".".join(["a" * 60, "b" * 60, "example", "test"])
    leaf = _leaf(ca, name)
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == name[:64]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]


def test_all_leaves_share_one_key_but_not_serials(ca: CertificateAuthority) -> None:
    leaves = [_leaf(ca, name) for name in ("a.test", "b.test", "10.1.2.3")]
    assert len({leaf.public_key().public_bytes(*SPKI) for leaf in leaves}) == 1
    assert len({leaf.serial_number for leaf in leaves}) == 3
    other = CertificateAuthority.load_or_create(ca.cert_path.parent)
    try:  # a second instance (same CA) has its own leaf key
        assert _leaf(other, "a.test").public_key() != leaves[0].public_key()
    finally:
        other.close()


def test_a_cached_leaf_is_minted_again_before_it_ends(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache kept a context until pushed out: a proxy up longer than a leaf lives
    served it expired. Within a day of its end, it is minted anew."""
    monkeypatch.setattr(ca_module, "_LEAF_LIFETIME", ca_module._RENEW_BEFORE + timedelta(seconds=1))
    ctx = ca.server_context("renew.test")
    assert ca.server_context("renew.test") is ctx
    time.sleep(1.1)
    fresh = ca.server_context("renew.test")
    assert fresh is not ctx
    assert ca.server_context("renew.test") is fresh


def test_leaves_end_with_the_ca_and_are_kept_until_then(tmp_path: Path) -> None:
    """No leaf outlives its CA, nor is minted again each time in the CA's last day."""
    cert_pem, key_pem = rsa_ca(timedelta(seconds=2), with_ski=True)
    authority = CertificateAuthority.load(*write_ca(tmp_path, cert_pem, key_pem))
    try:
        assert not authority.expired()
        ctx = authority.server_context("short.test")
        assert authority.server_context("short.test") is ctx
        leaf = _leaf(authority, "short.test")
        assert (
            leaf.not_valid_after_utc == authority.expires == _ca_cert(authority).not_valid_after_utc
        )
        time.sleep(max(0.0, (authority.expires - datetime.now(UTC)).total_seconds()) + 0.1)
        assert authority.expired()
    finally:
        authority.close()


def test_contexts_are_cached_case_insensitively(ca: CertificateAuthority) -> None:
    ctx = ca.server_context("Example.Test")
    assert ca.server_context("example.test") is ctx
    assert ca.server_context("EXAMPLE.TEST") is ctx
    assert ca.server_context("other.test") is not ctx
    assert "leaves=2" in repr(ca)


def test_a_fully_qualified_name_shares_the_leaf_named_without_the_dot(
    ca: CertificateAuthority,
) -> None:
    ctx = ca.server_context("a.test.")
    assert ca.server_context("A.Test") is ctx
    san = _leaf(ca, "a.test.").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["a.test"]
    _, _, data = _handshake(ctx, _client_ctx(ca), "a.test")
    assert data == b"hello"


def test_cache_is_lru_bounded(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_module, "_CACHE_SIZE", 2)
    a = ca.server_context("a.test")
    b = ca.server_context("b.test")
    assert ca.server_context("a.test") is a  # now b is the least recently used
    ca.server_context("c.test")
    assert ca.server_context("a.test") is a
    assert ca.server_context("b.test") is not b
    assert "leaves=2" in repr(ca)


@pytest.mark.parametrize(
    "bad", ["", "two words.test", "a/b.test", "a..test", "a.test..", ".", "*.example.test"]
)
def test_invalid_names_are_refused(ca: CertificateAuthority, bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid host name"):
        ca.server_context(bad)


def test_unicode_name_becomes_a_label(ca: CertificateAuthority) -> None:
    leaf = _leaf(ca, "bücher.test")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.test"]


def _tmp_entries() -> set[str]:
    base = Path(os.environ.get("TMPDIR") or "/tmp")
    return {p.name for p in base.iterdir() if p.name.startswith("demux-proxy-")}


def test_the_leaf_key_lives_in_memory_only(tmp_path: Path) -> None:
    """Nothing in $TMPDIR (a /tmp cleaner could delete it under a proxy that runs for
    weeks): the key is an owner-only memory file, dropped on close."""
    before = _tmp_entries()
    authority = CertificateAuthority.load_or_create(tmp_path / "state")
    ctx = authority.server_context("example.test")
    assert _tmp_entries() == before
    key_fd = authority._files._key_fd
    assert os.readlink(f"/proc/self/fd/{key_fd}").startswith("/memfd:demux-proxy-leaf-key")
    assert stat.S_IMODE(os.fstat(key_fd).st_mode) == 0o600
    assert os.get_inheritable(key_fd) is False  # not handed to anything exec'd
    authority.close()
    authority.close()  # idempotent
    assert not os.path.exists(f"/proc/self/fd/{key_fd}") or not os.readlink(
        f"/proc/self/fd/{key_fd}"
    ).startswith("/memfd:demux-proxy-leaf-key")
    with pytest.raises(RuntimeError, match="closed"):
        authority.server_context("example.test")
    # Contexts handed out before close() hold their key in memory and keep working.
    _, _, data = _handshake(ctx, _client_ctx(authority), "example.test")
    assert data == b"hello"


def test_without_memory_files_a_removed_runtime_dir_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off Linux: a private directory, made again with the key when a cleaner removed it."""
    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    authority = CertificateAuthority.load_or_create(tmp_path / "state")
    runtime = authority._files._dir
    assert runtime is not None and runtime.parent == tmp_path
    assert _mode(runtime) == 0o700 and _mode(runtime / "leaf-key.pem") == 0o600
    authority.server_context("a.test")
    assert [p.name for p in runtime.iterdir()] == ["leaf-key.pem"]  # leaf files go at once
    for entry in runtime.iterdir():  # what systemd-tmpfiles does to old files
        entry.unlink()
    runtime.rmdir()
    ctx = authority.server_context("b.test")
    _, _, data = _handshake(ctx, _client_ctx(authority), "b.test")
    assert data == b"hello"
    again = authority._files._dir
    assert again is not None and again != runtime and (again / "leaf-key.pem").exists()
    authority.close()
    assert not again.exists()


def _create_in(state_dir: str, start: Any, out: Any) -> None:
    start.wait(10)
    try:
        out.put(CertificateAuthority.load_or_create(Path(state_dir)).cert_pem)
    except Exception as exc:  # reported to the test, which fails on it
        out.put(repr(exc))


def test_starts_racing_on_a_fresh_state_dir_share_one_ca(tmp_path: Path) -> None:
    """Two proxies started together on an empty state dir: one failed with "cannot write
    CA key ...: File exists". Every one must use the CA that won."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_create_in, args=(str(tmp_path / "s"), start, out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    answers = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(isinstance(a, bytes) for a in answers), answers
    assert len(set(answers)) == 1
    assert (tmp_path / "s" / "ca.pem").read_bytes() == answers[0]
