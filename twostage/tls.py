"""TLS for every hop, from PEM files in one directory.

Layout (what ``twostage certs dev`` writes, and what a cert-manager Secret
mounts): ``ca.pem`` (the CA that signs both sides), ``server.pem`` +
``server.key`` (a server's certificate chain and key), ``client.pem`` +
``client.key`` (the certificate a caller presents for mutual TLS).

Servers re-read their files when they change (clients too, see
``twostage.connect.ReloadingCredentials``): gRPC asks for the certificate
configuration on every new handshake, and we answer from a cache keyed by the
files' modification times, so a rotated certificate is served to the next
connection while open connections carry on undisturbed.
"""

import logging
import os
import ssl
from pathlib import Path

import grpc

from twostage.errors import ConfigError

log = logging.getLogger(__name__)

CA = "ca.pem"
# TLS 1.2 suites for servers on Python's ssl (the HTTP face), as gRPC's servers allow: ECDHE key exchange, AES-GCM
# or ChaCha20-Poly1305.
HTTP_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.pem", "client.key"


def _read(directory: Path, name: str) -> bytes:
    try:
        return (directory / name).read_bytes()
    except OSError as error:
        raise ConfigError(f"TLS: cannot read {name} in the TLS directory: {error.strerror}") from None


class _RotatingServerCertificates:
    """The certificate-configuration fetcher gRPC calls on each handshake."""

    def __init__(self, directory: Path, require_client_auth: bool):
        self.directory = directory
        self.require_client_auth = require_client_auth
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> tuple:
        names = [SERVER_CERT, SERVER_KEY] + ([CA] if self.require_client_auth else [])
        return tuple(os.stat(self.directory / name).st_mtime_ns for name in names)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        key, chain = _read(self.directory, SERVER_KEY), _read(self.directory, SERVER_CERT)
        check_pair(key, chain)
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=_read(self.directory, CA) if self.require_client_auth else None
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """None keeps the current configuration; runs on a gRPC thread, never on the event loop."""
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return None
            configuration = self.configuration()
        except (OSError, ConfigError) as error:
            # Mid-rotation (one file written, not yet the other): keep serving the old pair.
            log.warning("TLS: keeping the current certificate: %s", error)
            return None
        self._stamp = stamp
        log.info("TLS: serving the rotated certificate from %s", self.directory)
        return configuration


def check_pair(key_pem: bytes, chain_pem: bytes, side: str = "server") -> None:
    """The key must belong to the first certificate: files caught mid-rotation fail here, not in handshakes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(chain_pem)
    except ValueError as error:
        raise ConfigError(f"TLS: unreadable {side} certificate or key: {error}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise ConfigError(f"TLS: {side}.key does not belong to {side}.pem")


def server_credentials(directory: Path, require_client_auth: bool) -> grpc.ServerCredentials:
    """Credentials that re-read the certificate files when they change; with
    ``require_client_auth`` only clients whose certificate chains to ca.pem get in."""
    certificates = _RotatingServerCertificates(Path(directory), require_client_auth)
    return grpc.dynamic_ssl_server_credentials(
        certificates.configuration(), certificates, require_client_authentication=require_client_auth
    )


class _RotatingSslContext:
    """The same files and rotation for a server on asyncio's own TLS (the gateway's HTTP face): every handshake
    compares the files' stamps, and a changed pair is loaded into a fresh context that the connection, and every
    later one, uses; open connections carry on with the old one."""

    def __init__(self, directory: Path, require_client_auth: bool):
        self.directory = directory
        self.require_client_auth = require_client_auth
        self._stamp = self._files_stamp()
        self.current = self._load()
        self.current.sni_callback = self._on_hello

    def _files_stamp(self) -> tuple:
        names = [SERVER_CERT, SERVER_KEY] + ([CA] if self.require_client_auth else [])
        return tuple(os.stat(self.directory / name).st_mtime_ns for name in names)

    def _load(self) -> ssl.SSLContext:
        check_pair(_read(self.directory, SERVER_KEY), _read(self.directory, SERVER_CERT))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # gRPC's policy: TLS 1.2 and 1.3 only; on 1.2, forward-secret AEAD suites only (1.3's are all such).
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(HTTP_TLS12_CIPHERS)
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(self.directory / SERVER_CERT, self.directory / SERVER_KEY)
        if self.require_client_auth:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.directory / CA)
        return context

    def _on_hello(self, connection, server_name, context) -> None:
        # Called in every handshake (with or without SNI); stat-ing three files is cheap next to the handshake.
        try:
            stamp = self._files_stamp()
            if stamp != self._stamp:
                fresh = self._load()
                fresh.sni_callback = self._on_hello
                self._stamp, self.current = stamp, fresh
                log.info("TLS: serving the rotated certificate from %s (HTTP)", self.directory)
        except (OSError, ConfigError, ssl.SSLError) as error:
            log.warning("TLS: keeping the current certificate: %s", error)
        if connection.context is not self.current:
            connection.context = self.current


def server_ssl_context(directory: Path, require_client_auth: bool) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for an asyncio server from the TLS directory, re-read when the files change."""
    return _RotatingSslContext(Path(directory), require_client_auth).current


def channel_credentials(directory: Path, present_client_certificate: bool = True) -> grpc.ChannelCredentials:
    """Verify the server against ca.pem; present client.pem when it exists (mutual TLS)."""
    directory = Path(directory)
    ca = _read(directory, CA)
    if present_client_certificate and (directory / CLIENT_CERT).exists():
        return grpc.ssl_channel_credentials(ca, _read(directory, CLIENT_KEY), _read(directory, CLIENT_CERT))
    return grpc.ssl_channel_credentials(ca)
