"""The HTTP/JSON listener: uvicorn (httptools) on the gateway's own event loop, beside the gRPC server.

Every route passes one edge before FastAPI reads its body (``FaceRoute``): the
bearer token, checked as the gRPC interceptor checks it (401 or 403 before a
byte of the body is read); a slot among ``max_concurrent_rpcs`` (429); the
body within ``max_message_mb`` (413). Then the handler, which decodes with
pydantic and hands the request to the same pipeline and the same validation as
the gRPC servicer. Whatever fails is answered in the route's dialect with the
status ``twostage.status`` gives its error, and counted and logged as a call
of the RPC the route stands for (``protocol="http"``).
"""

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvicorn
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from twostage import errors, tracing
from twostage.auth import CALLER_ROLE, role_for_bearer
from twostage.metrics import observe_rpc
from twostage.status import RETRY_AFTER_S, http_status_for, status_for
from twostage.tls import server_ssl_context

log = logging.getLogger(__name__)

RPC = "x-twostage-rpc"  # openapi_extra key: the RPC a route stands for (its role, its metrics); absent: open


def calls(rpc: str) -> dict:
    """``openapi_extra`` for a route that stands for ``rpc`` ("Gateway/Search")."""
    return {RPC: rpc}


@dataclass(frozen=True)
class Dialect:
    """How one family of clients expects its errors: ``body(status, message)``."""

    name: str
    body: Callable[[int, str], object]


def error_response(dialect: Dialect, error: BaseException) -> JSONResponse:
    status = http_status_for(error)
    message = str(error) if isinstance(error, errors.TwostageError) else "internal error; see the server log"
    headers = {}
    if status in RETRY_AFTER_S:
        headers["Retry-After"] = str(RETRY_AFTER_S[status])
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(dialect.body(status, message), status, headers)


def describe(error: RequestValidationError) -> str:
    """pydantic's complaints as one line naming the fields (never echoing the input)."""
    parts = []
    for item in error.errors()[:5]:
        if item.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', item['msg'])})")
            continue
        where = ".".join(str(p) for p in item["loc"][1:]) or "the body"
        parts.append(f"{where}: {item['msg']}")
    more = len(error.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def dialect_route(dialect: Dialect) -> type[APIRoute]:
    """The APIRoute class for a router whose routes answer in ``dialect``."""

    class FaceRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()
            rpc = (self.openapi_extra or {}).get(RPC)

            name = f"{','.join(sorted(self.methods or ()))} {self.path}"  # a span's name: "POST /v1/search"

            async def handle(request: Request) -> Response:
                return await request.app.state.face.serve(request, handler, rpc, dialect, name)

            return handle

    return FaceRoute


async def read_body(request: Request, limit: int) -> None:
    """Read the body, refusing it as soon as it passes ``limit`` bytes (declared or sent); FastAPI then parses
    what was read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.TooLarge(f"the body is {int(declared)} bytes; the limit is {limit} (max_message_mb)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.TooLarge(f"the body is over {limit} bytes, the limit (max_message_mb)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise errors.Cancelled("the client went away while sending its body") from None
    request._body = b"".join(chunks)  # Starlette's cache of the body, which FastAPI reads


async def until_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """``work``, cancelled if the client goes away first (as gRPC cancels a call whose caller left): its
    budget of the tiers goes to callers still waiting."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping past its grace period
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise errors.Cancelled("the client went away")
    return task.result()


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket, bound here so that a port in use is an error at start and 0 picks a free one.
    Made with IPPROTO_TCP as its protocol: asyncio turns Nagle's algorithm off only on such sockets, and with it
    on, a response written in two pieces waits for the client's delayed ACK (40 ms)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside a loop it does not own: the gateway's signals stay the gateway's."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpFace:
    """The Listener (``twostage.server``) serving the HTTP/JSON routes of one gateway."""

    def __init__(self, service, lifecycle):
        from gateway.http.app import build_app

        self.service = service  # the GrpcService: tokens, readiness
        self.lifecycle = lifecycle
        self.settings = service.settings
        self.app = build_app(self)
        self.in_flight = 0
        self.port = 0
        self._server: EmbeddedServer | None = None
        self._socket: socket.socket | None = None
        self._main = None

    @property
    def ready(self) -> bool:
        return self.service.ready

    async def serve(self, request: Request, handler, rpc: str | None, dialect: Dialect, name: str = "") -> Response:
        if rpc is None or not tracing.enabled:  # open routes (health, docs) are not traced, as gRPC's health is not
            return await self._serve(request, handler, rpc, dialect)
        # The caller's traceparent, as gRPC metadata carries it; the spans below and the RPC's exemplar are its.
        with tracing.server_span(name, request.headers) as span:
            response = await self._serve(request, handler, rpc, dialect)
            if span.is_recording():
                span.set_attributes({"http.request.method": request.method, "http.route": name.split(" ", 1)[1],
                                     "http.response.status_code": response.status_code, "twostage.rpc": rpc,
                                     "twostage.replica": f"{socket.gethostname()}:{self.port}"})
                if response.status_code >= 500:
                    span.set_status(tracing.Status(tracing.StatusCode.ERROR, str(response.status_code)))
            return response

    async def _serve(self, request: Request, handler, rpc: str | None, dialect: Dialect) -> Response:
        start = time.perf_counter()
        try:
            role = None
            if rpc is not None and self.service.tokens is not None:
                role = await role_for_bearer(self.service.tokens, request.headers.get("authorization"),
                                             f"/twostage.v1.{rpc}")
            if self.in_flight >= self.settings.max_concurrent_rpcs:
                raise errors.Overloaded(f"{self.in_flight} requests are in flight, the most this gateway takes "
                                        "at once; retry later")
            self.in_flight += 1
            try:
                await read_body(request, self.settings.max_message_mb * 2**20)
                reset = CALLER_ROLE.set(role)
                try:
                    response = await until_disconnected(request, handler(request))
                finally:
                    CALLER_ROLE.reset(reset)
            finally:
                self.in_flight -= 1
            code = "OK" if response.status_code < 400 else "UNAVAILABLE"  # only /health answers an error itself
        except Exception as error:
            if isinstance(error, RequestValidationError):
                error = errors.InvalidArgument(describe(error))
            elif isinstance(error, HTTPException) and error.status_code < 500:
                error = errors.InvalidArgument(str(error.detail))  # Starlette's own refusals (a body it cannot read)
            elif not isinstance(error, errors.TwostageError):
                log.exception("unhandled error in %s %s", request.method, request.url.path)
            response = error_response(dialect, error)
            code = status_for(error).name
        if rpc is not None:
            observe_rpc(rpc, code, "http", time.perf_counter() - start, request.headers.get("x-request-id", ""))
        return response

    async def start(self) -> int:
        s = self.settings
        try:
            self._socket = listen(s.host, s.http_port, s.reuse_port)
        except OSError as error:
            raise OSError(f"gateway: cannot serve HTTP on {s.host}:{s.http_port}: {error.strerror}; stop what "
                          "holds it or choose another --http-port") from None
        self.port = self._socket.getsockname()[1]
        tls = server_ssl_context(s.tls_dir, s.tls_client_auth) if s.tls_dir else None
        config = uvicorn.Config(
            self.app, http="httptools", lifespan="off", log_config=None, access_log=False, server_header=False,
            # Idle keep-alive connections are closed after this (clients reconnect), as gRPC's idle limit does.
            timeout_keep_alive=int(min(s.max_connection_idle_s, 75)),
            timeout_graceful_shutdown=s.grace_period_s,
            ssl_context_factory=(lambda config, default: tls) if tls else None,
        )
        config.load()
        self._server = EmbeddedServer(config)
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._main = asyncio.get_running_loop().create_task(self._server.main_loop())
        log.info("gateway HTTP/JSON on %s:%d (%s)", s.host, self.port, "TLS" if tls else "plaintext")
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, give requests in flight ``grace_s``, then cancel them."""
        if self._server is None:
            if self._socket is not None:
                self._socket.close()
            return
        self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        await self._main
        await self._server.shutdown(sockets=[self._socket])
        self._server = None

    def describe(self) -> str:
        return f"http on port {self.port}"
