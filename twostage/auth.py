"""Bearer-token auth with two roles, checked by one server interceptor.

Roles: ``search`` may read (search, rerank, embed, get, info); ``admin`` may
also change state (upsert, delete). A request carries
``authorization: Bearer <token>`` in its metadata. The tokens file holds one
line per token, ``sha256:<hex digest> <role> [label]``, never the token
itself; tokens are 256-bit random strings, so a plain hash is enough. The
file is re-read when it changes, so adding or revoking a token needs no
restart. Health checks stay open (probes carry no token); so does
reflection, when the server enables it.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from twostage.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("search", "admin")
TOKEN_PREFIX = "ts_"
# Methods that change state (or read the store in bulk); every other twostage method needs the search role.
ADMIN_METHODS = {
    "/twostage.v1.Gateway/Upsert", "/twostage.v1.Gateway/Delete",
    "/twostage.v1.Recall/Upsert", "/twostage.v1.Recall/Delete",
    # Whole documents in bulk, for replicas of a shard catching up: not for search clients.
    "/twostage.v1.Recall/Changes", "/twostage.v1.Recall/Digest", "/twostage.v1.Recall/Versions",
}
SEARCH_METHODS = {
    "/twostage.v1.Gateway/Search", "/twostage.v1.Gateway/Info", "/twostage.v1.Gateway/Get",
    "/twostage.v1.Recall/Search", "/twostage.v1.Recall/Embed", "/twostage.v1.Recall/Get",
    "/twostage.v1.Recall/Info", "/twostage.v1.Rerank/Rerank", "/twostage.v1.Rerank/Info",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIX = "/grpc.reflection."


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    digest: str
    role: str
    label: str


def parse_tokens(text: str, source: str) -> list[TokenEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or not parts[0].startswith("sha256:") or len(parts[0]) != 71 or parts[1] not in ROLES:
            raise ConfigError(f"{source}:{number}: expected 'sha256:<64 hex digits> search|admin [label]'")
        entries.append(TokenEntry(parts[0].removeprefix("sha256:"), parts[1], parts[2] if len(parts) > 2 else ""))
    return entries


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_line(token: str, role: str, label: str = "") -> str:
    """The tokens-file line for ``token``: its hash, never the token."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return f"sha256:{token_digest(token)} {role}{' ' + label if label else ''}\n"


def add_token(path: Path, role: str, label: str = "") -> str:
    """Append a new token's hash to the tokens file (created 0600); return the token, shown once."""
    token = new_token()
    line = token_line(token, role, label)
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    return token


class TokenFile:
    """The tokens file, re-read (at most once a second) when its modification time changes."""

    def __init__(self, path: Path, recheck_s: float = 1.0):
        self.path = Path(path)
        self.recheck_s = recheck_s
        self._stamp = None
        self._checked_at = 0.0
        self._entries: list[TokenEntry] = []
        self._load()  # at start a missing or malformed file is an error
        if not self._entries:
            log.warning("the tokens file %s holds no tokens: every call that needs one will be refused", self.path)

    def _load(self) -> None:
        try:
            stamp = os.stat(self.path).st_mtime_ns
            if stamp != self._stamp:
                self._entries = parse_tokens(self.path.read_text(), str(self.path))
                self._stamp = stamp
        except OSError as error:
            raise ConfigError(f"cannot read the tokens file {self.path}: {error.strerror}") from None

    def _reload(self) -> None:
        try:
            self._load()
        except ConfigError as error:  # a bad edit keeps the tokens already loaded
            log.warning("%s; keeping the previous tokens", error)

    async def role_of(self, token: str) -> str | None:
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            await asyncio.to_thread(self._reload)  # file I/O off the event loop
        digest = token_digest(token)
        role = None
        for entry in self._entries:  # every entry compared, in constant time each
            if hmac.compare_digest(entry.digest, digest):
                role = entry.role
        return role


def allowed(role: str, method: str) -> bool:
    if role == "admin":
        return True
    return method in SEARCH_METHODS


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming) as ``handler`` that only refuses."""

    async def refuse(request_or_iterator, context):
        await context.abort(code, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED for the wrong role."""

    def __init__(self, tokens: TokenFile, open_reflection: bool):
        self.tokens = tokens
        self.open_prefixes = OPEN_PREFIXES + ((REFLECTION_PREFIX,) if open_reflection else ())

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: UNIMPLEMENTED, as without auth
            return None
        metadata = dict(handler_call_details.invocation_metadata or ())
        scheme, _, token = (metadata.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing token: send 'authorization: Bearer <token>' (twostage: --token or TWOSTAGE_TOKEN)")
        role = await self.tokens.role_of(token.strip())
        if role is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if not allowed(role, method):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"a {role} token may not call {method.rsplit('/', 1)[-1]}: it needs an admin token")
        return handler


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
