"""Pseudo-relevance feedback at the gateway, over fake shards whose answers each test sets: over several shards
the feedback comes from the global first pass's top hits, whichever shard holds them; one shard runs it itself;
a budget too short for a second round, or a shard failing it, leaves the first round's answer, marked."""

import time

import numpy as np

from gateway.clients import RecallCandidate, RecallReply
from gateway.config import GatewaySettings
from gateway.pipeline import SearchPipeline, SearchQuery, StageLimits
from gateway.rerank_pool import RerankPool
from twostage import errors, feedback

DIMS = 4


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


QUERY_VECTOR = unit(1, 0, 0, 0)


class FakeShard:
    """Answers the first round with ``first`` (cosines given), the second with ``second``; records each call's
    feedback fields."""

    def __init__(self, first: dict[str, tuple[float, np.ndarray]], second: list[str] = (), fail_second=False,
                 skipped: str = ""):
        self.first, self.second, self.fail_second, self.skipped = first, list(second), fail_second, skipped
        self.calls: list[dict] = []

    async def search(self, query, k, deadline_s, request_id, mode=None, filter_=None, **fields):
        self.calls.append(fields)
        if fields.get("feedback_vector") is not None:
            if self.fail_second:
                raise errors.Unavailable("recall shard 1: the replica went away")
            ranked = [RecallCandidate(doc_id, "", "t", 0.5 - 0.01 * i, dense_score=0.4, prf_dense_score=0.5 - 0.01 * i)
                      for i, doc_id in enumerate(self.second)]
            return RecallReply(ranked, {"total_ms": 1.0}, "dense", None)
        wanted = fields.get("return_vectors", 0)
        ranked = [RecallCandidate(doc_id, "", "t", cosine, dense_score=cosine, vector=vector if i < wanted else None)
                  for i, (doc_id, (cosine, vector)) in enumerate(self.first.items())]
        prf = fields.get("prf")
        timings = {"total_ms": 2.0, **({"prf_ms": 0.7} if prf is not None and prf.active else {})}
        return RecallReply(ranked, timings, "dense", None, QUERY_VECTOR if wanted else None,
                           prf_skipped=self.skipped)

    async def close(self):
        pass


def pipeline(*shards: FakeShard) -> SearchPipeline:
    limits = StageLimits(recall_prf_depth=2, recall_prf_weight=0.5)
    return SearchPipeline(GatewaySettings(), list(shards), RerankPool([], 1.0), limits)


def query(**fields) -> SearchQuery:
    return SearchQuery("q", top_k=3, recall_k=3, skip_rerank=True, recall_mode="dense", **fields)


A, B = unit(0, 1, 0, 0), unit(0, 0, 1, 0)


async def test_over_several_shards_feedback_comes_from_the_global_top_hits():
    # Shard 0 holds the best hit and the fourth; shard 1 the second and third. Each shard's own top two would
    # give other vectors than the global top two (a0, b0).
    zero = FakeShard({"a0": (0.9, A), "a1": (0.5, unit(0, 0, 0, 1))}, second=["n0", "a0"])
    one = FakeShard({"b0": (0.8, B), "b1": (0.7, unit(1, 1, 0, 0))}, second=["b0", "n1"])
    result = await pipeline(zero, one).search(query(prf_depth=2))
    expected = feedback.refine(QUERY_VECTOR, np.stack([A, B]), 0.5)
    for shard in (zero, one):
        first, second = shard.calls
        assert first["prf"] == feedback.OFF and first["return_vectors"] == 3  # vectors of every candidate
        assert second["feedback_vector"].tobytes() == expected.tobytes()
        assert second["query_vector"] is QUERY_VECTOR and second["prf"] == feedback.OFF
    assert [h.id for h in result.hits] == ["n0", "b0", "a0"]  # the second round's order
    assert not result.degraded and result.timings_ms["prf_ms"] >= 0 and "prf.total_ms" in result.timings_ms


async def test_a_budget_too_short_for_the_second_round_keeps_the_first_and_says_so():
    zero = FakeShard({"a0": (0.9, A)}, second=["n0"])
    one = FakeShard({"b0": (0.8, B)}, second=["n1"])
    # The deadline has passed once the first round is back: no second round fits.
    result = await pipeline(zero, one).search(query(prf_depth=2, deadline_s=time.monotonic()))
    assert [h.id for h in result.hits] == ["a0", "b0"]
    assert [d.code.value for d in result.degradations] == ["prf_skipped"]
    assert "of recall's share left, the second round needs about" in result.degraded_reason
    assert len(zero.calls) == len(one.calls) == 1 and "prf_ms" not in result.timings_ms


async def test_a_shard_failing_the_second_round_keeps_the_first():
    zero = FakeShard({"a0": (0.9, A)}, second=["n0"])
    one = FakeShard({"b0": (0.8, B)}, second=["n1"], fail_second=True)
    result = await pipeline(zero, one).search(query(prf_depth=2))
    assert [h.id for h in result.hits] == ["a0", "b0"]
    assert result.degraded_reason.startswith("prf_skipped (1 of 2 shards answered the second round (recall shard 1")


async def test_without_feedback_one_round_and_no_vectors():
    zero, one = FakeShard({"a0": (0.9, A)}), FakeShard({"b0": (0.8, B)})
    for fields in ({"prf_depth": 0}, {"prf_weight": 0.0}):
        zero.calls.clear()
        result = await pipeline(zero, one).search(query(**fields))
        assert zero.calls == [{"prf": feedback.Feedback(0, 0.5) if "prf_depth" in fields else feedback.Feedback(2, 0),
                               "return_vectors": 0}]
        assert [h.id for h in result.hits] == ["a0", "b0"] and not result.degraded
    # Dense recall gets feedback only when the request asks: the default is for hybrid.
    one.calls.clear()
    await pipeline(zero, one).search(query())
    assert len(one.calls) == 1


async def test_one_shard_runs_feedback_itself_and_its_skip_is_reported():
    shard = FakeShard({"a0": (0.9, A)})
    await pipeline(shard).search(query())
    assert shard.calls == [{"prf": None, "return_vectors": 0}]  # not asked: the shard's own settings
    result = await pipeline(shard).search(query(prf_depth=4))
    assert shard.calls[-1] == {"prf": feedback.Feedback(4, 0.5), "return_vectors": 0}
    assert result.timings_ms["prf_ms"] == 0.7 and result.timings_ms["recall.prf_ms"] == 0.7
    skipping = FakeShard({"a0": (0.9, A)}, skipped="3 ms left, a second pass needs about 5 ms")
    result = await pipeline(skipping).search(query(prf_depth=4))
    assert result.degraded_reason == "prf_skipped (3 ms left, a second pass needs about 5 ms)"
