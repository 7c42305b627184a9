"""Pseudo-relevance feedback at the gateway, over fake shards whose answers each test sets: over several shards
the feedback comes from the global first pass's top hits, whichever shard holds them; one shard runs it itself;
a budget too short for a second round, or a shard failing it, leaves the first round's answer, marked."""

import dataclasses
import time

import numpy as np
import pytest

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
                 skipped: str = "", fail_first=False):
        self.first, self.second, self.fail_second, self.skipped = first, list(second), fail_second, skipped
        self.fail_first = fail_first
        self.calls: list[dict] = []

    async def search(self, query, k, deadline_s, request_id, mode=None, filter_=None, replica=None, **fields):
        self.calls.append(fields)
        if fields.get("feedback_vector") is None and self.fail_first:
            raise errors.Unavailable("recall shard 2: the replica went away")
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
    return SearchQuery("q", top_k=3, recall_k=3, skip_rerank=True, **{"recall_mode": "dense", **fields})


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
        assert zero.calls == [{"prf": feedback.OFF, "return_vectors": 0}]
        assert [h.id for h in result.hits] == ["a0", "b0"] and not result.degraded
    # Dense recall gets feedback only when the request asks (the default is for hybrid); lexical recall never: no
    # vectors asked for.
    for fields in ({}, {"recall_mode": "lexical", "prf_depth": 2}):
        one.calls.clear()
        await pipeline(zero, one).search(query(**fields))
        assert one.calls == [{"prf": feedback.OFF, "return_vectors": 0}]


async def test_several_shards_never_run_feedback_of_their_own():
    """Whatever the shards' settings, over several shards feedback is the gateway's (from the global top hits) or
    none: a shard told nothing would run its own from its own top hits."""
    zero, one = FakeShard({"a0": (0.9, A)}), FakeShard({"b0": (0.8, B)})
    off = SearchPipeline(GatewaySettings(), [zero, one], RerankPool([], 1.0), StageLimits(recall_prf_depth=0))
    await off.search(SearchQuery("q", top_k=2, recall_k=2, skip_rerank=True, recall_mode="hybrid"))
    assert zero.calls == one.calls == [{"prf": feedback.OFF, "return_vectors": 0}]


async def test_a_shard_that_failed_the_first_round_is_not_asked_the_second():
    zero = FakeShard({"a0": (0.9, A)}, second=["n0", "a0"])
    one = FakeShard({"b0": (0.8, B)}, second=["b0"])
    down = FakeShard({"c0": (0.95, A)}, second=["c0"], fail_first=True)
    result = await pipeline(zero, one, down).search(query(prf_depth=2))
    assert len(down.calls) == 1 and len(zero.calls) == len(one.calls) == 2
    assert [h.id for h in result.hits] == ["n0", "b0", "a0"]  # the second round of the shards that answered
    assert [d.code.value for d in result.degradations] == ["recall_partial"]


async def test_a_depth_above_recall_k_is_refused_and_a_default_one_reads_every_hit():
    shard = FakeShard({"a0": (0.9, A)})
    with pytest.raises(errors.InvalidArgument, match=r"prf_depth \(4\) must not exceed recall_k \(3\)"):
        await pipeline(shard, FakeShard({"b0": (0.8, B)})).search(query(prf_depth=4))
    deep = SearchPipeline(GatewaySettings(), [shard], RerankPool([], 1.0), StageLimits(recall_prf_depth=8))
    await deep.search(query(prf_weight=0.25))
    assert shard.calls[-1] == {"prf": feedback.Feedback(3, 0.25), "return_vectors": 0}  # what the shard accepts


async def test_one_shard_runs_feedback_itself_and_its_skip_is_reported():
    shard = FakeShard({"a0": (0.9, A)})
    await pipeline(shard).search(query())
    assert shard.calls == [{"prf": None, "return_vectors": 0}]  # not asked: the shard's own settings
    result = await pipeline(shard).search(query(prf_depth=3))
    assert shard.calls[-1] == {"prf": feedback.Feedback(3, 0.5), "return_vectors": 0}
    assert result.timings_ms["prf_ms"] == 0.7 and result.timings_ms["recall.prf_ms"] == 0.7
    skipping = FakeShard({"a0": (0.9, A)}, skipped="3 ms left, a second pass needs about 5 ms")
    result = await pipeline(skipping).search(query(prf_depth=3))
    assert result.degraded_reason == "prf_skipped (3 ms left, a second pass needs about 5 ms)"


class FakeReplica:
    """One replica of a shard: the shard's first round, answered as this replica; records who was asked what."""

    def __init__(self, target: str, shard: FakeShard, asked: list):
        self.target, self.shard, self.asked = target, shard, asked

    async def search(self, query, k, timeout_s, request_id, mode=None, filter_=None, **fields):
        self.asked.append((self.shard, self.target, "second" if fields.get("feedback_vector") is not None else "first"))
        reply = await self.shard.search(query, k, None, request_id, mode, filter_, **fields)
        return dataclasses.replace(reply, replica=self.target)

    async def close(self):
        pass


async def test_the_second_round_goes_to_the_replica_that_answered_the_first():
    """That replica kept the query's BM25 matches from the first round; the others would read BM25 again."""
    from gateway.recall_tier import RecallShard
    from twostage.membership import Target

    asked = []
    fakes = [FakeShard({"a0": (0.9, A)}, second=["a0"]), FakeShard({"b0": (0.8, B)}, second=["b0"])]
    shards = [RecallShard(i, Target(f"127.0.0.1:{10 + i}|127.0.0.1:{20 + i}"),
                          lambda address, name, fake=fake: FakeReplica(address, fake, asked))
              for i, fake in enumerate(fakes)]
    for _ in range(4):  # the turn moves on with each search: each replica answers some first rounds
        asked.clear()
        result = await pipeline(*shards).search(query(prf_depth=2))
        assert not result.degraded and "prf_ms" in result.timings_ms
        first = {shard: target for shard, target, round_ in asked if round_ == "first"}
        second = {shard: target for shard, target, round_ in asked if round_ == "second"}
        assert second == first and len(asked) == 4
