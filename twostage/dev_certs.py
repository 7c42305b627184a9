"""A development certificate authority, with server and client certificates
for ``localhost`` and ``127.0.0.1``: enough to run every hop with mutual TLS
on one machine. Production certificates come from your own CA (for example
cert-manager; see deploy/)."""

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twostage import tls

LOCAL_NAMES = ["localhost"]
LOCAL_ADDRESSES = ["127.0.0.1", "::1"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twostage development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "twostage development CA", days: int = 365):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # Key identifiers, which strict RFC 5280 verifiers (and TLS scanners) require.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca_cert, ca_key, common_name: str, client: bool, days: int = 365,
          names: list[str] = LOCAL_NAMES, addresses: list[str] = LOCAL_ADDRESSES):
    """A leaf certificate signed by the CA: for servers (names in the SAN) or clients."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Written beside and renamed into place, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_dev_certs(out: Path, days: int = 365, ca=None) -> list[Path]:
    """ca.pem, server.pem/.key and client.pem/.key in ``out`` (keys readable by the owner only).
    Pass ``ca`` (cert, key) to reissue the leaves under an existing CA, as a rotation does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = ca or make_ca(days=days)
    server_cert, server_key = issue(ca_cert, ca_key, "twostage server", client=False, days=days)
    client_cert, client_key = issue(ca_cert, ca_key, "twostage client", client=True, days=days)
    files = {
        tls.CA: (_cert_pem(ca_cert), False),
        tls.SERVER_CERT: (_cert_pem(server_cert), False), tls.SERVER_KEY: (_key_pem(server_key), True),
        tls.CLIENT_CERT: (_cert_pem(client_cert), False), tls.CLIENT_KEY: (_key_pem(client_key), True),
    }
    for name, (data, secret) in files.items():
        _write(out / name, data, secret)
    return [out / name for name in files]
