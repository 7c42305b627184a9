"""DynamicBatcher with a fake model: the fake records every batch it is given
and can be told to fail or to block, which the real models cannot."""

import asyncio
import threading
import time

import pytest

from twostage.batching import BatchCost, BatchPolicy, DynamicBatcher, PairCost, plan_batches
from twostage.errors import DeadlineExceeded, ModelFailure, NotReady, Overloaded


class FakeModel:
    """Returns each payload doubled; remembers batches; can fail or hold a batch."""

    def __init__(self, fail_when=None):
        self.batches: list[list[int]] = []
        self.fail_when = fail_when or (lambda batch: False)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch):
        self.entered.set()
        self.gate.wait(timeout=10)
        self.batches.append(list(batch))
        if self.fail_when(batch):
            raise RuntimeError("injected failure")
        return [2 * x for x in batch]


async def make(model, **policy) -> DynamicBatcher:
    batcher = DynamicBatcher("test", model, BatchPolicy(**{"max_wait_ms": 5.0, **policy}))
    batcher.start()
    return batcher


def test_plan_batches_sorts_by_length_within_limits():
    lengths = [50, 10, 40, 10, 30, 20]
    plans = plan_batches(lengths, max_batch_size=2, max_batch_tokens=1000)
    assert [[lengths[i] for i in plan] for plan in plans] == [[10, 10], [20, 30], [40, 50]]
    for plan in plan_batches(lengths, max_batch_size=10, max_batch_tokens=60):
        assert len(plan) * max(lengths[i] for i in plan) <= 60
    # An item over the token budget still gets a batch of its own.
    assert plan_batches([500, 5], 8, 100) == [[1], [0]]


async def test_coalesces_concurrent_callers_into_one_batch():
    model = FakeModel()
    batcher = await make(model, max_batch_size=64, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit([i], [10]) for i in range(8)))
    assert [r.values for r in results] == [[2 * i] for i in range(8)]
    assert len(model.batches) == 1 and sorted(model.batches[0]) == list(range(8))
    await batcher.close()


async def test_large_request_is_split_by_size_and_token_budget():
    model = FakeModel()
    batcher = await make(model, max_batch_size=4, max_batch_tokens=100)
    lengths = [10, 30, 20, 40, 10, 50, 5, 25, 15, 35]
    done = await batcher.submit(list(range(10)), lengths)
    assert done.values == [2 * i for i in range(10)]  # results stay in request order
    assert sorted(x for b in model.batches for x in b) == list(range(10))
    for batch in model.batches:
        assert len(batch) <= 4
        assert len(batch) * max(lengths[i] for i in batch) <= 100
    await batcher.close()


async def test_batches_are_length_sorted():
    model = FakeModel()
    model.gate.clear()  # hold the first batch so the rest queue up together
    batcher = await make(model, max_batch_size=3, max_batch_tokens=10_000, pipeline_depth=1)
    blocker = asyncio.create_task(batcher.submit([100], [1]))
    await asyncio.to_thread(model.entered.wait, 5)
    lengths = {1: 90, 2: 10, 3: 80, 4: 20, 5: 70, 6: 30}
    tasks = [asyncio.create_task(batcher.submit([k], [n])) for k, n in lengths.items()]
    while batcher.queued_items < len(lengths):
        await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(blocker, *tasks)
    # Short items together, long items together; the batch holding the oldest item (1) first.
    assert model.batches[1:] == [[5, 3, 1], [2, 4, 6]]
    await batcher.close()


async def test_lone_item_runs_after_max_wait_not_before():
    model = FakeModel()
    batcher = await make(model, max_batch_size=64, max_wait_ms=30)
    done = await batcher.submit([1], [10])
    assert done.values == [2]
    assert done.queue_ms >= 30 * 0.9  # it waited for company ...
    assert batcher.stats.batches == 1  # ... then ran alone
    await batcher.close()


async def test_full_batch_runs_without_waiting_for_max_wait():
    model = FakeModel()
    batcher = await make(model, max_batch_size=4, max_wait_ms=60_000)
    done = await asyncio.wait_for(batcher.submit([1, 2, 3, 4], [5] * 4), timeout=10)
    assert done.values == [2, 4, 6, 8]
    await batcher.close()


@pytest.mark.parametrize("partial", [False, True])  # partial or not: with nothing computed it is DeadlineExceeded
async def test_expired_items_are_dropped_before_compute(partial):
    model = FakeModel()
    model.gate.clear()
    batcher = await make(model, max_batch_size=1, pipeline_depth=1)
    first = asyncio.create_task(batcher.submit([1], [5]))
    await asyncio.to_thread(model.entered.wait, 5)
    late = asyncio.create_task(batcher.submit([2], [5], deadline_s=time.monotonic() + 0.05, partial=partial))
    with pytest.raises(DeadlineExceeded):
        await late
    model.gate.set()
    assert (await first).values == [2]
    await batcher.close()
    assert [2] not in model.batches  # never computed


async def test_an_item_whose_deadline_would_pass_during_its_batch_is_not_computed():
    """Formed behind a running batch (pipelining), it is checked again when the model is free: work that
    would finish after its caller gave up is left out, so the callers behind it wait less."""
    model = FakeModel()
    model.gate.clear()
    batcher = await make(model, max_batch_size=1, pipeline_depth=2)
    batcher.ms_per_item = 60_000.0  # as learned: a batch of one takes a minute
    first = asyncio.create_task(batcher.submit([1], [5]))
    await asyncio.to_thread(model.entered.wait, 5)
    hopeless = asyncio.create_task(batcher.submit([2], [5], deadline_s=time.monotonic() + 30))
    patient = asyncio.create_task(batcher.submit([3], [5]))
    while batcher.queued_items:
        await asyncio.sleep(0)
    model.gate.set()
    with pytest.raises(DeadlineExceeded, match="would pass"):
        await hopeless
    assert (await first).values == [2] and (await patient).values == [6]
    await batcher.close()
    assert [2] not in model.batches and batcher.stats.expired_items == 1


async def test_a_lane_refusing_everything_on_a_stale_estimate_runs_one_item_to_correct_it(monkeypatch):
    """One slow batch (a new shape's first run on a busy host) must not have every later item refused as
    late, for a refused item teaches nothing: once the lane has run nothing for STALE_S, one runs anyway
    and its time replaces the estimate."""
    from twostage import batching

    monkeypatch.setattr(batching, "STALE_S", 0.2)
    model = FakeModel()
    batcher = await make(model, max_batch_size=1)
    batcher.ms_per_item = 60_000.0  # as learned from one slow batch that has just ended
    batcher._lane_done_s[False] = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="would pass"):
        await batcher.submit([1], [5], deadline_s=time.monotonic() + 5)
    await asyncio.sleep(0.25)  # nothing has run since
    assert (await batcher.submit([2], [5], deadline_s=time.monotonic() + 5)).values == [4]
    assert batcher.ms_per_item < 1_000  # the probe's own time, not a fifth of the way from a minute
    assert (await batcher.submit([3], [5], deadline_s=time.monotonic() + 5)).values == [6]
    await batcher.close()
    assert model.batches == [[2], [3]]


@pytest.mark.parametrize("partial", [False, True])
async def test_a_partial_submission_keeps_what_was_computed_before_its_deadline(partial):
    """The first batch is computed; the model then holds until the deadline has passed. A partial
    submission returns the first result (None for the rest); a whole one is DeadlineExceeded."""
    released = threading.Event()

    def model(batch):
        if batch != [1]:
            released.wait(timeout=10)
        return [2 * x for x in batch]

    batcher = await make(model, max_batch_size=1, pipeline_depth=1)
    submission = batcher.submit([1, 2, 3], [5, 5, 5], deadline_s=time.monotonic() + 0.5, partial=partial)
    try:
        if partial:
            done = await submission
            assert done.values == [2, None, None]
        else:
            with pytest.raises(DeadlineExceeded):
                await submission
    finally:
        released.set()
        await batcher.close()


def test_batch_cost_separates_the_fixed_part_from_the_part_per_token():
    cost = BatchCost()
    assert cost.predict(100) is None
    cost.add(100, 30.0)
    cost.add(100, 30.0)
    assert cost.predict(400) is None  # one shape so far: the parts cannot be told apart
    for tokens in (100, 400, 200, 800):
        cost.add(tokens, 10.0 + 0.2 * tokens)
    assert cost.predict(1000) == pytest.approx(210.0) and cost.predict(50) == pytest.approx(20.0)


def test_a_pairs_cost_is_fitted_from_pairs_of_a_few_lengths():
    cost = PairCost.fit([(32, 5 + 0.5 * 32), (128, 5 + 0.5 * 128), (256, 5 + 0.5 * 256)], max_length=256)
    assert (cost.fixed_ms, cost.ms_per_token) == (pytest.approx(5.0), pytest.approx(0.5))
    assert cost.pair_ms(1000) == pytest.approx(5 + 0.5 * 256)  # the model reads no more than max_length
    # Timings that would put the cost of no tokens below nothing (noise): a line through 0, never below it.
    noisy = PairCost.fit([(32, 10.0), (256, 300.0)], max_length=256)
    assert noisy.fixed_ms == 0 and noisy.pair_ms(256) == pytest.approx(300.0, rel=0.02)
    assert noisy.pair_ms(32) > 10.0
    # One length: all of it per token.
    assert PairCost.fit([(64, 32.0)], max_length=64) == PairCost(0.0, 0.5, 64)


def test_a_pairs_tokens_are_estimated_from_its_characters():
    cost = PairCost(1.0, 0.1, max_length=256, chars_per_token=4.0)
    assert cost.estimate_tokens(20, 100) == 5 + 25 + 3  # query, document, [CLS] and two [SEP]
    assert cost.estimate_tokens(20, 100_000) == 256  # documents are cut at max_length
    assert cost.estimate_tokens(4_000, 40) == 128 + 10 + 3  # the query keeps at most half the window
    assert PairCost(1.0, 0.1, 256, chars_per_token=0).estimate_tokens(20, 100) == 33  # not published: 4
    # A product description costs a fraction of an abstract cut at max_length.
    short, long = cost.estimate_tokens(25, 90), cost.estimate_tokens(25, 1_500)
    assert cost.pair_ms(short) < cost.pair_ms(long) / 4


async def test_items_due_sooner_go_first_and_fill_the_batch_in_order_of_urgency():
    model = FakeModel()
    model.gate.clear()  # hold the first batch so the rest queue up together
    batcher = await make(model, max_batch_size=3, max_batch_tokens=10_000, pipeline_depth=1)
    blocker = asyncio.create_task(batcher.submit([100], [1]))
    await asyncio.to_thread(model.entered.wait, 5)
    now = time.monotonic()
    # (payload, length, seconds to deadline), submitted in this order.
    items = [(1, 10, 60), (2, 90, 20), (3, 10, 40), (4, 50, 10), (5, 20, 50)]
    tasks = [asyncio.create_task(batcher.submit([k], [n], deadline_s=now + due)) for k, n, due in items]
    while batcher.queued_items < len(items):
        await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(blocker, *tasks)
    # Earliest deadline first, whatever the length or the order of arrival.
    assert model.batches[1:] == [[4, 2, 3], [5, 1]]
    await batcher.close()


async def test_cancelled_caller_items_are_not_computed():
    model = FakeModel()
    model.gate.clear()
    batcher = await make(model, max_batch_size=1, pipeline_depth=1)
    first = asyncio.create_task(batcher.submit([1], [5]))
    await asyncio.to_thread(model.entered.wait, 5)
    gone = asyncio.create_task(batcher.submit([2], [5]))
    while batcher.queued_items < 1:
        await asyncio.sleep(0)
    gone.cancel()
    model.gate.set()
    await first
    await batcher.close()
    assert model.batches == [[1]]


async def test_full_queue_sheds_immediately():
    model = FakeModel()
    model.gate.clear()
    batcher = await make(model, max_batch_size=1, max_queue_items=3, pipeline_depth=1)
    running = asyncio.create_task(batcher.submit([0], [5]))
    await asyncio.to_thread(model.entered.wait, 5)
    queued = asyncio.create_task(batcher.submit([1, 2, 3], [5, 5, 5]))
    while batcher.queued_items < 3:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="limit 3"):
        await batcher.submit([4], [5])
    assert batcher.stats.shed_items == 1
    model.gate.set()
    assert (await queued).values == [2, 4, 6]
    await running
    await batcher.close()


async def test_failed_batch_fails_every_caller_and_later_batches_still_run():
    model = FakeModel(fail_when=lambda batch: 13 in batch)
    batcher = await make(model, max_batch_size=64, max_wait_ms=50)
    outcomes = await asyncio.gather(
        batcher.submit([1], [5]), batcher.submit([13], [5]), batcher.submit([2], [5]), return_exceptions=True
    )
    assert all(isinstance(o, ModelFailure) for o in outcomes)
    assert "injected failure" in str(outcomes[0])
    assert (await batcher.submit([3], [5])).values == [6]
    await batcher.close()


async def test_close_drains_queued_work_then_refuses():
    model = FakeModel()
    model.gate.clear()
    batcher = await make(model, max_batch_size=1, pipeline_depth=1)
    tasks = [asyncio.create_task(batcher.submit([i], [5])) for i in range(4)]
    await asyncio.to_thread(model.entered.wait, 5)
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(NotReady):
        await batcher.submit([9], [5])
    model.gate.set()
    await closing
    assert [t.result().values for t in tasks] == [[0], [2], [4], [6]]


async def test_close_without_drain_fails_queued_work():
    model = FakeModel()
    model.gate.clear()
    batcher = await make(model, max_batch_size=1, pipeline_depth=1)
    running = asyncio.create_task(batcher.submit([0], [5]))
    await asyncio.to_thread(model.entered.wait, 5)
    queued = asyncio.create_task(batcher.submit([1], [5]))
    while batcher.queued_items < 1:
        await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close(drain=False))
    with pytest.raises(NotReady):
        await queued
    model.gate.set()
    await closing
    assert (await running).values == [0]


async def test_queries_go_before_queued_bulk_items():
    """A bulk write queued first must not hold a later query back beyond the batch already running."""
    model = FakeModel()
    batcher = await make(model, max_batch_size=4, pipeline_depth=1, bulk_max_batch_tokens=20)
    model.gate.clear()  # hold the first bulk batch in the model
    bulk = asyncio.ensure_future(batcher.submit(list(range(100, 112)), [10] * 12, bulk=True))
    await asyncio.to_thread(model.entered.wait, 5)
    query = asyncio.ensure_future(batcher.submit([7], [5]))
    await asyncio.sleep(0.05)  # the query is queued behind the running bulk batch
    model.gate.set()
    assert (await query).values == [14]
    await bulk
    await batcher.close()
    # The running bulk batch finished, then the query, then the rest of the bulk work.
    assert model.batches[0] == [100, 101] and model.batches[1] == [7]
    assert all(len(batch) * 10 <= 20 for batch in model.batches if batch[0] >= 100)  # small bulk batches


async def test_bulk_items_are_not_starved():
    model = FakeModel()
    batcher = await make(model, max_batch_size=1, pipeline_depth=1, bulk_max_wait_ms=50)
    stop = time.monotonic() + 2.0

    async def query_stream():  # always a few queries waiting: without the bound, bulk would never run
        while time.monotonic() < stop:
            await batcher.submit([1], [10])

    streams = [asyncio.ensure_future(query_stream()) for _ in range(3)]
    await asyncio.sleep(0.01)
    bulk = asyncio.ensure_future(batcher.submit([100], [10], bulk=True))
    await asyncio.wait([bulk], timeout=1.5)
    assert bulk.done() and (await bulk).values == [200]
    assert any(len(model.batches) > i and model.batches[i] == [1] for i in range(3))  # queries were flowing
    await asyncio.gather(*streams)
    await batcher.close()


async def test_a_backlog_of_writes_never_sheds_a_query():
    model = FakeModel()
    batcher = await make(model, max_queue_items=4, max_batch_size=1, pipeline_depth=1)
    model.gate.clear()
    writes = asyncio.ensure_future(batcher.submit([100, 101, 102, 103], [10] * 4, bulk=True))
    await asyncio.to_thread(model.entered.wait, 5)
    with pytest.raises(Overloaded, match="bulk items queued"):
        await batcher.submit([200, 201], [10, 10], bulk=True)
    query = asyncio.ensure_future(batcher.submit([1, 2, 3], [10, 10, 10]))  # its own bound
    model.gate.set()
    assert (await query).values == [2, 4, 6]
    await writes
    await batcher.close()


async def test_a_query_is_never_predicted_late_from_the_cost_of_bulk_work():
    """Documents being written take long batches; a query item is predicted from queries' own batches."""
    def model(batch):
        if any(x >= 100 for x in batch):  # the documents: a slow model call
            time.sleep(0.3)
        return [2 * x for x in batch]

    batcher = await make(model, max_batch_size=1)
    await asyncio.gather(*(batcher.submit([100 + i], [200 + 50 * i], bulk=True) for i in range(3)))
    # 0.3 s per bulk item; a query is far cheaper and its deadline leaves it ample time.
    done = await batcher.submit([1], [8], deadline_s=time.monotonic() + 0.15)
    assert done.values == [2] and batcher.stats.expired_items == 0
    await batcher.close()


async def test_an_item_that_is_on_time_alone_is_computed_though_its_batch_would_be_late():
    """Admission weighs an item's own cost: the most urgent items that fit are computed now, the rest later."""
    model = FakeModel()
    batcher = await make(model, max_batch_size=4, max_wait_ms=50, pipeline_depth=1)
    batcher.ms_per_item = 400.0  # as learned: 0.4 s an item, so a batch of 4 takes 1.6 s
    urgent = batcher.submit([1], [5], deadline_s=time.monotonic() + 1.0)
    results = await asyncio.gather(urgent, *(batcher.submit([k], [5]) for k in (2, 3, 4)))
    assert [r.values for r in results] == [[2], [4], [6], [8]]
    assert model.batches[0] == [1, 2] and batcher.stats.expired_items == 0
    await batcher.close()
