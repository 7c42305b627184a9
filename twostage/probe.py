"""Waiting for services to report SERVING over the standard health protocol."""

import asyncio
import time
from enum import Enum

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class Health(Enum):
    """What one health check found."""

    UNKNOWN = "unknown"  # no answer in time: down, unreachable, still starting, or too busy to answer
    SERVING = "serving"  # it answered SERVING
    NOT_SERVING = "not serving"  # it answered, and not SERVING (loading, draining, or no index to serve)


async def channel_health(channel: grpc.aio.Channel, timeout_s: float = 1.0, metadata=()) -> Health:
    """The service's health as its answer says; UNKNOWN when it did not answer.

    ``metadata``: the caller's token, where it has one: a server with auth then counts the check as an
    authenticated call, beyond the cap that callers without a token can fill."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, metadata=metadata or None
        )
    except grpc.aio.AioRpcError:
        return Health.UNKNOWN
    return Health.SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else Health.NOT_SERVING


async def health_status(target: str, timeout_s: float = 1.0) -> Health:
    """``channel_health`` of a plaintext target, on a channel of its own."""
    async with grpc.aio.insecure_channel(target) as channel:
        return await channel_health(channel, timeout_s)


async def is_serving(target: str, timeout_s: float = 1.0) -> bool:
    return await health_status(target, timeout_s) is Health.SERVING


async def wait_serving(targets: list[str], timeout_s: float, still_starting=lambda: True) -> None:
    """Poll until every target is SERVING; raise TimeoutError, or RuntimeError if
    ``still_starting()`` turns false (a process died)."""
    deadline = time.monotonic() + timeout_s
    pending = list(targets)
    while pending:
        if not still_starting():
            raise RuntimeError(f"a service exited before it was ready (waiting for {', '.join(pending)})")
        ready = await asyncio.gather(*(is_serving(t) for t in pending))
        pending = [t for t, ok in zip(pending, ready) if not ok]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not serving after {timeout_s:.0f} s: {', '.join(pending)}")
        if pending:
            await asyncio.sleep(0.2)
