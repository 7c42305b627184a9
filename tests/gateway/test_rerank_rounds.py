"""Reranking in rounds: the first hits a frontend shows, then more only while the last round still
changed them; the budget caps the rounds; without the option the whole affordable prefix goes at once.
A fake replica scores a document by its length, so each test decides what a round finds."""

import time

from gateway.clients import RecallCandidate
from gateway.config import GatewaySettings
from gateway.pipeline import SearchPipeline, SearchResult
from gateway.rerank_pool import RerankPool
from tests.gateway.test_rerank_pool import FakeReplica, QueuedReplica


def pipeline(round_pairs: int, ms_per_pair: float = 1.0) -> tuple[SearchPipeline, FakeReplica]:
    replica = FakeReplica("a", ms_per_pair=ms_per_pair)
    settings = GatewaySettings(rerank_round_pairs=round_pairs, rerank_round_top_k=3, rerank_slice_ms=0)
    return SearchPipeline(settings, [], RerankPool([replica], initial_ms_per_pair=ms_per_pair)), replica


def by_length(lengths: list[int]) -> list[RecallCandidate]:
    return [RecallCandidate(f"d{i}", "", "x" * n, 0.9 - 0.01 * i) for i, n in enumerate(lengths)]


async def rerank(p: SearchPipeline, candidates, budget_s: float = 10.0, top_k: int = 10):
    result = SearchResult(hits=[], request_id="r")

    def rank(scores):
        return SearchPipeline._rank(candidates, scores, "none", 1.0)

    scores = await p._rerank("q", candidates, time.monotonic() + budget_s, "r", result, top_k, rank)
    return scores, result


async def test_rounds_stop_once_a_round_changes_nothing_in_the_watched_hits():
    p, replica = pipeline(round_pairs=2)
    # The first three are long (high scores); everything after is short: the first extra round finds nothing.
    scores, result = await rerank(p, by_length([90, 80, 70, 5, 4, 3, 2, 1]))
    assert sorted(scores) == [0, 1, 2, 3, 4]
    assert [len(r) for r in replica.received] == [3, 2]
    assert not result.degraded  # stopped by evidence, not cut by the budget


async def test_rounds_go_on_while_each_round_reaches_the_watched_hits():
    p, replica = pipeline(round_pairs=2)
    scores, _ = await rerank(p, by_length([10, 20, 30, 40, 50, 60, 70]))  # each later one scores higher
    assert sorted(scores) == list(range(7))
    assert [len(r) for r in replica.received] == [3, 2, 2]


async def test_the_budget_still_caps_the_rounds():
    p, replica = pipeline(round_pairs=2, ms_per_pair=100.0)
    # 100 ms a pair and 0.6 s: the budget affords about five pairs, whatever the rounds would find.
    scores, result = await rerank(p, by_length([10, 20, 30, 40, 50, 60, 70]), budget_s=0.6)
    assert len(scores) < 7 and sum(len(r) for r in replica.received) == len(scores)
    assert result.degraded_reason.startswith("rerank_partial")


async def test_without_rounds_the_affordable_prefix_goes_at_once():
    p, replica = pipeline(round_pairs=0)
    scores, _ = await rerank(p, by_length([90, 80, 70, 5, 4, 3, 2, 1]))
    assert sorted(scores) == list(range(8)) and [len(r) for r in replica.received] == [8]


def queued_pipeline(top_up: bool) -> tuple[SearchPipeline, QueuedReplica]:
    replica = QueuedReplica("a", ms_per_pair=20)
    settings = GatewaySettings(rerank_top_up=top_up, rerank_slice_ms=0)
    pool = RerankPool([replica], initial_ms_per_pair=20)
    # Another caller had 15 pairs (300 ms) queued at the replica's last answer, then went away: the first
    # depth is chosen behind a queue that is no longer there.
    pool.replicas[0].others_pairs, pool.replicas[0].others_seen_s = 15, time.monotonic()
    return SearchPipeline(settings, [], pool), replica


async def test_time_left_after_the_first_depth_buys_more_candidates():
    p, replica = queued_pipeline(top_up=True)
    start = time.monotonic()
    scores, result = await rerank(p, by_length(range(1, 21)), budget_s=0.6)
    first = len(replica.received[0])
    assert first < 20 and len(replica.received) >= 2  # the first depth was cut, then topped up
    assert len(scores) > first and sum(map(len, replica.received)) == len(scores)
    assert time.monotonic() - start < 0.6  # within the budget: each top-up is what the time left affords
    if len(scores) == 20:
        assert not result.degraded


async def test_without_top_up_the_depth_chosen_on_arrival_is_final():
    p, replica = queued_pipeline(top_up=False)
    scores, result = await rerank(p, by_length(range(1, 21)), budget_s=0.6)
    assert len(replica.received) == 1 and len(scores) == len(replica.received[0]) < 20
    assert result.degraded_reason.startswith("rerank_partial")
