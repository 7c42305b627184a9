"""A client's mistakes never take a tier down; only a replica's own faults eject it, for
eject_s; members join while traffic flows; a gateway started before its stages waits."""

import asyncio
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewaySettings
from gateway.servicer import build_server as build_gateway
from rerank_server.config import RerankSettings
from rerank_server.service import RerankService
from rerank_server.servicer import build_server as build_rerank
from twostage.v1 import gateway_pb2, gateway_pb2_grpc

QUERY = "vitamin B12 deficiency and homocysteine"


async def wait_until(condition, timeout_s: float = 60.0, period_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(period_s)


@pytest.fixture
async def servers():
    """Start gateways and rerank servers in this process; everything is stopped after the test."""
    started = []

    async def gateway(**settings):
        server = build_gateway(GatewaySettings(**{"port": 0, **settings}))
        port = await server.start()
        started.append(server)
        return server, f"127.0.0.1:{port}"

    async def rerank(model=None, **settings):
        service = RerankService(RerankSettings(port=0, score_cache_mb=0, **settings), model=model)
        server = build_rerank(service)
        port = await server.start()
        started.append(server)
        return service, f"127.0.0.1:{port}"

    yield gateway, rerank
    for server in reversed(started):
        await server.stop(grace_s=0)


def search(target: str, query: str = QUERY, **fields):
    channel = grpc.aio.insecure_channel(target)

    async def call():
        try:
            return await gateway_pb2_grpc.GatewayStub(channel).Search(
                gateway_pb2.SearchRequest(query=query, recall_k=fields.pop("recall_k", 8), **fields), timeout=120
            )
        finally:
            await channel.close()

    return call()


def codes(reply) -> set[str]:
    return {gateway_pb2.DegradationCode.Name(d.code) for d in reply.degradations}


async def test_long_queries_are_reranked_and_never_eject_a_replica(gateway_target):
    for words in (100, 300):
        long_query = " ".join(["homocysteine"] * words)[:2048]
        reply = await search(gateway_target, long_query)
        assert reply.reranked == reply.candidates == 8
        assert codes(reply) <= {"QUERY_TRUNCATED"}
    await asyncio.gather(*(search(gateway_target, " ".join(["b12"] * 150)) for _ in range(6)))
    reply = await search(gateway_target)
    assert reply.reranked == 8 and not reply.degraded  # no replica was blamed for the callers' queries


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"query": "x" * 2049}, "query is 2049 characters"), ({"recall_k": 5000}, "recall_k must be between 1 and 1000")],
)
async def test_bad_requests_are_refused_at_the_edge(gateway_target, fields, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(gateway_target, **fields)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    reply = await search(gateway_target)
    assert reply.reranked == 8 and not reply.degraded


async def test_a_failing_replica_is_ejected_for_eject_s_then_returns(servers, recall_target, flaky_reranker):
    gateway, rerank = servers
    flaky_settings = RerankSettings(port=0, score_cache_mb=0)
    flaky_model = flaky_reranker(flaky_settings)
    flaky, flaky_target = await rerank(model=flaky_model)
    _, healthy_target = await rerank()
    server, target = await gateway(recall_targets=recall_target, rerank_targets=f"{flaky_target},{healthy_target}",
                                   eject_after_failures=2, eject_s=2.0, health_check_period_s=0.2)
    pool = server.lifecycle.pool
    flaky_replica = next(r for r in pool.replicas if r.target == flaky_target)
    flaky_model.failing = True
    while not flaky_replica.ejected_until_s:  # each failed slice is retried on the healthy replica
        reply = await search(target)
        assert reply.reranked == 8 and not reply.degraded
    ejected_until = flaky_replica.ejected_until_s
    flaky_model.failing = False
    batches_before = flaky.batcher.stats.batches

    async def back():
        return flaky_replica.available()

    await wait_until(back)
    assert time.monotonic() >= ejected_until  # out for eject_s, though health said SERVING all along
    await wait_until(lambda: _searched_until(target, lambda: flaky.batcher.stats.batches > batches_before))


async def _searched_until(target, done) -> bool:
    await search(target)
    return done()


async def test_a_replica_added_while_traffic_flows_gets_work(servers, recall_target, tmp_path):
    gateway, rerank = servers
    _, first_target = await rerank()
    members = tmp_path / "rerank-members"
    members.write_text(first_target + "\n")
    _, target = await gateway(recall_targets=recall_target, rerank_targets=f"file://{members}", resolve_period_s=0.5)
    assert (await search(target)).reranked == 8
    second, second_target = await rerank()
    members.write_text(f"{first_target}\n{second_target}\n")
    await wait_until(lambda: _searched_until(target, lambda: second.batcher.stats.batches > 1))  # 1: its warm-up
    members.write_text(second_target + "\n")  # and one leaves
    await wait_until(lambda: _searched_until(target, lambda: True))
    reply = await search(target)
    assert reply.reranked == 8 and not reply.degraded


async def test_a_gateway_started_before_its_stages_waits_not_serving(servers, recall_target, rerank_target, tmp_path):
    gateway, _ = servers
    members = tmp_path / "recall-members"
    members.write_text("")  # no recall address yet: as during a fresh rollout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    starting = asyncio.ensure_future(gateway(port=port, recall_targets=f"file://{members}",
                                             rerank_targets=rerank_target, resolve_period_s=0.5))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async def health() -> int | None:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return None
            return reply.status

        await wait_until(lambda: _is(health, health_pb2.HealthCheckResponse.NOT_SERVING))
        assert not starting.done()
        members.write_text(recall_target + "\n")
        await starting
        assert await health() == health_pb2.HealthCheckResponse.SERVING
    assert (await search(f"127.0.0.1:{port}")).reranked == 8


async def _is(probe, expected) -> bool:
    return await probe() == expected
