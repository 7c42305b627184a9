"""The gateway prices each pair by its length under the cost model a replica publishes, corrects the model by
the replica's live ratio, follows the cost every answer reports, and is never stuck: one pair still goes when it
alone fits, or as a probe while no replica's cost has been confirmed. Fake replicas
(tests/gateway/test_rerank_pool.py) answer at once; one test runs against a real rerank server."""

import asyncio
import dataclasses
import time

import pytest

from gateway.clients import RerankClient, RerankReply
from gateway.config import GatewaySettings
from gateway.pipeline import SearchPipeline, SearchResult
from gateway.rerank_pool import DISAGREEMENT, PROBE_INTERVAL_S, RerankPool
from tests.gateway.test_rerank_pool import FakeReplica
from twostage import errors
from twostage.batching import Cost, PairCost

# A pair of t tokens costs 2 + 0.5 t ms: a short product text about 6 ms, an abstract cut at 256 tokens 130 ms.
COST = PairCost(2.0, 0.5, max_length=256, chars_per_token=4.0)
SHORT = "A tent for two"  # with the query "q": 1 + 4 + 3 tokens, 6 ms
LONG = "x" * 2_000  # cut at 256 tokens, 130 ms


def pool_with(replica, cost: PairCost | None = COST, ratio: float = 0.0, **options) -> RerankPool:
    pool = RerankPool([replica], initial_ms_per_pair=10, **options)
    pool.replicas[0].adopt_published(cost, ratio, 0.0)
    return pool


class Ratio(FakeReplica):
    """Answers with the live ratio of its model time to its published model's."""

    def __init__(self, target: str, ratio: float, **kwargs):
        super().__init__(target, **kwargs)
        self.ratio = ratio

    async def rerank(self, query, documents, timeout_s, request_id):
        reply = await super().rerank(query, documents, timeout_s, request_id)
        return dataclasses.replace(reply, cost_ratio=self.ratio)


def test_short_documents_afford_more_pairs_than_long_ones():
    pool = pool_with(FakeReplica("a"))
    assert pool.affordable_pairs(600, 1.0, "q", [LONG] * 20) == 4  # 600 / 130
    assert pool.affordable_pairs(600, 1.0, "q", [SHORT] * 200) == 100  # 600 / 6
    # A prefix is priced pair by pair: two abstracts (260 ms), then short texts in what is left.
    assert pool.affordable_pairs(600, 1.0, "q", [LONG, LONG] + [SHORT] * 200) == 2 + 56
    # Without a published model: one cost per pair, whatever the length.
    flat = pool_with(FakeReplica("a"), cost=None)
    assert flat.affordable_pairs(600, 1.0, "q", [SHORT] * 200) == flat.affordable_pairs(600, 1.0, "q", [LONG] * 200)


async def test_the_live_ratio_scales_the_model_for_every_length():
    replica = Ratio("a", ratio=2.0)
    pool = pool_with(replica)
    assert not pool.replicas[0].cost_confirmed
    await pool.rerank("q", [SHORT] * 3, time.monotonic() + 5, "r")
    assert pool.replicas[0].cost_ratio == 2.0 and pool.replicas[0].cost_confirmed
    assert pool.affordable_pairs(600, 1.0, "q", [LONG] * 20) == 2  # 600 / 260
    assert pool.affordable_pairs(600, 1.0, "q", [SHORT] * 200) == 50  # 600 / 12
    # Info says the same: its ratio is taken, and its figure per pair only until answers have said.
    pool.replicas[0].adopt_published(COST, 0.5, 999.0)
    assert pool.replicas[0].cost_ratio == 0.5 and pool.replicas[0].ms_per_pair != 999.0


class Reports(FakeReplica):
    """Answers with the cost it is given; its timings (diagnostics) say something else entirely."""

    def __init__(self, target: str, cost: Cost, **kwargs):
        super().__init__(target, **kwargs)
        self.cost = cost

    async def rerank(self, query, documents, timeout_s, request_id):
        reply = await super().rerank(query, documents, timeout_s, request_id)
        return dataclasses.replace(reply, cost=self.cost, timings_ms={"queue_ms": 1e6, "compute_ms": 1e6})


async def test_the_pool_follows_the_cost_each_answer_reports_not_its_timings():
    replica = Reports("a", Cost(queue_ms=0.0, service_ms=4 * 6.0, ms_per_item=7.0))
    pool = pool_with(replica)
    await pool.rerank("q", [SHORT] * 4, time.monotonic() + 5, "r")
    assert pool.replicas[0].ms_per_pair == 7.0  # the replica's own estimate, adopted as its rate
    assert not pool.refresh_wanted.is_set()  # 24 ms of service, as predicted (the timings' 1e6 is never read)
    replica.cost = Cost(queue_ms=0.0, service_ms=4 * 6.0 * DISAGREEMENT * 1.1, ms_per_item=20.0)
    await pool.rerank("q", [SHORT] * 4, time.monotonic() + 5, "r")
    assert pool.replicas[0].ms_per_pair == 20.0 and pool.refresh_wanted.is_set()  # service far off the prediction


def test_overhead_is_the_elapsed_time_the_reported_cost_leaves():
    pool = pool_with(FakeReplica("a"), ewma_weight=1.0)
    replica = pool.replicas[0]

    def answer(cost: Cost, elapsed_ms: float) -> None:
        reply = RerankReply(scores={0: 1.0, 1: 0.5}, timings_ms={}, tokens=0, queue_items=0, cost=cost)
        pool._observe(replica, 2, reply, elapsed_ms, predicted_ms=cost.service_ms)

    answer(Cost(queue_ms=5.0, service_ms=12.0, ms_per_item=6.0), elapsed_ms=20.0)
    assert replica.overhead_ms == pytest.approx(3.0) and replica.ms_per_pair == 6.0
    # No estimate reported (a replica that has run no batch yet): the rate moves toward service time per pair.
    answer(Cost(queue_ms=0.0, service_ms=16.0), elapsed_ms=18.0)
    assert replica.overhead_ms == pytest.approx(2.0) and replica.ms_per_pair == pytest.approx(8.0)


def test_an_answer_without_a_cost_teaches_the_pool_nothing():
    """A replica older than the Cost message answers without one: its published cost stands, where reading the
    missing figures as zeros would take its whole elapsed time, model time included, for overhead."""
    pool = pool_with(FakeReplica("a"), ewma_weight=1.0)
    replica = pool.replicas[0]
    before = (replica.ms_per_pair, replica.overhead_ms, replica.cost_confirmed)
    reply = RerankReply(scores={0: 1.0, 1: 0.5}, timings_ms={}, tokens=0, queue_items=3, cost=None)
    pool._observe(replica, 2, reply, elapsed_ms=500.0, predicted_ms=40.0)
    assert (replica.ms_per_pair, replica.overhead_ms, replica.cost_confirmed) == before
    assert replica.pairs_scored == 2 and replica.others_pairs == 3  # what it did and what it has queued still count


async def test_a_real_replica_s_reported_cost_becomes_its_rate(rerank_target, channel_to):
    from twostage.v1 import rerank_pb2, rerank_pb2_grpc

    pool = RerankPool([RerankClient(rerank_target, "rerank 0")], initial_ms_per_pair=1000.0)
    query = "what does one pair cost the cross-encoder"
    documents = [f"Pair {i}: the model time a replica reports for each pair it scores." for i in range(3)]
    try:
        outcome = await pool.rerank(query, documents, time.monotonic() + 30, "cost")
        assert len(outcome.scores) == 3 and outcome.cached == 0
        replica = pool.replicas[0]
        assert replica.cost_confirmed and replica.pairs_scored == 3 and replica.ms_per_pair != 1000.0
        # Tokenising and transport lie outside the queue and the model: what the reported cost leaves.
        assert replica.overhead_ms > 0
        # The same pairs again, straight to the replica: answered from its cache, so no batch runs and the
        # estimate it reports is still the one the pool's answer carried.
        again = await rerank_pb2_grpc.RerankStub(channel_to(rerank_target)).Rerank(
            rerank_pb2.RerankRequest(query=query, documents=documents))
        assert again.cached == 3 and again.cost.service_ms == 0
        assert replica.ms_per_pair == pytest.approx(again.cost.ms_per_item)
    finally:
        await pool.close()


async def test_an_answer_far_off_the_prediction_asks_for_the_published_costs_again():
    replica = FakeReplica("a", ms_per_pair=6.0)  # reports 6 ms of model time a pair
    pool = pool_with(replica)
    await pool.rerank("q", [SHORT] * 4, time.monotonic() + 5, "r")
    assert not pool.refresh_wanted.is_set()  # as predicted
    await pool.rerank("q", [LONG] * 4, time.monotonic() + 5, "r")
    assert pool.refresh_wanted.is_set()  # 130 ms predicted a pair, 6 taken: the model is stale


async def test_a_probe_goes_while_no_replica_cost_is_confirmed_and_at_most_so_often():
    pool = pool_with(FakeReplica("a"))
    now = time.monotonic()
    assert pool.probe(now) and pool.refresh_wanted.is_set() and pool.awaiting_confirmation()
    assert not pool.probe(now + 1) and pool.probe(now + PROBE_INTERVAL_S + 1)
    pool.replicas[0].adopt_published(COST, 1.2, 0.0)  # a live ratio: confirmed
    assert not pool.probe(now + 3 * PROBE_INTERVAL_S) and not pool.awaiting_confirmation()


async def test_work_given_up_at_the_deadline_stays_ahead_of_the_next_request():
    class Late(FakeReplica):
        async def rerank(self, query, documents, timeout_s, request_id):
            await asyncio.sleep(timeout_s)
            raise errors.DeadlineExceeded("late")

    class RefusesAtOnce(FakeReplica):
        async def rerank(self, query, documents, timeout_s, request_id):
            raise errors.DeadlineExceeded("would be late even alone")

    pool = pool_with(Late("a"))
    outcome = await pool.rerank("q", [LONG] * 3, time.monotonic() + 0.05, "r")
    assert isinstance(outcome.error, errors.DeadlineExceeded)
    assert 300 < pool.replicas[0].backlog_ms(time.monotonic()) <= 390  # 3 x 130 ms, draining
    assert pool.affordable_pairs(1000, 1.0, "q", [LONG] * 20) == 4  # (1000 - ~390) / 130
    refused = pool_with(RefusesAtOnce("a"))
    await refused.rerank("q", [LONG] * 3, time.monotonic() + 5, "r")
    assert refused.replicas[0].backlog_ms(time.monotonic()) == 0  # nothing of it reached the model


def pipeline_with(replica, confirmed: bool = True, **settings) -> SearchPipeline:
    settings = GatewaySettings(**{"rerank_slice_ms": 0, "rerank_cost_headroom": 1.5, **settings})
    return SearchPipeline(settings, [], pool_with(replica, ratio=1.0 if confirmed else 0.0))


def test_one_pair_goes_when_it_alone_fits_though_the_headroom_leaves_none():
    p = pipeline_with(FakeReplica("a"))
    # 150 ms: with the headroom (1.5) 100 ms, no abstract (130 ms); the first alone fits.
    assert p._affordable_depth(150, "q", [LONG] * 5) == 1
    assert p._affordable_depth(120, "q", [LONG] * 5) == 0  # it does not: skipped
    assert p._affordable_depth(150, "q", [LONG] * 5, top_up=True) == 0  # a top-up adds what fits, no more


def test_a_probe_goes_while_no_replica_cost_is_confirmed():
    p = pipeline_with(FakeReplica("a"), confirmed=False)
    assert p._affordable_depth(50, "q", [LONG] * 5) == 1  # the published model may be far off: ask
    assert p._affordable_depth(50, "q", [LONG] * 5) == 0  # once, then not for PROBE_INTERVAL_S


async def test_a_search_never_stuck_sends_the_first_candidate():
    from tests.gateway.test_rerank_rounds import by_length

    replica = FakeReplica("a")
    p = pipeline_with(replica, confirmed=False)
    candidates = by_length([2_000] * 5)
    result = SearchResult(hits=[], request_id="r")
    # 70 ms in all, 50 left after the return margin: no abstract fits, and none would ever be sent.
    scores = await p._rerank("q", candidates, time.monotonic() + 0.07, "r", result)
    assert list(scores) == [0] and len(replica.received) == 1 and len(replica.received[0]) == 1
    assert result.degraded_reason.startswith("rerank_partial")


async def test_pairs_that_would_take_over_half_the_time_left_go_in_two_calls():
    from tests.gateway.test_rerank_rounds import by_length

    replica = FakeReplica("a")
    p = pipeline_with(replica, rerank_cost_headroom=1.0)
    result = SearchResult(hits=[], request_id="r")
    # 7 ms a pair ("q" and "x" * 24: 1 + 6 + 3 tokens), 60 ms left after the margin: 8 of 20 fit.
    await p._rerank("q", by_length([24] * 20), time.monotonic() + 0.08, "r", result)
    assert len(replica.received[0]) == 4 and len(replica.received) >= 2  # then the top-ups
    # All 5 fit, but in 35 of the 60 ms: two calls still.
    replica.received.clear()
    await p._rerank("q", by_length([24] * 5), time.monotonic() + 0.08, "r", result)
    assert [len(r) for r in replica.received] == [3, 2]
    # In less than half the time: one call.
    replica.received.clear()
    await p._rerank("q", by_length([24] * 5), time.monotonic() + 0.2, "r", result)
    assert [len(r) for r in replica.received] == [5]


@pytest.mark.parametrize("ratio, expected", [(0.0, 1.0), (0.8, 0.8)])
def test_info_without_a_live_ratio_leaves_the_model_as_published(ratio, expected):
    pool = pool_with(FakeReplica("a"), ratio=ratio)
    assert pool.replicas[0].cost_ratio == expected and pool.replicas[0].cost_confirmed == bool(ratio)
