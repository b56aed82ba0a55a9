"""CA files of the user's kind (--ca-cert, --ca-key) made on the spot, for tests that need
one with a given lifetime or shape that trustme does not make."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def rsa_ca(lifetime: timedelta, with_ski: bool) -> tuple[bytes, bytes]:
    """An RSA-2048 CA like the bench harness's, ending `lifetime` from now (PEM cert, PEM key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test RSA CA")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if with_ski:
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = builder.add_extension(ski, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_ca(directory: Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """The two files in `directory`, the key 0600 (the proxy refuses one others can read)."""
    cert_path, key_path = directory / "my-ca.pem", directory / "my-ca-key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)  # not the umask's 0644: load() refuses a key others can read
    return cert_path, key_path
