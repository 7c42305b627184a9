"""Server bootstrap shared by every service.

Lifecycle: bind the port with health NOT_SERVING, load and warm up the
service, then report SERVING. On SIGTERM or SIGINT: report NOT_SERVING
(load balancers stop sending), keep serving for ``drain_delay_s`` while they
notice, stop accepting RPCs, give in-flight RPCs a grace period, then drain
the service (batchers, executors, files).

Health has two sides. Readiness is the server-wide status ("") and each
service's: NOT_SERVING while loading, draining, or while a watchdog finds the
model thread stuck. Liveness (service name ``liveness``) is SERVING from the
moment the port is bound until the watchdog finds the model stuck: an orchestrator
restarts on liveness and routes on readiness.
"""

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twostage import tracing
from twostage.auth import (
    OPEN_PREFIXES,
    REFLECTION_PREFIX,
    ProbeInterceptor,
    TokenAuthInterceptor,
    TokenFile,
    TokenFiles,
)
from twostage.config import ServiceSettings
from twostage.errors import Overloaded, Unavailable
from twostage.metrics import SERVING, RpcMetricsInterceptor, start_metrics_server
from twostage.tls import server_credentials

log = logging.getLogger(__name__)


class Lifecycle(Protocol):
    async def start(self) -> None: ...  # load and warm up
    async def close(self) -> None: ...  # drain and release


class Listener(Protocol):
    """Another face of the same service in the same process (the gateway's HTTP/JSON): bound when the gRPC
    port is, answering from the same lifecycle, stopped with it."""

    async def start(self) -> int: ...  # bind and serve (ready or not, as service.ready says); the port
    async def stop(self, grace_s: float) -> None: ...  # stop accepting, give requests in flight grace_s
    def describe(self) -> str: ...


LIVENESS = "liveness"
WATCHDOG_PERIOD_S = 1.0


class Slots:
    """The calls a service works on at once (``max_concurrent_rpcs``), one count for every face: gRPC's calls and
    the HTTP face's requests take from it alike, so the work behind them never sees more than the limit together.
    Health, reflection and the HTTP face's /health and /metrics take none (they are answered from memory, and a
    full count must not fail readiness)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def take(self) -> None:
        if self.in_use >= self.limit:
            raise Overloaded(f"{self.in_use} calls are in flight, the most this server takes at once "
                             "(max_concurrent_rpcs); retry later")
        self.in_use += 1

    def give_back(self) -> None:
        self.in_use -= 1

    @contextlib.contextmanager
    def held(self):
        self.take()
        try:
            yield
        finally:
            self.give_back()


class SlotInterceptor(grpc.aio.ServerInterceptor):
    """Each unary call holds one of the service's ``Slots`` while its handler runs; with none free it is refused
    (RESOURCE_EXHAUSTED) as gRPC's own cap refuses. Health and reflection are not counted."""

    def __init__(self, slots: Slots):
        self.slots = slots

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler.unary_unary is None
                or handler_call_details.method.startswith((*OPEN_PREFIXES, REFLECTION_PREFIX))):
            return handler
        behavior, slots = handler.unary_unary, self.slots

        async def limited(request, context):
            try:
                slots.take()
            except Overloaded as error:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            try:
                return await behavior(request, context)
            finally:
                slots.give_back()

        return grpc.unary_unary_rpc_method_handler(limited, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class GrpcService:
    """One gRPC server around one Lifecycle."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        service_names: list[str],
        register: Callable[[grpc.aio.Server], None],
        lifecycle: Lifecycle,
    ):
        self.name = name
        self.settings = settings
        self.service_names = service_names
        self.lifecycle = lifecycle
        limit = settings.max_message_mb * 1024 * 1024
        # Outermost: each RPC's server span (while tracing is on) is current for the metrics and all below.
        self.rpcs = RpcMetricsInterceptor(traced=tracing.enabled)
        interceptors: list[grpc.aio.ServerInterceptor] = [self.rpcs]
        reflection_on = settings.reflection == "on" or (settings.reflection == "auto" and not settings.auth_tokens)
        # ``Slots`` below is the limit callers meet, with its own message, taken once a call's message has arrived;
        # gRPC's own cap bounds the calls still sending theirs. gRPC counts a call from its headers until its task's
        # done-callback has run, after the caller already has its answer: a cap equal to the slots would refuse a
        # caller whose next call follows its last answer at once. Twice the slots is the margin for that lag.
        grpc_cap = 2 * settings.max_concurrent_rpcs
        # The tokens, shared with any other listener of this service: one file, one reload, one answer.
        self.tokens: TokenFile | TokenFiles | None = None
        if settings.auth_tokens:
            files = [TokenFile(path) for path in (settings.auth_tokens, settings.auth_tokens_extra) if path]
            self.tokens = files[0] if len(files) == 1 else TokenFiles(files)
            interceptors.append(TokenAuthInterceptor(
                self.tokens, open_reflection=reflection_on,
                max_open_rpcs=settings.max_open_rpcs, message_timeout_s=settings.message_timeout_s))
            # Calls without a token get max_open_rpcs slots on top, so they can never take the others.
            grpc_cap += settings.max_open_rpcs
        # The count every face of this service shares (the gateway's HTTP face takes from it too); gRPC's own cap
        # above stays as the bound on calls whose message is still arriving.
        self.slots = Slots(settings.max_concurrent_rpcs)
        interceptors.append(SlotInterceptor(self.slots))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=grpc_cap,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC Python shares ports by default; a second server would then take half the traffic.
                ("grpc.so_reuseport", int(settings.reuse_port)),
                ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                # Clients pinging at our own keepalive period (give or take jitter) are welcome.
                ("grpc.http2.min_ping_interval_without_data_ms", int(settings.keepalive_time_s * 500)),
                ("grpc.http2.max_ping_strikes", 2),
                # What one client can hold: calls per connection, and connections kept idle or forever.
                ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
                ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)),
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # Probes (kubelet) cannot speak TLS: the same health state, alone, on a plaintext port. Check only,
        # its message within message_timeout_s, and no cap on concurrent calls: a cap is what a flood of
        # stalled calls would fill, making the next probe fail; here each stalled call ends on the timeout.
        self.probe_server = None
        if settings.health_port:
            self.probe_server = grpc.aio.server(options=[("grpc.so_reuseport", int(settings.reuse_port)),
                                                         ("grpc.max_connection_idle_ms",
                                                          int(settings.max_connection_idle_s * 1000))],
                                                interceptors=[ProbeInterceptor(settings.message_timeout_s)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probe_server)
        register(self.server)
        if reflection_on:
            reflection.enable_server_reflection(
                [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )
        self.listeners: list[Listener] = []
        self.port = 0
        self.metrics_port = 0
        self._started = False
        self._ready = False  # loaded and not draining
        self._stalled = False
        self._watchdog: asyncio.Task | None = None

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    @property
    def ready(self) -> bool:
        """Readiness as health reports it: loaded, not draining, the model thread moving."""
        return self._ready and not self._stalled

    async def _set_health(self, status) -> None:
        """Readiness: the server as a whole and each service."""
        for service in ["", *self.service_names]:
            await self.health.set(service, status)
        SERVING.labels(self.name).set(int(status == health_pb2.HealthCheckResponse.SERVING))

    async def _watch_model(self) -> None:
        """Readiness and liveness follow the model thread: a batch running past watchdog_s means it is stuck."""
        batcher = getattr(self.lifecycle, "batcher", None)
        if batcher is None:
            return
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            stalled = batcher.longest_running_s() > self.settings.watchdog_s
            if stalled == self._stalled:
                continue
            self._stalled = stalled
            if stalled:
                failed = batcher.fail_queued(Unavailable(f"{self.name}: the model is stuck; try another replica"))
                log.error("%s: a model batch has run for over %.0f s: NOT_SERVING (%d queued items failed over)",
                          self.name, self.settings.watchdog_s, failed)
            else:
                log.warning("%s: the model thread is moving again", self.name)
            await self.health.set(LIVENESS, not_serving if stalled else serving)
            if self._ready:
                await self._set_health(not_serving if stalled else serving)

    async def start(self) -> int:
        """Bind, load, warm up, then serve. Returns the bound port."""
        s = self.settings
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        address = f"{s.host}:{s.port}"
        try:
            if s.tls_dir:
                credentials = server_credentials(s.tls_dir, require_client_auth=s.tls_client_auth)
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {address}: the port is in use (or the address is not "
                          "this machine's); stop what holds it or choose another --port")
        self.rpcs.bound(self.port)
        if self.probe_server is not None:
            try:
                bound = self.probe_server.add_insecure_port(f"{s.host}:{s.health_port}")
            except RuntimeError:
                bound = 0
            if not bound:
                raise OSError(f"{self.name}: cannot serve health on {s.host}:{s.health_port}: the port is in use; "
                              "choose another --health-port")
            await self.probe_server.start()
            log.info("%s health (plaintext, for probes) on %s:%d", self.name, s.host, bound)
        if s.metrics_port:
            try:
                start_metrics_server(s.metrics_port, s.metrics_host)
            except OSError as error:
                raise OSError(f"{self.name}: cannot serve metrics on {s.metrics_host}:{s.metrics_port}: "
                              f"{error.strerror}; choose another --metrics-port") from None
            self.metrics_port = s.metrics_port
            log.info("%s metrics on http://%s:%d/metrics", self.name, s.metrics_host, s.metrics_port)
        await self.server.start()
        self._started = True
        for listener in self.listeners:
            await listener.start()
        security = ("mutual TLS" if s.tls_client_auth else "TLS") if s.tls_dir else "plaintext"
        log.info("%s listening on %s:%d (%s%s; NOT_SERVING until loaded)", self.name, s.host, self.port, security,
                 ", bearer tokens" if s.auth_tokens else "")
        await self.lifecycle.start()
        self._ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_model())
        log.info("%s serving on %s:%d", self.name, s.host, self.port)
        return self.port

    def describe(self) -> str:
        """Where it listens, for the line a supervisor waits for."""
        metrics = f", metrics on {self.settings.metrics_host}:{self.metrics_port}" if self.metrics_port else ""
        others = "".join(f", {listener.describe()}" for listener in self.listeners)
        return f"{self.name} serving on port {self.port}{others}{metrics}"

    async def stop(self, grace_s: float | None = None) -> None:
        if not self._started:
            await asyncio.gather(self.server.stop(0), *(listener.stop(0) for listener in self.listeners))
            if self.probe_server is not None:
                await self.probe_server.stop(0)
            return
        self._ready = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)  # readiness only: still alive
        if self.settings.drain_delay_s and grace_s is None:
            log.info("%s: NOT_SERVING; still answering for %.1f s while callers notice", self.name,
                     self.settings.drain_delay_s)
            await asyncio.sleep(self.settings.drain_delay_s)
        await self.health.enter_graceful_shutdown()
        if self._watchdog is not None:
            self._watchdog.cancel()
        grace_s = self.settings.grace_period_s if grace_s is None else grace_s
        await asyncio.gather(self.server.stop(grace_s), *(listener.stop(grace_s) for listener in self.listeners))
        if self.probe_server is not None:  # probes saw NOT_SERVING throughout the drain
            await self.probe_server.stop(0)
        await self.lifecycle.close()
        log.info("%s stopped", self.name)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve_until_signal(make_service: Callable[[], GrpcService], name: str) -> None:
    """Build (inside the running loop, as grpc.aio requires), start, serve until a signal, stop.

    Prints one line once serving (``describe``): supervisors such as ``serve all`` wait for it. A
    signal during start (a model still loading, a gateway still waiting for its stages) stops too.
    Traces (``name`` names the service) are on when the OTEL_* variables ask for them."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    tracing.setup(name)
    service = make_service()
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raises what start raised
            print(service.describe(), flush=True)
            await stopping
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        stopping.cancel()
        try:
            await service.stop()
        finally:
            await asyncio.to_thread(tracing.shutdown)  # the spans of the last requests


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the time.monotonic() clock, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
