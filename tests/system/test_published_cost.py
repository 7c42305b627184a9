"""The gateway's rerank cost model starts from what each replica measured when its model loaded (Info: a
pair's cost by its length), not from a pessimistic default: a fresh gateway's budget buys the pairs the
replica's own speed affords."""

import pytest

from gateway.config import GatewaySettings
from gateway.servicer import build_server
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rerank_pb2_grpc

pytestmark = pytest.mark.slow


async def test_a_fresh_gateway_budgets_with_the_replicas_published_speed(recall_target, rerank_target, channel_to):
    info = await rerank_pb2_grpc.RerankStub(channel_to(rerank_target)).Info(common_pb2.InfoRequest())
    assert info.ms_per_pair > 0
    # A default far above any real cost: if the gateway planned with it, no budget below 5 s would buy a pair.
    server = build_server(GatewaySettings(port=0, recall_targets=recall_target, rerank_targets=rerank_target,
                                          initial_rerank_ms_per_pair=5000))
    stub = gateway_pb2_grpc.GatewayStub(channel_to(f"127.0.0.1:{await server.start()}"))
    try:
        (replica,) = server.lifecycle.pool.replicas
        assert replica.ms_per_pair == pytest.approx(info.ms_per_pair)
        assert (replica.cost.fixed_ms, replica.cost.ms_per_token, replica.cost.max_length) == (
            pytest.approx(info.pair_fixed_ms), pytest.approx(info.pair_ms_per_token), info.max_length)
        # Budget for the recall stage and about ten pairs at the replica's own speed.
        reply = await stub.Search(gateway_pb2.SearchRequest(
            query="homocysteine and vitamin B12", recall_k=20, top_k=5, budget_ms=int(500 + 10 * info.ms_per_pair)),
            timeout=60)
        assert reply.reranked >= 1, reply.degraded_reason
    finally:
        await server.stop(grace_s=1)
