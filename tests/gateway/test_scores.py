"""Scores a frontend can use: order and score agree in every case, calibrated relevance in [0, 1],
comparable across queries; per-request knobs; tiny budgets degrade instead of failing."""

import math

import grpc
import pytest

from gateway.clients import RecallCandidate
from gateway.pipeline import SearchPipeline
from twostage.v1 import gateway_pb2, gateway_pb2_grpc

RELEVANT_QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."
NONSENSE_QUERY = "zxqv blorp wibble"


@pytest.fixture
def stub(gateway_target, channel_to):
    return gateway_pb2_grpc.GatewayStub(channel_to(gateway_target))


def candidates(n: int) -> list[RecallCandidate]:
    return [RecallCandidate(f"d{i}", "", "t", 0.9 - 0.01 * i) for i in range(n)]


@pytest.mark.parametrize("fusion", ["none", "linear", "rrf", "calibrated"])
@pytest.mark.parametrize("reranked", [10, 4, 0])
def test_scores_descend_with_rank_whatever_was_reranked(fusion, reranked):
    scores = {i: (-1.0) ** i * (3 - i) for i in range(reranked)}  # rerank disagrees with recall
    hits = SearchPipeline._rank(candidates(10), scores, fusion, 0.7)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    if reranked:  # every hit that was not reranked scores strictly below every one that was
        assert hits[reranked - 1].score > max((h.score for h in hits[reranked:]), default=-math.inf)
    assert [h.rerank_score is not None for h in hits] == [True] * reranked + [False] * (10 - reranked)


def test_calibrated_relevance_lies_in_unit_range_and_ranks_like_the_logit():
    scores = {i: logit for i, logit in enumerate([-11.0, -2.0, 0.0, 3.5, 9.0])}
    hits = SearchPipeline._rank(candidates(5), scores, "calibrated", 0.7)
    assert all(0 <= h.relevance <= 1 and 0 <= h.score <= 1 for h in hits)
    by_logit = sorted(hits, key=lambda h: h.rerank_score)
    assert [h.relevance for h in by_logit] == sorted(h.relevance for h in by_logit)
    assert all(h.relevance == pytest.approx(1 / (1 + math.exp(-h.rerank_score))) for h in hits)


def test_hits_carry_the_fused_score_and_each_candidates_own_recall_scores():
    # The recall order's score (here a hybrid fusion's) differs from the cosine; recall z-scores are exact
    # (mean 0, spread 5) and so are rerank's (mean 2, spread 5), so the linear scores compare with ==.
    pool = [RecallCandidate(f"d{i}", "", "t", score, dense_score=cosine, lexical_score=bm25) for i, (score, cosine, bm25)
            in enumerate([(7.0, 0.5, 14.0), (1.0, 0.75, 10.0), (-1.0, 0.25, 12.0), (-7.0, 0.625, 6.0),
                          (-8.0, 0.375, 16.0)])]
    rerank = {0: 1.0, 1: -5.0, 2: 9.0, 3: 3.0}
    hits = SearchPipeline._rank(pool, rerank, "linear", 0.5)
    fused = {0: 0.5 * (-1 / 5) + 0.5 * (7 / 5), 1: 0.5 * (-7 / 5) + 0.5 * (1 / 5), 2: 0.5 * (7 / 5) + 0.5 * (-1 / 5),
             3: 0.5 * (1 / 5) + 0.5 * (-7 / 5)}
    # Positions 0 and 2 tie, and 1 and 3: recall order decides; the one not reranked keeps its recall score.
    assert [(h.id, h.score) for h in hits] == [("d0", fused[0]), ("d2", fused[2]), ("d1", fused[1]),
                                               ("d3", fused[3]), ("d4", -8.0)]
    assert [(h.recall_rank, h.recall_score, h.dense_score, h.lexical_score, h.rerank_score) for h in hits] == [
        (i + 1, pool[i].score, pool[i].dense_score, pool[i].lexical_score, rerank.get(i)) for i in (0, 2, 1, 3, 4)]
    assert [h.relevance for h in hits[:4]] == [pytest.approx(1 / (1 + math.exp(-rerank[i])), rel=1e-15)
                                               for i in (0, 2, 1, 3)]
    assert hits[4].relevance is None


async def test_a_query_with_nothing_relevant_scores_below_one_with_a_match(stub, demo_data):
    def search(query):
        return stub.Search(gateway_pb2.SearchRequest(query=query, recall_k=8, budget_ms=60_000,
                                                     fusion=gateway_pb2.FUSION_CALIBRATED))

    query_id = next(iter(demo_data["qrels"]))  # its relevant documents are in the test index
    document = demo_data["docs"][next(iter(demo_data["qrels"][query_id]))]
    asked = f"{document.title} {document.text[:200]}"  # a question its own abstract answers
    relevant, nonsense = await search(asked), await search(NONSENSE_QUERY)
    assert relevant.hits[0].score > 0.5 > nonsense.hits[0].score
    assert relevant.hits[0].relevance > 0.5 > nonsense.hits[0].relevance
    # A relative fusion cannot tell: per-query z-scores put the best of any query above the average.
    linear = await stub.Search(gateway_pb2.SearchRequest(query=NONSENSE_QUERY, recall_k=8, budget_ms=60_000,
                                                         fusion=gateway_pb2.FUSION_LINEAR))
    assert linear.hits[0].score > 0


async def test_score_threshold_drops_the_tail(stub):
    full = await stub.Search(gateway_pb2.SearchRequest(query=RELEVANT_QUERY, recall_k=8, top_k=8, budget_ms=60_000,
                                                       fusion=gateway_pb2.FUSION_CALIBRATED))
    cut = (full.hits[3].score + full.hits[4].score) / 2
    thresholded = await stub.Search(gateway_pb2.SearchRequest(
        query=RELEVANT_QUERY, recall_k=8, top_k=8, budget_ms=60_000, fusion=gateway_pb2.FUSION_CALIBRATED,
        score_threshold=cut))
    assert [h.id for h in thresholded.hits] == [h.id for h in full.hits if h.score >= cut]
    assert len(thresholded.hits) < len(full.hits)


async def test_per_request_fusion_overrides_the_default_and_is_validated(stub):
    request = gateway_pb2.SearchRequest(query=RELEVANT_QUERY, recall_k=8, budget_ms=60_000)
    default = await stub.Search(request)
    request.fusion = gateway_pb2.FUSION_NONE
    rerank_only = await stub.Search(request)
    assert [h.score for h in rerank_only.hits] == [h.rerank_score for h in rerank_only.hits]
    assert [h.score for h in default.hits] != [h.score for h in rerank_only.hits]
    request.fusion_alpha = 1.5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Search(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "fusion_alpha" in caught.value.details()
    skipped = await stub.Search(gateway_pb2.SearchRequest(query=RELEVANT_QUERY, recall_k=8, skip_rerank=True))
    assert skipped.reranked == 0 and not skipped.degraded and all(h.relevance == 0 for h in skipped.hits)
    info = await stub.Info(gateway_pb2.InfoRequest() if hasattr(gateway_pb2, "InfoRequest") else _info())
    assert info.default_fusion != gateway_pb2.FUSION_METHOD_UNSPECIFIED and 0 <= info.default_fusion_alpha <= 1


def _info():
    from twostage.v1 import common_pb2

    return common_pb2.InfoRequest()


async def test_a_tiny_budget_gets_recall_order_marked_degraded(stub):
    """5 ms: no time for rerank; recall answers within it (or one clear DEADLINE_EXCEEDED if it cannot)."""
    try:
        reply = await stub.Search(gateway_pb2.SearchRequest(query=RELEVANT_QUERY, recall_k=8, budget_ms=5))
    except grpc.aio.AioRpcError as error:
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details().startswith("no answer within 5 ms: recall did not answer in time")
        return
    assert reply.degraded and reply.reranked == 0
    assert [h.recall_rank for h in reply.hits] == sorted(h.recall_rank for h in reply.hits)
    assert [h.score for h in reply.hits] == sorted((h.score for h in reply.hits), reverse=True)
