"""How a client reaches a twostage service: plaintext or TLS (mutual when a
client certificate is at hand), with or without a bearer token. The gateway's
calls to its stages and every client command share it.

Long-lived clients (the gateway toward its stages, recall replicas toward each
other) use ``ReloadingCredentials``: the CA, the client certificate and key,
and the token file are re-read when they change, and a client's channel is
replaced, so new connections present the new files while calls in flight
finish on the old channel."""

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import prometheus_client as prom

from twostage.auth import bearer_metadata
from twostage.errors import ConfigError
from twostage.tls import CA, CLIENT_CERT, CLIENT_KEY, channel_credentials, check_pair

log = logging.getLogger(__name__)

CREDENTIAL_RELOADS = prom.Counter("twostage_client_credential_reloads_total",
                                  "Client credentials (certificate, CA, token) re-read after their files changed")
CREDENTIAL_RELOAD_FAILURES = prom.Counter(
    "twostage_client_credential_reload_failures_total",
    "Checks of client credential files that failed (the credentials in use stay until the files are whole)")


@dataclass(frozen=True)
class Credentials:
    tls_dir: Path | None = None
    token: str | None = None
    # The name the server's certificate must carry when it differs from the target's host.
    server_name: str = ""
    # (ca, key, chain) already read, so a channel is made without touching the disk; None: read tls_dir.
    pem: tuple[bytes, bytes | None, bytes | None] | None = None

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(*self.pem) if self.pem else channel_credentials(self.tls_dir)

    def snapshot(self) -> tuple[int, "Credentials"]:
        """(generation, credentials): these never change."""
        return 0, self

    def _options(self, options) -> list:
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.tls_dir and self.server_name else []
        return [*options, *extra]

    def channel(self, target: str, options=()) -> grpc.Channel:
        if self.tls_dir:
            return grpc.secure_channel(target, self._channel_credentials(), self._options(options))
        return grpc.insecure_channel(target, self._options(options))

    def aio_channel(self, target: str, options=()) -> grpc.aio.Channel:
        if self.tls_dir:
            return grpc.aio.secure_channel(target, self._channel_credentials(), self._options(options))
        return grpc.aio.insecure_channel(target, self._options(options))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)


PLAINTEXT = Credentials()


def read_token_file(path: Path | None) -> str | None:
    return Path(path).read_text().strip() or None if path else None


class ReloadingCredentials:
    """Credentials from files, re-read when they change (``watch``); ``snapshot()`` gives the current ones.

    A change is taken once the files' (inode, size, modification time) held still over two checks in a row, the
    key belongs to the certificate and the token file is not empty: files caught mid-rotation never replace
    good ones. Each change bumps the generation, which clients compare to know when to make a new channel."""

    def __init__(self, tls_dir: Path | None, token_file: Path | None, server_name: str = "", recheck_s: float = 1.0):
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.token_file = Path(token_file) if token_file else None
        self.server_name = server_name
        self.recheck_s = recheck_s
        self.generation = 0
        self._current = Credentials(self.tls_dir, None, server_name)
        self._stamp: tuple | None = None
        self._pending: tuple | None = None

    def _paths(self) -> list[Path]:
        paths = []
        if self.tls_dir:
            paths += [self.tls_dir / CA, self.tls_dir / CLIENT_CERT, self.tls_dir / CLIENT_KEY]
        return paths + ([self.token_file] if self.token_file else [])

    def _files_stamp(self) -> tuple:
        stamp = []
        for path in self._paths():
            try:
                st = os.stat(path)
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def _read(self) -> Credentials:
        pem = None
        if self.tls_dir:
            try:
                ca = (self.tls_dir / CA).read_bytes()
                if (self.tls_dir / CLIENT_CERT).exists():
                    key, chain = (self.tls_dir / CLIENT_KEY).read_bytes(), (self.tls_dir / CLIENT_CERT).read_bytes()
                    check_pair(key, chain, "client")
                    pem = (ca, key, chain)
                else:
                    pem = (ca, None, None)
            except OSError as error:
                raise ConfigError(f"TLS: cannot read the client credentials in {self.tls_dir}: "
                                  f"{error.strerror}") from None
        token = None
        if self.token_file:
            try:
                token = read_token_file(self.token_file)
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"cannot read the token file {self.token_file}: {error}") from None
            if token is None:
                raise ConfigError(f"the token file {self.token_file} is empty")
        return Credentials(self.tls_dir, token, self.server_name, pem)

    def load(self) -> "ReloadingCredentials":
        """Read the files now (blocking: at start, or from a thread); a missing or bad file is an error."""
        stamp = self._files_stamp()
        self._current = self._read()
        self._stamp = stamp
        return self

    def refresh(self) -> bool:
        """Re-read changed files (blocking: call from a thread); True when the credentials changed."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            self._pending = None
            return False
        if stamp != self._pending:  # changed since the last check: wait until the files hold still
            self._pending = stamp
            return False
        try:
            fresh = self._read()
        except ConfigError as error:
            CREDENTIAL_RELOAD_FAILURES.inc()
            log.warning("%s; keeping the credentials in use", error)
            return False
        if self._files_stamp() != stamp:
            return False  # written while we read: next check
        self._stamp = stamp
        if fresh == self._current:
            return False
        self._current = fresh
        self.generation += 1
        CREDENTIAL_RELOADS.inc()
        log.info("client credentials re-read (%s): new connections use them", ", ".join(
            str(p) for p in self._paths()))
        return True

    def snapshot(self) -> tuple[int, Credentials]:
        return self.generation, self._current

    async def watch(self, stop: asyncio.Event) -> None:
        """Check the files every recheck_s until ``stop``; a failing check is logged, counted and retried."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.recheck_s)
                return
            except TimeoutError:
                pass
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                CREDENTIAL_RELOAD_FAILURES.inc()
                log.exception("checking the client credential files failed; retrying in %.1f s", self.recheck_s)


class RotatingChannel:
    """A channel to one target that is replaced when its credentials' generation moves on. The old channel
    is closed with a grace period, so calls already on it finish."""

    RETIRE_GRACE_S = 60.0

    def __init__(self, target: str, credentials, options=()):
        self.target = target
        self.source = credentials  # Credentials or ReloadingCredentials
        self.options = list(options)
        self.generation, self.credentials = credentials.snapshot()
        self._channel = self.credentials.aio_channel(target, self.options)
        self._retiring: set[asyncio.Task] = set()

    @property
    def channel(self) -> grpc.aio.Channel:
        generation, credentials = self.source.snapshot()
        if generation != self.generation:
            old = self._channel
            self.generation, self.credentials = generation, credentials
            self._channel = credentials.aio_channel(self.target, self.options)
            task = asyncio.get_running_loop().create_task(old.close(grace=self.RETIRE_GRACE_S))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return self._channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.source.snapshot()[1].metadata

    async def close(self) -> None:
        await self._channel.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)


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
