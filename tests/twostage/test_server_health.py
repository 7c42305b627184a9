"""Health follows the runtime: a stuck model turns a server NOT_SERVING (readiness and
liveness), and SIGTERM drains: NOT_SERVING first, still answering for the drain delay."""

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerank_server.config import RerankSettings
from rerank_server.service import RerankService
from rerank_server.servicer import build_server
from twostage.v1 import rerank_pb2, rerank_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


async def status(channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return reply.status


async def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_stuck_model_turns_the_server_not_serving_and_back(slow_reranker):
    settings = RerankSettings(port=0, score_cache_mb=0, watchdog_s=1)
    model = slow_reranker(settings, delay_s=0.0)
    server = build_server(RerankService(settings, model=model))
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankStub(channel)
        assert await status(channel) == SERVING and await status(channel, "liveness") == SERVING
        model.delay_s = 4.0  # the next batch hangs past the watchdog
        stuck = asyncio.ensure_future(stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=["d"])))

        async def not_serving():
            return await status(channel) != SERVING and await status(channel, "liveness") != SERVING

        await wait_until(not_serving)
        # Work queued behind the stuck batch is failed over (UNAVAILABLE), not left waiting forever.
        queued = stub.Rerank(rerank_pb2.RerankRequest(query="q2", documents=["d2"]))
        model.delay_s = 0.0
        try:
            await queued
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.UNAVAILABLE
        await stuck

        async def serving_again():
            return await status(channel) == SERVING and await status(channel, "liveness") == SERVING

        await wait_until(serving_again)
    await server.stop(grace_s=0)


@pytest.mark.slow
async def test_sigterm_drains_not_serving_first_and_still_answers(models):
    server = build_server(RerankService(RerankSettings(port=0, drain_delay_s=3.0)))
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stopping = asyncio.ensure_future(server.stop())

        async def draining():
            return await status(channel) != SERVING

        await wait_until(draining)
        assert await status(channel, "liveness") == SERVING  # draining is not dying: no restart
        reply = await rerank_pb2_grpc.RerankStub(channel).Rerank(
            rerank_pb2.RerankRequest(query="vitamin b12", documents=["b12 and homocysteine"]), timeout=30
        )
        assert len(reply.results) == 1  # still answered during the drain delay
        assert not stopping.done()
        await stopping
