"""The gateway end to end over real recall and rerank servers, and its
degraded paths with a tier missing or a budget too small."""

import json

import grpc
import pytest

from gateway.config import GatewaySettings
from gateway.servicer import build_server
from twostage.cli import main
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

DEAD_TARGET = "127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture
def stub(gateway_target, channel_to):
    return gateway_pb2_grpc.GatewayStub(channel_to(gateway_target))


@pytest.fixture
async def custom_gateway(channel_to):
    """Start gateways with custom settings; stopped after the test."""
    started = []

    async def make(**overrides):
        server = build_server(GatewaySettings(port=0, **overrides))
        port = await server.start()
        started.append(server)
        return gateway_pb2_grpc.GatewayStub(channel_to(f"127.0.0.1:{port}"))

    yield make
    for server in started:
        await server.stop(grace_s=1)


async def test_search_reranks_recall_candidates(stub, demo_data):
    query = next(iter(demo_data["queries"].values()))
    reply = await stub.Search(gateway_pb2.SearchRequest(query=query, top_k=5, recall_k=12, request_id="req-1"))
    assert not reply.degraded and reply.degraded_reason == ""
    assert (reply.candidates, reply.reranked, len(reply.hits), reply.request_id) == (12, 12, 5, "req-1")
    scores = [h.score for h in reply.hits]  # fused (linear by default)
    assert scores == sorted(scores, reverse=True)
    assert all(h.HasField("rerank_score") for h in reply.hits)
    assert all(1 <= h.recall_rank <= 12 and h.text for h in reply.hits)
    assert {"recall_ms", "rerank_ms", "total_ms", "recall.embed_ms", "rerank.compute_ms"} <= set(reply.timings_ms)


@pytest.mark.slow
async def test_most_test_queries_find_a_relevant_document(stub, demo_data):
    found = 0
    for query_id, query in demo_data["queries"].items():
        reply = await stub.Search(gateway_pb2.SearchRequest(query=query, top_k=5, recall_k=10))
        found += bool(set(demo_data["qrels"][query_id]) & {h.id for h in reply.hits})
    assert found >= len(demo_data["queries"]) // 2


async def test_rerank_tier_down_returns_recall_order_degraded(recall_target, custom_gateway):
    stub = await custom_gateway(recall_targets=recall_target, rerank_targets=DEAD_TARGET, startup_wait_s=0)
    reply = await stub.Search(gateway_pb2.SearchRequest(query="vitamin deficiency", top_k=5, recall_k=10), timeout=30)
    assert reply.degraded and reply.degraded_reason.startswith("rerank_unavailable")
    assert [h.recall_rank for h in reply.hits] == [1, 2, 3, 4, 5]
    assert all(not h.HasField("rerank_score") and not h.HasField("relevance") for h in reply.hits)
    assert [h.score for h in reply.hits] == sorted((h.score for h in reply.hits), reverse=True)
    assert reply.reranked == 0


async def test_too_little_budget_left_skips_rerank(recall_target, rerank_target, custom_gateway):
    stub = await custom_gateway(recall_targets=recall_target, rerank_targets=rerank_target, min_rerank_ms=60_000)
    reply = await stub.Search(gateway_pb2.SearchRequest(query="vitamin deficiency", top_k=3, budget_ms=30_000))
    assert reply.degraded and reply.degraded_reason.startswith("rerank_skipped")
    assert [h.recall_rank for h in reply.hits] == [1, 2, 3]


def assert_cut_short(reply) -> None:
    """A degraded answer whose reason matches its counts."""
    assert reply.degraded and reply.candidates == 100 and reply.reranked < 100
    if reply.reranked:
        assert reply.degraded_reason == f"rerank_partial ({reply.reranked} of 100 reranked)"
        assert sum(h.HasField("rerank_score") for h in reply.hits) == min(reply.reranked, len(reply.hits))
    else:
        assert reply.degraded_reason.startswith(("rerank_timeout", "rerank_skipped"))
        assert not any(h.HasField("rerank_score") for h in reply.hits)


@pytest.fixture
async def slow_rerank_target(slow_reranker):
    """A rerank server whose every batch takes 0.25 s longer (fault injection): 100 pairs cannot fit in
    a second on any hardware."""
    from rerank_server.config import RerankSettings
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server as build_rerank

    settings = RerankSettings(port=0, score_cache_mb=0)
    server = build_rerank(RerankService(settings, model=slow_reranker(settings, delay_s=0.25)))
    yield f"127.0.0.1:{await server.start()}"
    await server.stop(grace_s=0)


async def test_budget_shorter_than_rerank_reranks_what_fits(recall_target, slow_rerank_target, custom_gateway):
    """A 400 ms budget against a slow replica still answers, with what fitted."""
    stub = await custom_gateway(recall_targets=recall_target, rerank_targets=slow_rerank_target)
    for _ in range(3):  # the cost model learns from each answer
        reply = await stub.Search(
            gateway_pb2.SearchRequest(query="vitamin deficiency", recall_k=100, budget_ms=400), timeout=30
        )
        assert_cut_short(reply)


async def test_client_deadline_is_honoured(recall_target, slow_rerank_target, custom_gateway):
    """A client deadline shorter than the budget wins: a degraded answer before it, not an error."""
    stub = await custom_gateway(recall_targets=recall_target, rerank_targets=slow_rerank_target)
    reply = await stub.Search(
        gateway_pb2.SearchRequest(query="vitamin deficiency", recall_k=100, budget_ms=60_000), timeout=1.0
    )
    assert_cut_short(reply)


async def test_recall_tier_down_is_unavailable(rerank_target, custom_gateway):
    stub = await custom_gateway(recall_targets=DEAD_TARGET, rerank_targets=rerank_target)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Search(gateway_pb2.SearchRequest(query="vitamin deficiency"), timeout=30)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "recall" in caught.value.details()


@pytest.mark.parametrize(
    "request_, message",
    [
        (gateway_pb2.SearchRequest(query=""), "query must not be empty"),
        (gateway_pb2.SearchRequest(query="x" * 3000), "the limit is 2048"),
        (gateway_pb2.SearchRequest(query="ok", top_k=1001), "top_k must be between 1 and 1000"),
        (gateway_pb2.SearchRequest(query="ok", recall_k=1001), "recall_k must be between 1 and 1000"),
        (gateway_pb2.SearchRequest(query="ok", top_k=20, recall_k=10), "top_k (20) must not exceed recall_k (10)"),
        (gateway_pb2.SearchRequest(query="ok", request_id="has space"), "request_id"),
        (gateway_pb2.SearchRequest(query="ok", prf_depth=101), "prf_depth must be between 0 and 100, got 101"),
        (gateway_pb2.SearchRequest(query="ok", prf_weight=1.5), "prf_weight must be between 0 and 1, got 1.5"),
    ],
)
async def test_invalid_requests_are_rejected(stub, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Search(request_)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_info(stub, recall_target, rerank_target):
    info = await stub.Info(common_pb2.InfoRequest())
    assert list(info.recall_targets) == [recall_target] and list(info.rerank_targets) == [rerank_target]
    assert {limit.name for limit in info.limits} == {"max_top_k", "max_recall_k", "max_budget_ms", "max_query_chars"}


async def test_cli_search_prints_json(gateway_target, capsys):
    import asyncio

    code = await asyncio.to_thread(
        main, ["search", "vitamin B12 and homocysteine", "--target", gateway_target, "--recall-k", "8", "--top-k", "3", "--json"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["hits"]) == 3 and printed["degraded"] is False
    assert {"id", "score", "rerank_score", "recall_rank", "recall_score", "title", "text"} <= set(printed["hits"][0])
    assert "total_ms" in printed["timings"]
    assert "prf_ms" in printed["timings"]  # hybrid recall ran feedback
    code = await asyncio.to_thread(main, ["search", "vitamin B12 and homocysteine", "--target", gateway_target,
                                          "--recall-k", "8", "--top-k", "3", "--prf-depth", "0", "--json"])
    assert code == 0 and "prf_ms" not in json.loads(capsys.readouterr().out)["timings"]
