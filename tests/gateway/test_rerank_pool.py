"""RerankPool's bookkeeping with fake replicas (fault injection only)."""

import asyncio
import dataclasses
import time

import pytest

from gateway.clients import RerankReply
from gateway.rerank_pool import RerankPool
from twostage import errors
from twostage.batching import Cost
from twostage.probe import Health

SERVING, NOT_SERVING, SILENT = Health.SERVING, Health.NOT_SERVING, Health.UNKNOWN


class FakeReplica:
    """Answers by document length, or fails as told; records what it was sent."""

    def __init__(self, target: str, fail_with: Exception | None = None, ms_per_pair: float = 10.0,
                 health: list | None = None):
        self.target = target
        self.fail_with = fail_with
        self.ms_per_pair = ms_per_pair
        self.received: list[list[str]] = []
        self.health = health if health is not None else [SERVING]  # answers in turn; the last one repeats

    async def health_status(self, timeout_s):
        return self.health.pop(0) if len(self.health) > 1 else self.health[0]

    async def rerank(self, query, documents, timeout_s, request_id):
        self.received.append(documents)
        if self.fail_with:
            raise self.fail_with
        return RerankReply(
            scores={i: float(len(d)) for i, d in enumerate(documents)},
            timings_ms={"total_ms": self.ms_per_pair * len(documents), "compute_ms": self.ms_per_pair * len(documents),
                        "queue_ms": 0.0},
            tokens=0, queue_items=0,
            cost=Cost(queue_ms=0.0, service_ms=self.ms_per_pair * len(documents), ms_per_item=self.ms_per_pair),
        )

    async def close(self):
        pass


DOCS = [f"doc {'x' * i}" for i in range(10)]


async def score_all(pool):
    return await pool.rerank("q", DOCS, time.monotonic() + 5, "r1")


async def test_pairs_are_split_across_replicas_and_scored_in_place():
    a, b = FakeReplica("a"), FakeReplica("b")
    outcome = await score_all(RerankPool([a, b], initial_ms_per_pair=10, affinity=False))
    assert outcome.scores == {i: float(len(d)) for i, d in enumerate(DOCS)}
    assert sorted(len(r) for r in (a.received[0], b.received[0])) == [5, 5]


async def test_a_slower_replica_gets_fewer_pairs():
    fast, slow = FakeReplica("fast"), FakeReplica("slow")
    pool = RerankPool([fast, slow], initial_ms_per_pair=10, affinity=False)
    pool.replicas[1].ms_per_pair = 40
    await score_all(pool)
    assert (len(fast.received[0]), len(slow.received[0])) == (8, 2)


async def test_a_document_goes_to_the_same_replica_every_time_in_proportion_to_speed():
    """Affinity: a rendezvous hash of the text picks the replica, so a repeated pair meets its cached score;
    over many documents each replica's share follows its speed."""
    fast, slow = FakeReplica("fast", ms_per_pair=10), FakeReplica("slow", ms_per_pair=30)
    pool = RerankPool([fast, slow], initial_ms_per_pair=10, affinity=True)
    pool.replicas[1].ms_per_pair = 30
    documents = [f"document number {i}" for i in range(2000)]
    first = await pool.rerank("q", documents, time.monotonic() + 5, "r1")
    placed = {d: "fast" for r in fast.received for d in r} | {d: "slow" for r in slow.received for d in r}
    fast.received.clear(), slow.received.clear()
    again = await pool.rerank("another query", documents[:500][::-1], time.monotonic() + 5, "r2")
    assert again.scores and all(placed[d] == "fast" for r in fast.received for d in r)
    assert all(placed[d] == "slow" for r in slow.received for d in r)
    assert len(first.scores) == 2000
    share_fast = sum(v == "fast" for v in placed.values()) / len(placed)
    assert 0.70 < share_fast < 0.80  # three times as fast: three quarters of the documents


async def test_a_failed_slice_is_retried_on_another_replica():
    broken, healthy = FakeReplica("broken", errors.Unavailable("down")), FakeReplica("healthy")
    outcome = await score_all(RerankPool([broken, healthy], initial_ms_per_pair=10))
    assert len(outcome.scores) == len(DOCS) and outcome.failed_slices == 1
    assert sum(len(r) for r in healthy.received) == len(DOCS)


async def test_a_replica_that_keeps_failing_is_ejected():
    broken, healthy = FakeReplica("broken", errors.Unavailable("down")), FakeReplica("healthy")
    pool = RerankPool([broken, healthy], initial_ms_per_pair=10, eject_after_failures=2, eject_s=60)
    await score_all(pool)
    await score_all(pool)
    assert [r.target for r in pool.available()] == ["healthy"]
    await score_all(pool)
    assert len(broken.received) == 2  # not tried once ejected


async def test_cost_model_learns_and_bounds_depth():
    replica = FakeReplica("a", ms_per_pair=50)
    pool = RerankPool([replica], initial_ms_per_pair=10, ewma_weight=1.0)
    assert pool.affordable_pairs(1000, headroom=1.0) == 100
    await score_all(pool)
    assert pool.replicas[0].ms_per_pair == pytest.approx(50)
    assert pool.affordable_pairs(1000, headroom=1.0) == 20
    assert pool.affordable_pairs(1000, headroom=2.0) == 10


async def test_nothing_available_is_an_error_not_a_hang():
    pool = RerankPool([FakeReplica("a", errors.Unavailable("down"))], initial_ms_per_pair=10)
    outcome = await score_all(pool)
    assert outcome.scores == {} and isinstance(outcome.error, errors.Unavailable)


async def test_health_needs_repeated_silence_but_obeys_not_serving():
    pool = RerankPool([FakeReplica("a", health=[SILENT, SILENT, SILENT, SERVING]),
                       FakeReplica("b", health=[NOT_SERVING, SERVING])],
                      initial_ms_per_pair=10)
    seen = []
    for _ in range(4):
        await pool.check_health(timeout_s=1, misses_to_eject=3)
        seen.append([r.serving for r in pool.replicas])
    # a: silent three times, out on the third; back when it answers. b: out at once, back next round.
    assert seen == [[True, False], [True, True], [False, True], [True, True]]


async def test_start_waits_for_a_loading_replica():
    replica = FakeReplica("a", health=[NOT_SERVING, NOT_SERVING, SERVING])
    pool = RerankPool([replica], initial_ms_per_pair=10)
    assert await pool.wait_for_a_replica(timeout_s=10, period_s=0.001)
    assert replica.health == [SERVING]  # it checked until the replica said SERVING

    pool = RerankPool([FakeReplica("a", health=[NOT_SERVING])], initial_ms_per_pair=10)
    assert not await pool.wait_for_a_replica(timeout_s=0)


async def test_start_does_not_take_silence_for_serving():
    """A replica still starting refuses connections (no answer): the gateway must keep waiting."""
    replica = FakeReplica("a", health=[SILENT, SILENT, SERVING])
    pool = RerankPool([replica], initial_ms_per_pair=10)
    assert await pool.wait_for_a_replica(timeout_s=10, period_s=0.001)
    assert replica.health == [SERVING]


class QueuedReplica:
    """A replica as the server behaves: one model, pairs served in arrival order at a known service time
    each, reporting queue, compute, service time and what is still queued, as the rerank server does."""

    def __init__(self, target: str, ms_per_pair: float, overhead_ms: float = 2.0):
        self.target = target
        self.ms_per_pair = ms_per_pair
        self.overhead_ms = overhead_ms
        self.model = asyncio.Lock()
        self.queued = 0
        self.received: list[list[str]] = []

    async def rerank(self, query, documents, timeout_s, request_id):
        self.received.append(documents)
        await asyncio.sleep(self.overhead_ms / 1000)
        arrived = time.monotonic()
        self.queued += len(documents)
        async with self.model:
            started = time.monotonic()
            await asyncio.sleep(self.ms_per_pair * len(documents) / 1000)
        self.queued -= len(documents)
        cost = Cost(queue_ms=1000 * (started - arrived), service_ms=self.ms_per_pair * len(documents),
                    ms_per_item=self.ms_per_pair)
        return RerankReply(
            scores={i: 0.0 for i in range(len(documents))},
            timings_ms={"queue_ms": cost.queue_ms, "compute_ms": cost.service_ms},
            tokens=0, queue_items=self.queued, cost=cost,
        )

    async def health_status(self, timeout_s):
        return True

    async def close(self):
        pass


async def test_the_cost_model_predicts_completion_within_ten_percent():
    """Service time and the queue ahead, each counted once, predict when concurrent requests finish."""
    replica = QueuedReplica("a", ms_per_pair=20)
    pool = RerankPool([replica], initial_ms_per_pair=100)  # a wrong guess, corrected by the first answers
    for _ in range(6):
        await pool.rerank("q", ["d"] * 5, time.monotonic() + 10, "warm")
    predicted, finished = [], []

    async def one(i):
        predicted.append(pool.replicas[0].predict_ms(5))
        start = time.monotonic()
        await pool.rerank("q", ["d"] * 5, time.monotonic() + 10, f"r{i}")
        finished.append(1000 * (time.monotonic() - start))

    tasks = []
    for i in range(4):  # each sent while the earlier ones are queued
        tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    for p, f in zip(predicted, finished):
        assert f == pytest.approx(p, rel=0.10), (predicted, finished)
    assert finished[-1] > 3 * finished[0]  # the queue really was there, and counted once


async def test_work_half_done_counts_half():
    """The backlog drains while the replica works: a request sent halfway through another's pairs is
    predicted to wait for the half that is left, not the whole."""
    replica = QueuedReplica("a", ms_per_pair=20)
    pool = RerankPool([replica], initial_ms_per_pair=20)
    await pool.rerank("q", ["d"], time.monotonic() + 10, "warm")
    long = asyncio.ensure_future(pool.rerank("q", ["d"] * 20, time.monotonic() + 10, "long"))
    while not replica.model.locked():
        await asyncio.sleep(0)
    await asyncio.sleep(0.2)  # let the replica get through about half of the 400 ms
    predicted = pool.replicas[0].predict_ms(5)
    start = time.monotonic()
    await pool.rerank("q", ["d"] * 5, time.monotonic() + 10, "late")
    finished = 1000 * (time.monotonic() - start)
    await long
    assert finished == pytest.approx(predicted, rel=0.10)
    assert predicted < 0.8 * (20 + 5) * 20  # not the whole of the first request again


async def test_a_late_tail_costs_only_its_own_slice():
    """With slice_ms set, a replica's share goes out as several requests; one that misses its deadline
    loses its own pairs and the rest are kept."""

    class LateAfter(FakeReplica):
        async def rerank(self, query, documents, timeout_s, request_id):
            if len(self.received) >= 2:
                self.received.append(documents)
                raise errors.DeadlineExceeded("late")
            return await super().rerank(query, documents, timeout_s, request_id)

    replica = LateAfter("a", ms_per_pair=10)
    pool = RerankPool([replica], initial_ms_per_pair=10, slice_ms=30)
    # 10 pairs of 10 ms with 150 ms left: over a quarter of the time, so sliced.
    outcome = await pool.rerank("q", DOCS, time.monotonic() + 0.15, "r1")
    assert [len(r) for r in replica.received] == [3, 3, 3, 1]
    assert sorted(outcome.scores) == list(range(6))
    assert isinstance(outcome.error, errors.DeadlineExceeded)


async def test_a_share_with_time_to_spare_goes_as_one_request():
    """Slicing guards against a late tail; a share predicted to take under a quarter of the time left goes
    whole, and one predicted to take more is sliced (the work queued ahead counts)."""
    replica = FakeReplica("a", ms_per_pair=10)
    pool = RerankPool([replica], initial_ms_per_pair=10, slice_ms=30)
    await pool.rerank("q", DOCS, time.monotonic() + 1.0, "spare")  # 100 ms of 1,000
    assert [len(r) for r in replica.received] == [len(DOCS)]
    replica.received.clear()
    pool.replicas[0].abandon(300.0, time.monotonic())  # 400 ms of 1,000 with the work ahead
    await pool.rerank("q", DOCS, time.monotonic() + 1.0, "queued")
    assert [len(r) for r in replica.received] == [3, 3, 3, 1]


async def test_a_partial_answer_keeps_its_scores_and_is_no_fault():
    """A replica that scored part of its slice before the deadline: those scores are used, no more is
    asked of the request (its time is up), and the replica's health is untouched."""

    class ScoresTheFirstTwo(FakeReplica):
        async def rerank(self, query, documents, timeout_s, request_id):
            reply = await super().rerank(query, documents, timeout_s, request_id)
            return dataclasses.replace(reply, scores={i: s for i, s in reply.scores.items() if i < 2},
                                       unscored=len(documents) - 2)

    replica = ScoresTheFirstTwo("partial")
    pool = RerankPool([replica], initial_ms_per_pair=10)
    outcome = await score_all(pool)
    assert sorted(outcome.scores) == [0, 1] and outcome.scores[1] == len(DOCS[1])
    assert isinstance(outcome.error, errors.DeadlineExceeded) and outcome.failed_slices == 0
    assert pool.replicas[0].consecutive_failures == 0 and len(replica.received) == 1


async def test_a_deadline_already_past_is_a_deadline_not_an_outage():
    """A budget spent before the pool is reached (a tiny budget on a busy host) ends as DeadlineExceeded:
    the caller is told to allow more time, and no replica is asked or blamed."""
    a = FakeReplica("a")
    pool = RerankPool([a], initial_ms_per_pair=10, affinity=False)
    outcome = await pool.rerank("q", DOCS, time.monotonic() - 0.001, "r1")
    assert isinstance(outcome.error, errors.DeadlineExceeded) and not outcome.scores
    assert a.received == [] and pool.available()


async def test_no_replica_to_ask_while_time_remains_is_an_outage():
    """The other side of the same line: with time left and every replica ejected, nothing is sent and the
    answer is Unavailable (retry later), not a deadline the caller could fix with more budget."""
    a = FakeReplica("a", fail_with=errors.Unavailable("connection refused"))
    pool = RerankPool([a], initial_ms_per_pair=10, affinity=False, eject_after_failures=1)
    await score_all(pool)  # fails once: ejected
    assert not pool.available()
    sent = len(a.received)
    outcome = await score_all(pool)
    assert isinstance(outcome.error, errors.Unavailable) and not outcome.scores
    assert len(a.received) == sent
