"""The HTTP/JSON listener: uvicorn (httptools) on the gateway's own event loop, beside the gRPC server.

Before a route runs, the connection itself is bounded (``GuardedProtocol``): a request's head (request line and
headers) must come within ``message_timeout_s`` of the connection opening or of the request's first byte, and
stay under ``MAX_HEAD_BYTES`` (431); uvicorn's ``limit_concurrency`` bounds connections and requests at once.

Then every route passes one edge before FastAPI sees its body (``FaceRoute``): the bearer token, checked as the
gRPC interceptor checks it (401 or 403 before a byte of the body is read); the body, read within
``message_timeout_s`` (408) and ``max_message_mb`` (413), with at most ``max_concurrent_rpcs`` bodies arriving
at once (429); the body decoded and validated against the route's model, off the event loop when it is large
(422); then a slot among ``max_concurrent_rpcs``, counted together with gRPC's calls (429). /health and
/metrics take no slot and are not counted: they answer from memory, and a full gateway must stay ready.
The handler hands the request to the same pipeline and the same validation as the gRPC servicer. Whatever
fails is answered in the route's dialect with the status ``twostage.status`` gives its error, and counted and
logged as a call of the RPC the route stands for (``protocol="http"``).
"""

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools
import uvicorn
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http.app import decode_body, describe, logged_request_id
from twostage import errors, tracing
from twostage.auth import CALLER_ROLE, role_for_bearer
from twostage.metrics import observe_rpc
from twostage.status import RETRY_AFTER_S, http_status_for, status_for
from twostage.tls import server_ssl_context

log = logging.getLogger(__name__)

RPC = "x-twostage-rpc"  # openapi_extra key: the RPC a route stands for (its role, its metrics); absent: open
LIGHT = "x-twostage-light"  # openapi_extra key: answered from memory: no slot, not counted as a call
MAX_HEAD_BYTES = 64 * 1024  # request line and headers of one request
OFF_LOOP_BYTES = 64 * 1024  # bodies and answers larger than this are decoded and encoded on a worker thread


def calls(rpc: str, light: bool = False) -> dict:
    """``openapi_extra`` for a route that stands for ``rpc`` ("Gateway/Search"); ``light``: one that answers
    from memory (metrics), which takes no slot and is not counted."""
    return {RPC: rpc, LIGHT: True} if light else {RPC: rpc}


@dataclass(frozen=True)
class Dialect:
    """How one family of clients expects its errors: ``body(status, message, code)`` (code: the gRPC code's name,
    None for answers no error stands for, 404 and 405); ``status(error, status)`` may give an error another
    status than the table's (TEI's empty batch is a 400)."""

    name: str
    body: Callable[[int, str, str | None], object]
    status: Callable[[BaseException, int], int] | None = None


def error_answer(dialect: Dialect, status: int, message: str, headers=None, retry_after_s: float | None = None,
                 code: str | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status in RETRY_AFTER_S:
        headers["Retry-After"] = str(int(retry_after_s or RETRY_AFTER_S[status]))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(dialect.body(status, message, code), status, headers)


def error_response(dialect: Dialect, error: BaseException) -> JSONResponse:
    status = http_status_for(error)
    if dialect.status is not None:
        status = dialect.status(error, status)
    message = str(error) if isinstance(error, errors.TwostageError) else "internal error; see the server log"
    return error_answer(dialect, status, message, retry_after_s=getattr(error, "retry_after_s", None),
                        code=status_for(error).name)


def dialect_for(path: str) -> Dialect:
    """The dialect a path belongs to, for answers no route gives (404, 405)."""
    from gateway.http.cohere import COHERE
    from gateway.http.native import NATIVE
    from gateway.http.openai import OPENAI
    from gateway.http.tei import TEI

    if path.startswith(("/v1/search", "/v1/documents", "/v1/info")):
        return NATIVE
    if path.startswith(("/v1/rerank", "/v2/")):
        return COHERE
    if path.startswith("/v1/"):  # an OpenAI client's base URL ends in /v1
        return OPENAI
    return TEI  # TEI's routes are at the root


def dialect_route(dialect: Dialect) -> type[APIRoute]:
    """The APIRoute class for a router whose routes answer in ``dialect``."""

    class FaceRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()
            extra = self.openapi_extra or {}
            params = self.dependant.body_params
            model = params[0].field_info.annotation if len(params) == 1 else None
            spec = RouteSpec(extra.get(RPC), bool(extra.get(LIGHT)) or extra.get(RPC) is None, model,
                             getattr(model, "token_ids", None))

            name = f"{','.join(sorted(self.methods or ()))} {self.path}"  # a span's name: "POST /v1/search"

            async def handle(request: Request) -> Response:
                return await request.app.state.face.serve(request, handler, spec, dialect, name)

            return handle

    return FaceRoute


@dataclass(frozen=True)
class RouteSpec:
    rpc: str | None  # the RPC it stands for; None: open (health)
    light: bool  # answered from memory: no body, no slot, not counted
    model: type | None  # its body's model
    token_ids: object = None  # the model's pattern for token ids in the raw body


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
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
    request._body = body = b"".join(chunks)  # Starlette's cache of the body, which FastAPI reads
    return body


def is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers


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


async def json_answer(content, headers=None, limit: int | None = None, large: bool = False) -> Response:
    """``content`` as a JSON response, encoded on a worker thread when ``large`` (so the event loop keeps
    serving), and refused (413) when over ``limit`` bytes (max_message_mb, as gRPC limits what it sends)."""

    def encode() -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    body = await asyncio.to_thread(encode) if large else encode()
    return raw_json(body, headers, limit)


def raw_json(body: bytes, headers=None, limit: int | None = None) -> Response:
    if limit is not None and len(body) > limit:
        raise errors.TooLarge(f"the answer would be {len(body)} bytes, over the {limit} max_message_mb allows; ask "
                              "for less at once")
    return Response(body, headers=headers, media_type="application/json")


OFF_LOOP_FLOATS = 16 * 1024  # embeddings with more numbers than this are written out on a worker thread


def _vector_rows(vectors, limit: int) -> list[bytes]:
    rows, size = [], 0
    for row in vectors:  # one vector at a time: a worker thread gives the event loop its turns in between
        text = json.dumps(row.tolist(), allow_nan=False, separators=(",", ":")).encode()
        size += len(text) + 1
        if size > limit:
            raise errors.TooLarge(f"the answer would be over the {limit} bytes max_message_mb allows; ask for fewer "
                                  "texts at once (or fewer dimensions, or base64 where the route offers it)")
        rows.append(text)
    return rows


async def vector_rows(vectors, limit: int) -> list[bytes]:
    """Each vector (a row of ``vectors``) as a JSON array, within ``limit`` bytes in all (TooLarge beyond);
    written on a worker thread when there are many."""
    if vectors.size > OFF_LOOP_FLOATS:
        return await asyncio.to_thread(_vector_rows, vectors, limit)
    return _vector_rows(vectors, limit)


class _Refused(httptools.HttpParserError):
    """Raised from a parser callback to stop parsing a request already answered (uvicorn catches the type)."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with what it lacks for a listener open to anyone: a request's head (request
    line and headers) must arrive within ``head_timeout_s`` (408, or the connection closed when nothing came) and
    stay within ``max_head_bytes`` (431). Without them a connection that never finishes its headers is held
    forever (uvicorn's keep-alive timer starts after a response), and headers grow without bound in memory.
    The body is the application's: read within the same time (``HttpFace.serve``).

    An answer sent before the body was read (a refusal: 401, 408, 413, 429) ends the connection: the rest of the
    body is read and dropped for at most ``head_timeout_s`` and ``max_drain_bytes``, so that the client, still
    sending, gets to read the answer, and then the connection closes (it is half-closed at once where the
    transport allows)."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = 5.0
    max_drain_bytes = 64 * 2**20

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._refused = False
        self._head_bytes = 0
        self._reading_head = True
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        self._drained: int | None = None  # bytes of an answered request's body dropped; None: not draining
        self._drain_timer = None

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._drained = 0
            self._drain_timer = self.loop.call_later(self.head_timeout_s, self.transport.close)
            if self.transport.can_write_eof():
                self.transport.write_eof()  # after the answer: no more will come on this connection

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._drained is not None:  # the refused request's body is over: so is the connection
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._drained is not None:
            self._drained += len(data)
            if self._drained > self.max_drain_bytes:
                self._refused = True
                self.transport.close()
                return
        super().data_received(data)
        # Still in a head after this chunk: all of it was head (httptools keeps a header's bytes until it ends).
        if self._reading_head and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request line and headers are over {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._stop_head_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refuse(431, "Request Header Fields Too Large",
                         f"the request line and headers are over {self.max_head_bytes} bytes")
            raise _Refused("refused")
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self._refused or self.transport.is_closing():
            return
        if self._head_bytes == 0 and self.cycle is None:  # a connection that never said anything
            self._refused = True
            self.transport.close()
            return
        self._refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.head_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._stop_head_timer()
        if self.transport.is_closing():
            return
        body = message.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self.transport.close()


def guarded_protocol(max_head_bytes: int, head_timeout_s: float, max_drain_bytes: int) -> type[GuardedProtocol]:
    return type("GatewayHttpProtocol", (GuardedProtocol,), {"max_head_bytes": max_head_bytes,
                                                            "head_timeout_s": head_timeout_s,
                                                            "max_drain_bytes": max_drain_bytes})


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

        self.service = service  # the GrpcService: tokens, readiness, the slots shared with gRPC
        self.lifecycle = lifecycle
        self.settings = service.settings
        self.app = build_app(self)
        self.slots = service.slots
        self.uploads = 0  # bodies being received
        self.in_flight = 0  # requests whose handlers run (each holding one of the slots)
        self.port = 0
        self._server: EmbeddedServer | None = None
        self._socket: socket.socket | None = None
        self._main = None

    @property
    def ready(self) -> bool:
        return self.service.ready

    @property
    def body_limit(self) -> int:
        return self.settings.max_message_mb * 2**20

    async def receive(self, request: Request) -> bytes:
        """The body: at most ``max_concurrent_rpcs`` arriving at once (429), each within ``message_timeout_s``
        (408) and ``max_message_mb`` (413). Bodies arriving hold no slot of the work: a slow sender delays only
        itself."""
        if self.uploads >= self.settings.max_concurrent_rpcs:
            raise errors.Overloaded(f"{self.uploads} request bodies are arriving, the most this gateway receives at "
                                    "once; retry later")
        self.uploads += 1
        timeout_s = self.settings.message_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await read_body(request, self.body_limit)
        except TimeoutError:
            raise errors.RequestTimeout(f"the body did not arrive within {timeout_s:g} s (message_timeout_s)") \
                from None
        finally:
            self.uploads -= 1

    async def decode(self, request: Request, body: bytes, spec: RouteSpec):
        if not is_json(request):
            raise errors.InvalidArgument("send the body as JSON, with content-type: application/json")
        if len(body) > OFF_LOOP_BYTES:  # parsing and checking a large body must not hold the event loop
            return await asyncio.to_thread(decode_body, body, spec.model, spec.token_ids)
        return decode_body(body, spec.model, spec.token_ids)

    async def serve(self, request: Request, handler, spec: RouteSpec, dialect: Dialect, name: str = "") -> Response:
        rpc = spec.rpc
        if rpc is None or not tracing.enabled:  # open routes (health, docs) are not traced, as gRPC's health is not
            return await self._serve(request, handler, spec, dialect)
        # The caller's traceparent, as gRPC metadata carries it; the spans below and the RPC's exemplar are its.
        with tracing.server_span(name, request.headers) as span:
            response = await self._serve(request, handler, spec, dialect)
            if span.is_recording():
                span.set_attributes({"http.request.method": request.method, "http.route": name.split(" ", 1)[1],
                                     "http.response.status_code": response.status_code, "twostage.rpc": rpc,
                                     "twostage.replica": f"{socket.gethostname()}:{self.port}"})
                if response.status_code >= 500:
                    span.set_status(tracing.Status(tracing.StatusCode.ERROR, str(response.status_code)))
            return response

    async def _serve(self, request: Request, handler, spec: RouteSpec, dialect: Dialect) -> Response:
        start = time.perf_counter()
        try:
            role = None
            if spec.rpc is not None and self.service.tokens is not None:
                role = await role_for_bearer(self.service.tokens, request.headers.get("authorization"),
                                             f"/twostage.v1.{spec.rpc}")
            if spec.light:
                reset = CALLER_ROLE.set(role)
                try:
                    return await handler(request)
                finally:
                    CALLER_ROLE.reset(reset)
            body = await self.receive(request) if has_body(request) else b""
            if spec.model is not None:
                request._json = await self.decode(request, body, spec)  # FastAPI takes the instance as it is
            with self.slots.held():
                self.in_flight += 1
                reset = CALLER_ROLE.set(role)
                try:
                    response = await until_disconnected(request, handler(request))
                finally:
                    CALLER_ROLE.reset(reset)
                    self.in_flight -= 1
            code = "OK"
        except Exception as error:
            if isinstance(error, RequestValidationError):  # a path or query parameter
                error = errors.InvalidArgument(describe(list(error.errors())))
            elif isinstance(error, HTTPException) and error.status_code < 500:
                error = errors.InvalidArgument(str(error.detail))  # Starlette's own refusals (a body it cannot read)
            elif not isinstance(error, errors.TwostageError):
                log.exception("unhandled error in %s %s", request.method, request.url.path[:200])
            response = error_response(dialect, error)
            code = status_for(error).name
        if spec.rpc is not None and not spec.light:  # a scrape refused is no more a call than one answered
            observe_rpc(spec.rpc, code, "http", time.perf_counter() - start, logged_request_id(request))
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
            # A refused body's rest is dropped up to a few times the largest body, within message_timeout_s.
            self.app, http=guarded_protocol(MAX_HEAD_BYTES, s.message_timeout_s, 4 * self.body_limit),
            lifespan="off", log_config=None,
            access_log=False, server_header=False,
            # Idle keep-alive connections are closed after this (clients reconnect), as gRPC's idle limit does.
            timeout_keep_alive=int(min(s.max_connection_idle_s, 75)),
            timeout_graceful_shutdown=s.grace_period_s,
            # Connections and requests at once (each bounded in time and size above): beyond, a plain 503. Room
            # for the slots' work, as many bodies arriving, and the open routes' callers.
            limit_concurrency=2 * s.max_concurrent_rpcs + s.max_open_rpcs,
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
