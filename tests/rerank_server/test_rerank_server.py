"""The rerank server over gRPC with the real cross-encoder."""

import asyncio

import grpc
import numpy as np
import pytest

from rerank_server.config import RerankSettings
from twostage.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc

QUERY = "Does smoking cause lung cancer?"
RELEVANT = "Cigarette smoking is the leading cause of lung cancer; smokers have a 15 to 30 times higher risk."
IRRELEVANT = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]


@pytest.fixture
def stub(rerank_target, channel_to):
    return rerank_pb2_grpc.RerankStub(channel_to(rerank_target))


async def test_relevant_document_ranks_first(stub):
    reply = await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[IRRELEVANT[0], RELEVANT, IRRELEVANT[1]]))
    assert reply.results[0].index == 1
    scores = [r.score for r in reply.results]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert reply.tokens > 0
    assert {"tokenize_ms", "queue_ms", "compute_ms", "total_ms"} <= set(reply.timings_ms)


async def test_every_reply_reports_what_it_cost_the_model(stub):
    """Queue wait, model time and the replica's model time per pair, typed; pairs answered from the cache cost
    the model nothing. The timings repeat the first two, for diagnostics."""
    query = "what one rerank request costs the model"
    documents = [f"Document {i} on what a cross-encoder spends scoring a pair." for i in range(3)]
    computed = await stub.Rerank(rerank_pb2.RerankRequest(query=query, documents=documents))
    cost = computed.cost
    assert computed.cached == 0 and cost.queue_ms >= 0 and cost.service_ms > 0 and cost.ms_per_item > 0
    # Both lie within the handler's own time.
    assert cost.queue_ms + cost.service_ms <= computed.timings_ms["total_ms"]
    assert (computed.timings_ms["queue_ms"], computed.timings_ms["compute_ms"]) == (cost.queue_ms, cost.service_ms)
    assert "model_ms_per_pair" not in computed.timings_ms  # a cost figure, in cost only
    cached = await stub.Rerank(rerank_pb2.RerankRequest(query=query, documents=documents))
    assert cached.cached == 3 and (cached.cost.queue_ms, cached.cost.service_ms) == (0, 0)
    assert cached.cost.ms_per_item == cost.ms_per_item  # still reported, and no batch ran to move it


async def test_a_request_over_several_batches_reports_its_wait_before_the_first():
    """Twelve abstracts of up to 256 tokens fill several batches of at most 1,024 tokens: the queue wait is the
    one before the first batch, the service time runs from it to the last, so the two never overlap and both
    lie within the handler's own time (the wait before the last batch overlapped the model time)."""
    import itertools

    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server
    from twostage.corpus import DEMO_CORPUS, document_text, read_corpus

    server = build_server(RerankService(RerankSettings(port=0, score_cache_mb=0, max_batch_tokens=1024)))
    port = await server.start()
    documents = [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), 12)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await rerank_pb2_grpc.RerankStub(channel).Rerank(
                rerank_pb2.RerankRequest(query=QUERY, documents=documents))
    finally:
        await server.stop(grace_s=1)
    assert reply.tokens > 2 * 1024  # more than two batches' worth
    assert reply.cost.service_ms > 0
    assert reply.cost.queue_ms + reply.cost.service_ms <= reply.timings_ms["total_ms"]


async def test_top_n_truncates(stub):
    reply = await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[*IRRELEVANT, RELEVANT], top_n=1))
    assert [r.index for r in reply.results] == [2]


@pytest.mark.slow
async def test_concurrent_batched_scores_equal_unbatched_scores(models, stub, demo_data):
    from pathlib import Path

    from rerank_server.cross_encoder import CrossEncoder
    from twostage.config import RuntimeSettings
    from twostage.corpus import document_text

    documents = [document_text(d) for d in list(demo_data["docs"].values())[:6]]
    queries = list(demo_data["queries"].values())[:3]
    replies = await asyncio.gather(
        *(stub.Rerank(rerank_pb2.RerankRequest(query=q, documents=documents)) for q in queries)
    )
    model = CrossEncoder(Path(models["ms-marco-minilm-l12"]), RuntimeSettings(), RerankSettings().max_length)
    for query, reply in zip(queries, replies):
        alone = [model.score(model.encode(query, [doc])[0])[0] for doc in documents]
        batched = {r.index: r.score for r in reply.results}
        np.testing.assert_allclose([batched[i] for i in range(len(documents))], alone, atol=1e-4)


@pytest.mark.parametrize(
    "request_, message",
    [
        (rerank_pb2.RerankRequest(query="", documents=["d"]), "query must not be empty"),
        (rerank_pb2.RerankRequest(query="q", documents=[]), "documents (count) must be between 1 and 1000"),
        (rerank_pb2.RerankRequest(query="q", documents=["d"] * 1001), "documents (count)"),
        (rerank_pb2.RerankRequest(query="q", documents=["d", "x" * 100_001]), "documents[1] is 100001 characters"),
        (rerank_pb2.RerankRequest(query="q", documents=["d"], model="bge"), "unknown model 'bge'"),
        (rerank_pb2.RerankRequest(query="q", documents=["d"], top_n=5000), "top_n"),
    ],
)
async def test_invalid_requests_are_rejected(stub, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Rerank(request_)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


@pytest.mark.parametrize("words", [150, 300])
async def test_a_long_query_is_cut_to_its_token_limit_not_refused(stub, words):
    """Over 128 tokens the query is scored by its start (the document keeps the rest of the window),
    and the reply says so; over 256 it used to fail as INTERNAL."""
    long_query = "b12 " * (words // 2)  # two tokens each
    documents = ["Vitamin B12 deficiency raises plasma homocysteine.", "The sky is blue."]
    reply = await stub.Rerank(rerank_pb2.RerankRequest(query=long_query, documents=documents))
    assert reply.query_truncated and len(reply.results) == 2
    short = await stub.Rerank(rerank_pb2.RerankRequest(query="vitamin B12", documents=documents))
    assert not short.query_truncated


async def test_info(stub):
    info = await stub.Info(common_pb2.InfoRequest())
    assert (info.model, info.max_length, info.execution_provider) == ("ms-marco-minilm-l12", 256, "CPUExecutionProvider")
    assert info.execution_plan == "single"  # as the test suite sets it (conftest)
    assert {limit.name: limit.value for limit in info.limits}["max_documents"] == 1000


async def test_info_publishes_a_cost_model_by_length_corrected_by_live_batches(stub):
    reply = await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[RELEVANT, *IRRELEVANT],
                                                       bypass_cache=True))
    assert reply.cost_ratio > 0  # this batch, measured against the model fitted at load
    info = await stub.Info(common_pb2.InfoRequest())
    assert info.pair_ms_per_token > 0 and info.pair_fixed_ms >= 0 and info.cost_ratio > 0
    full = info.pair_fixed_ms + info.pair_ms_per_token * info.max_length
    assert info.ms_per_pair == pytest.approx(full * info.cost_ratio)
    assert 3 < info.chars_per_token < 7  # English through WordPiece, from the pairs read whole


async def test_the_load_time_measurement_is_not_taken_for_live_traffic(models):
    """The cost fitted at load is timed on the model directly: the batcher's estimate, which every answer
    reports in its cost (and admission predicts with), starts from the first live batch."""
    from rerank_server.service import RerankQuery, RerankService

    service = RerankService(RerankSettings(port=0, score_cache_mb=0))
    await service.start()
    try:
        assert service.cost.ms_per_token > 0 and service.cost.max_length == 256
        assert service.batcher.ms_per_item == 0 and service.batcher.batch_cost.predict(1024) is None
        assert service.cost_ratio == 0 and service.chars_per_token == 0  # nor the warm-up's texts
        outcome = await service.rerank(RerankQuery(QUERY, [RELEVANT, *IRRELEVANT]))
        assert outcome.cost.ms_per_item == pytest.approx(outcome.cost.service_ms / 3, rel=0.05)
        assert outcome.cost_ratio > 0 and service.chars_per_token > 0
    finally:
        await service.close()


async def wait_until(condition, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.slow
async def test_overload_is_shed_with_resource_exhausted(slow_reranker):
    """A queue bound of 4 pairs: with 3 queued behind a slow batch, 2 more are refused at once
    (each request alone fits the queue)."""
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server

    settings = RerankSettings(port=0, score_cache_mb=0, max_queue_items=4, max_batch_size=1, pipeline_depth=1)
    service = RerankService(settings, model=slow_reranker(settings, delay_s=0.5))
    server = build_server(service)
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankStub(channel)
        first = asyncio.ensure_future(stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[RELEVANT] * 4)))
        await wait_until(lambda: service.batcher.queued_items == 3)  # one in the model, three waiting
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[RELEVANT] * 2))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 4" in caught.value.details()
        assert len((await first).results) == 4  # the queued work was not harmed
    await server.stop(grace_s=1)


@pytest.mark.slow
async def test_an_item_whose_deadline_passes_in_the_queue_is_dropped_uncomputed(slow_reranker):
    """The server, not only the client, gives up: the expired item never reaches the model."""
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server

    settings = RerankSettings(port=0, score_cache_mb=0, max_batch_size=1, pipeline_depth=1)
    model = slow_reranker(settings, delay_s=1.0)
    service = RerankService(settings, model=model)
    server = build_server(service)
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankStub(channel)
        computed_before = service.batcher.stats.items
        holding = asyncio.ensure_future(stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[RELEVANT])))
        await wait_until(lambda: service.batcher.longest_running_s() > 0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=[RELEVANT]), timeout=0.3)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await holding
        await wait_until(lambda: service.batcher.queued_items == 0)
        assert service.batcher.stats.items == computed_before + 1  # only the holding request was computed
    await server.stop(grace_s=1)


@pytest.mark.slow
@pytest.mark.parametrize("score_cache_mb", [0, 8])
async def test_allow_partial_answers_with_the_pairs_scored_before_the_deadline(slow_reranker, score_cache_mb):
    """One pair a batch, a second a batch, 1.6 s: the first batch is scored, the others would finish late
    and are left out. With allow_partial the scored pair comes back (the rest counted as unscored, and
    never cached as scores); without it the request is DEADLINE_EXCEEDED."""
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server

    settings = RerankSettings(port=0, score_cache_mb=score_cache_mb, max_batch_size=1, pipeline_depth=1)
    service = RerankService(settings, model=slow_reranker(settings, delay_s=1.0))
    server = build_server(service)
    port = await server.start()
    documents = [RELEVANT, *IRRELEVANT]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankStub(channel)
        await stub.Rerank(rerank_pb2.RerankRequest(query="warm up", documents=["x"]))  # learns a second a batch
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=documents, bypass_cache=True),
                              timeout=1.6)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        reply = await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=documents, allow_partial=True),
                                  timeout=1.6)
        assert len(reply.results) == 1 and reply.unscored == 2
        full = await stub.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=documents))
        assert {r.index: r.score for r in full.results}[reply.results[0].index] == reply.results[0].score
        assert full.unscored == 0 and full.cached == (1 if score_cache_mb else 0)
    await server.stop(grace_s=1)


async def test_a_sessions_plans_threads_end_with_the_server(models):
    import threading

    from rerank_server.config import RerankSettings
    from rerank_server.service import RerankService

    before = set(threading.enumerate())
    service = RerankService(RerankSettings(port=0, score_cache_mb=0, execution_plan="sessions", intra_op_threads=2))
    await service.start()
    try:
        assert service.model.plan.label == "sessions x2"
        started = {t for t in set(threading.enumerate()) - before if t.name.startswith("plan-session")}
        assert started  # the warm-up used them
    finally:
        await service.close()
    assert not any(t.is_alive() for t in started)
