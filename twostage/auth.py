"""Bearer-token auth with three roles, checked by one server interceptor.

Roles: ``search`` may read (search, rerank, embed, get, info); ``admin`` may
also change state (upsert, delete); ``replica`` may only read what a recall
replica of the same shard needs to catch up (changes, digests, versions). A request carries
``authorization: Bearer <token>`` in its metadata. The tokens file holds one
line per token, ``sha256:<hex digest> <role> [label]``, never the token
itself; tokens are 256-bit random strings, so a plain hash is enough. The
file is re-read when it changes, so adding or revoking a token needs no
restart. Health checks stay open (probes carry no token); so does
reflection, when the server enables it. A health check that carries a valid
token (the gateway's of its stages) counts as an authenticated call.

Unauthenticated work is bounded: a call without a valid token is refused as
soon as its headers arrive (not when its message does), and open calls
(health, reflection) without a valid token share a small cap of their own,
so they cannot take the slots that authenticated calls need.
"""

import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import prometheus_client as prom

from twostage.errors import ConfigError, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ROLES = ("search", "admin", "replica")
TOKEN_PREFIX = "ts_"
# Methods that change state; every other twostage method needs the search role (or admin).
ADMIN_METHODS = {
    "/twostage.v1.Gateway/Upsert", "/twostage.v1.Gateway/Delete",
    "/twostage.v1.Recall/Upsert", "/twostage.v1.Recall/Delete",
}
# Whole documents in bulk, for replicas of a shard catching up (peer_sync): replica or admin, never search.
REPLICA_METHODS = {"/twostage.v1.Recall/Changes", "/twostage.v1.Recall/Digest", "/twostage.v1.Recall/Versions"}
SEARCH_METHODS = {
    "/twostage.v1.Gateway/Search", "/twostage.v1.Gateway/Info", "/twostage.v1.Gateway/Get",
    "/twostage.v1.Gateway/Rerank", "/twostage.v1.Gateway/Embed",
    "/twostage.v1.Recall/Search", "/twostage.v1.Recall/Embed", "/twostage.v1.Recall/Get",
    "/twostage.v1.Recall/Info", "/twostage.v1.Rerank/Rerank", "/twostage.v1.Rerank/Info",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIX = "/grpc.reflection."
# A stream that lives as long as its caller wants: served on the plaintext health port, not the main one.
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"

TOKEN_RELOAD_FAILURES = prom.Counter("twostage_token_reload_failures_total",
                                     "Re-reads of a changed tokens file that failed (the last good tokens stay)")
REFUSED = prom.Counter("twostage_auth_refused_total", "Calls refused before their handler ran", ["reason"])

# The role of the caller whose handler is running; None when the server checks no tokens.
CALLER_ROLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("twostage_caller_role", default=None)


def caller_may_see_internals() -> bool:
    """Addresses and the like: for admin callers, or every caller when auth is off."""
    return CALLER_ROLE.get() in (None, "admin")


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
            raise ConfigError(f"{source}:{number}: expected 'sha256:<64 hex digits> {'|'.join(ROLES)} [label]'")
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


_MISSING = ("missing",)  # the stamp of a tokens file that could not be found


class TokenFile:
    """The tokens file, re-read when it changes, and only once it is whole.

    Every ``recheck_s`` (on the next call) the file's (inode, size, modification time) is compared with the
    loaded one. A changed file is read only once two checks in a row saw the same stamp: a file rewritten in
    place is read between its truncation and its last write at most by accident, and then its stamp moves
    again before the next check. The text read is kept only if the stamp did not move while reading and it
    parses; its digest decides whether anything changed. A file that fails to parse (or is not UTF-8) keeps
    the last good tokens and logs an error, and so does a file that vanished; a symlink swap (a Kubernetes Secret) is a new inode.
    """

    def __init__(self, path: Path, recheck_s: float = 1.0):
        self.path = Path(path)
        self.recheck_s = recheck_s
        self._stamp: tuple | None = None
        self._pending: tuple | None = None  # a new stamp seen once, waiting to be seen again
        self._digest = ""
        self._checked_at = 0.0
        self._entries: list[TokenEntry] = []
        stamp = self._stat()  # at start a missing or malformed file is an error
        self._read(stamp)
        if not self._entries:
            log.warning("the tokens file %s holds no tokens: every call that needs one will be refused", self.path)

    def _stat(self) -> tuple:
        try:
            st = os.stat(self.path)
        except OSError as error:
            raise ConfigError(f"cannot read the tokens file {self.path}: {error.strerror}") from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self, stamp: tuple) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise ConfigError(f"cannot read the tokens file {self.path}: {error.strerror}") from None
        if self._stat() != stamp:
            return  # written while we read: try again on a later check
        digest = hashlib.sha256(data).hexdigest()
        if digest != self._digest:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"{self.path}: not UTF-8 (byte {error.start})") from None
            self._entries = parse_tokens(text, str(self.path))
            self._digest = digest
            log.info("tokens file %s loaded: %d tokens", self.path, len(self._entries))
        self._stamp = stamp

    def _reload(self) -> None:
        try:
            stamp = self._stat()
        except ConfigError as error:  # gone (or unreadable): the tokens already loaded stay
            if self._stamp != _MISSING:  # logged once, until the file is back
                TOKEN_RELOAD_FAILURES.inc()
                log.error("%s; keeping the previous tokens", error)
            self._stamp, self._pending = _MISSING, None
            return
        try:
            if stamp == self._stamp:
                self._pending = None
                return
            if stamp != self._pending:  # changed since the last check: wait until it holds still
                self._pending = stamp
                return
            self._read(stamp)
        except ConfigError as error:  # a bad edit keeps the tokens already loaded
            TOKEN_RELOAD_FAILURES.inc()
            log.error("%s; keeping the previous tokens", error)
            self._stamp = stamp  # logged once per bad version, not on every check

    async def role_of(self, token: str) -> str | None:
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            try:
                await asyncio.to_thread(self._reload)  # file I/O off the event loop
            except Exception:  # whatever went wrong, the tokens already loaded still decide this call
                TOKEN_RELOAD_FAILURES.inc()
                log.exception("re-reading the tokens file %s failed; keeping the previous tokens", self.path)
        digest = token_digest(token)
        role = None
        for entry in self._entries:  # every entry compared, in constant time each
            if hmac.compare_digest(entry.digest, digest):
                role = entry.role
        return role


class TokenFiles:
    """Several tokens files read as one (``serve all`` adds the gateway's own token beside the caller's file)."""

    def __init__(self, files: list[TokenFile]):
        self.files = files

    async def role_of(self, token: str) -> str | None:
        for tokens in self.files:
            if (role := await tokens.role_of(token)) is not None:
                return role
        return None


def allowed(role: str, method: str) -> bool:
    if role == "admin":
        return True
    if role == "replica":
        return method in REPLICA_METHODS
    return method in SEARCH_METHODS


_MAKE = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behavior(handler: grpc.RpcMethodHandler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler that refuses at once. It reads requests as a stream, so it runs as soon as the headers
    arrive: a caller that never sends its message is refused all the same, and holds no slot."""

    async def refuse(request_iterator, context):
        REFUSED.labels(reason).inc()
        await context.abort(code, message)

    make = _MAKE[(True, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _wrapped(handler: grpc.RpcMethodHandler, enter, exit_) -> grpc.RpcMethodHandler:
    """``handler`` with ``enter()`` run just before its behavior and ``exit_()`` when it ends, however it ends."""
    behavior = _behavior(handler)
    if handler.response_streaming:
        async def run(request, context):
            enter()
            try:
                async for reply in behavior(request, context):
                    yield reply
            finally:
                exit_()
    else:
        async def run(request, context):
            enter()
            try:
                return await behavior(request, context)
            finally:
                exit_()
    make = _MAKE[(handler.request_streaming, handler.response_streaming)]
    return make(run, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _with_call_timeout(handler: grpc.RpcMethodHandler, timeout_s: float) -> grpc.RpcMethodHandler:
    """A streaming-request handler (reflection) that the server ends ``timeout_s`` after it began: its requests
    may come as slowly as the caller likes, so a per-message bound alone would not end it.

    Ended while waiting for a request (the usual case): DEADLINE_EXCEEDED. Ended while the caller does not
    read its replies (the handler is then paused in gRPC's write): the call is cancelled."""
    behavior = _behavior(handler)
    message = f"calls without a token may stream for {timeout_s:g} s at most"

    if handler.response_streaming:
        async def run(request_iterator, context):
            try:
                async with asyncio.timeout(timeout_s):
                    async for reply in behavior(request_iterator, context):
                        yield reply
            except TimeoutError:
                REFUSED.labels("stream_timeout").inc()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    else:
        async def run(request_iterator, context):
            try:
                async with asyncio.timeout(timeout_s):
                    return await behavior(request_iterator, context)
            except TimeoutError:
                REFUSED.labels("stream_timeout").inc()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    return _MAKE[(True, handler.response_streaming)](
        run, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _with_message_timeout(handler: grpc.RpcMethodHandler, timeout_s: float) -> grpc.RpcMethodHandler:
    """A unary-request handler that ends the call (DEADLINE_EXCEEDED) when the message takes over ``timeout_s``;
    a streaming-request one, when the whole call takes over ``timeout_s``."""
    if handler.request_streaming:
        return _with_call_timeout(handler, timeout_s)
    behavior = _behavior(handler)

    async def first_message(request_iterator, context):
        try:
            return await asyncio.wait_for(anext(request_iterator), timeout_s)
        except (TimeoutError, StopAsyncIteration):
            REFUSED.labels("no_message").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request message within {timeout_s:g} s")

    if handler.response_streaming:
        async def run(request_iterator, context):
            async for reply in behavior(await first_message(request_iterator, context), context):
                yield reply
    else:
        async def run(request_iterator, context):
            return await behavior(await first_message(request_iterator, context), context)
    return _MAKE[(True, handler.response_streaming)](
        run, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _bearer(handler_call_details) -> str | None:
    """The token of ``authorization: Bearer <token>``, or None."""
    metadata = dict(handler_call_details.invocation_metadata or ())
    scheme, _, token = (metadata.get("authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class ProbeInterceptor(grpc.aio.ServerInterceptor):
    """The plaintext health port: health Check only, its message within ``message_timeout_s``.

    Probes (kubelet) send Check alone; a Watch stream would hold a call for as long as its caller likes, so it
    is refused (UNIMPLEMENTED) as soon as its headers arrive, and a Check that never sends its message ends
    after ``message_timeout_s``. What a flood can hold there is bounded by time, not by a cap it could fill."""

    def __init__(self, message_timeout_s: float = 5.0):
        self.message_timeout_s = message_timeout_s

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler_call_details.method == HEALTH_WATCH:
            return _refusal(handler, grpc.StatusCode.UNIMPLEMENTED,
                            "Health.Watch is not served on the health port; use Check", "watch")
        return _with_message_timeout(handler, self.message_timeout_s)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED for the wrong role; decided from the headers.

    Open calls (health, reflection) without a valid token may hold at most ``max_open_rpcs`` slots at once,
    and each must send its message within ``message_timeout_s`` (a streaming one, reflection, must end within
    it); with a valid token they are authenticated
    calls like any other; health Watch, a stream without end, is refused here (the
    plaintext health port serves it)."""

    def __init__(self, tokens, open_reflection: bool, max_open_rpcs: int = 16, message_timeout_s: float = 5.0):
        self.tokens = tokens
        self.open_prefixes = OPEN_PREFIXES + ((REFLECTION_PREFIX,) if open_reflection else ())
        self.max_open_rpcs = max_open_rpcs
        self.message_timeout_s = message_timeout_s
        self.open_rpcs = 0

    def _enter_open(self) -> None:
        self.open_rpcs += 1

    def _exit_open(self) -> None:
        self.open_rpcs -= 1

    async def _role_of(self, handler_call_details) -> str | None:
        token = _bearer(handler_call_details)
        return None if token is None else await self.tokens.role_of(token)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: UNIMPLEMENTED, as without auth
            return None
        if method.startswith(self.open_prefixes):
            if method == HEALTH_WATCH:
                return _refusal(handler, grpc.StatusCode.UNIMPLEMENTED,
                                "Health.Watch is served on the health port only; use Check here", "watch")
            # A caller with a valid token (the gateway checking its stages, a peer) is not held to the open
            # cap, which callers without one can keep full.
            if (role := await self._role_of(handler_call_details)) is not None:
                return _wrapped(handler, lambda: CALLER_ROLE.set(role), lambda: None)
            if self.open_rpcs >= self.max_open_rpcs:
                return _refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "too many calls without a token at once; try again", "open_cap")
            return _wrapped(_with_message_timeout(handler, self.message_timeout_s), self._enter_open, self._exit_open)
        token = _bearer(handler_call_details)
        if token is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing token: send 'authorization: Bearer <token>' (twostage: --token or TWOSTAGE_TOKEN)",
                            "missing_token")
        role = await self.tokens.role_of(token)
        if role is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown token", "unknown_token")
        if not allowed(role, method):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, _denial(role, method), "permission")
        return _wrapped(handler, lambda: CALLER_ROLE.set(role), lambda: None)


def _denial(role: str, method: str) -> str:
    needs = "an admin or replica token" if method in REPLICA_METHODS else "an admin token"
    if role == "replica" and method in SEARCH_METHODS:
        needs = "a search or admin token"
    return f"a {role} token may not call {method.rsplit('/', 1)[-1]}: it needs {needs}"


async def role_for_bearer(tokens: "TokenFile | TokenFiles", authorization: str | None, method: str) -> str:
    """The check the interceptor makes, for a listener that is not gRPC (the gateway's HTTP face): the role of the
    ``Authorization: Bearer`` token, which must allow ``method``; else Unauthenticated or PermissionDenied."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        REFUSED.labels("missing_token").inc()
        raise Unauthenticated("missing token: send 'Authorization: Bearer <token>'")
    role = await tokens.role_of(token.strip())
    if role is None:
        REFUSED.labels("unknown_token").inc()
        raise Unauthenticated("unknown token")
    if not allowed(role, method):
        REFUSED.labels("permission").inc()
        raise PermissionDenied(_denial(role, method))
    return role


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
