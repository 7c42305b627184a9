"""Server bootstrap shared by every service.

Lifecycle: bind the port with health NOT_SERVING, load and warm up the
service, then report SERVING. On SIGTERM or SIGINT: report NOT_SERVING
(load balancers stop sending), stop accepting RPCs, give in-flight RPCs a
grace period, then drain the service (batchers, executors, files).
"""

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twostage.config import ServiceSettings
from twostage.metrics import RpcMetricsInterceptor, start_metrics_server

log = logging.getLogger(__name__)


class Lifecycle(Protocol):
    async def start(self) -> None: ...  # load and warm up
    async def close(self) -> None: ...  # drain and release


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
        self.server = grpc.aio.server(
            interceptors=[RpcMetricsInterceptor()],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        register(self.server)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = 0

    async def _set_health(self, status) -> None:
        for service in ["", *self.service_names]:
            await self.health.set(service, status)

    async def start(self) -> int:
        """Bind, load, warm up, then serve. Returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self.settings.host}:{self.settings.port}")
        await self.server.start()
        if self.settings.metrics_port:
            start_metrics_server(self.settings.metrics_port, self.settings.host)
        await self.lifecycle.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s:%d", self.name, self.settings.host, self.port)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_period_s if grace_s is None else grace_s)
        await self.lifecycle.close()
        log.info("%s stopped", self.name)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve_until_signal(
    make_service: Callable[[], GrpcService], on_ready: Callable[[int], None] | None = None
) -> None:
    """Build (inside the running loop, as grpc.aio requires), start, serve until a signal, stop."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    service = make_service()
    try:
        port = await service.start()
        if on_ready:
            on_ready(port)
        await stop.wait()
    finally:
        await service.stop()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the time.monotonic() clock, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
