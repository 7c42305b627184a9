"""How a client reaches a twostage service: plaintext or TLS (mutual when a
client certificate is at hand), with or without a bearer token. The gateway's
calls to its stages and every client command share it."""

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from twostage.auth import bearer_metadata
from twostage.tls import channel_credentials


@dataclass(frozen=True)
class Credentials:
    tls_dir: Path | None = None
    token: str | None = None
    # The name the server's certificate must carry when it differs from the target's host.
    server_name: str = ""

    def _options(self, options) -> list:
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.tls_dir and self.server_name else []
        return [*options, *extra]

    def channel(self, target: str, options=()) -> grpc.Channel:
        if self.tls_dir:
            return grpc.secure_channel(target, channel_credentials(self.tls_dir), self._options(options))
        return grpc.insecure_channel(target, self._options(options))

    def aio_channel(self, target: str, options=()) -> grpc.aio.Channel:
        if self.tls_dir:
            return grpc.aio.secure_channel(target, channel_credentials(self.tls_dir), self._options(options))
        return grpc.aio.insecure_channel(target, self._options(options))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)


PLAINTEXT = Credentials()


def read_token_file(path: Path | None) -> str | None:
    return Path(path).read_text().strip() or None if path else None


def add_credential_flags(parser) -> None:
    parser.add_argument("--tls-dir", type=Path, default=os.environ.get("TWOSTAGE_TLS_DIR") or None,
                        help="connect with TLS: ca.pem verifies the server; client.pem/client.key, when present, "
                        "are presented (env TWOSTAGE_TLS_DIR)")
    parser.add_argument("--tls-server-name", default="",
                        help="the name the server's certificate carries, when the target's host is not it (a "
                        "port-forward to localhost, an IP)")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: env TWOSTAGE_TOKEN; prefer the variable, flags show in ps)")


def credentials_from_args(args) -> Credentials:
    return Credentials(tls_dir=args.tls_dir, token=args.token or os.environ.get("TWOSTAGE_TOKEN") or None,
                       server_name=getattr(args, "tls_server_name", ""))
