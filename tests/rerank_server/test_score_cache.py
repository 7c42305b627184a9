"""The pair-score cache and single-flight, with the real cross-encoder (slowed or gated only to hold
requests in flight): repeats are free and bit-identical, changed text is recomputed, the byte bound holds,
identical pairs in flight are computed once, and bypassing the cache computes every time."""

import asyncio
import threading

import pytest

from rerank_server.config import RerankSettings
from rerank_server.score_cache import PairScoreCache, entry_bytes
from rerank_server.service import RerankQuery, RerankService

QUERY = "Does smoking cause lung cancer?"
DOCUMENTS = [
    "Cigarette smoking is the leading cause of lung cancer; smokers have a 15 to 30 times higher risk.",
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Radon exposure is the second leading cause of lung cancer after smoking.",
]


class GatedModel:
    """Fault injection: a real model whose batches wait for ``gate``; counts the pairs it scores."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()  # a batch has reached the model
        self.pairs = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, batch):
        self.running.set()
        self.gate.wait(timeout=30)
        self.pairs += len(batch)
        return self.inner.score(batch)


@pytest.fixture
async def service(models):
    from rerank_server.cross_encoder import CrossEncoder

    settings = RerankSettings(port=0)
    model = GatedModel(CrossEncoder(models["ms-marco-minilm-l12"], settings, settings.max_length))
    service = RerankService(settings, model=model)
    await service.start()
    model.pairs = 0  # the warm-up's
    yield service
    await service.close()


def scores(outcome) -> dict[int, float]:
    return dict(outcome.ranked)


async def test_a_repeated_pair_is_served_from_the_cache_with_an_identical_score(service):
    first = await service.rerank(RerankQuery(QUERY, DOCUMENTS))
    assert (first.cached, service.model.pairs) == (0, 3)
    again = await service.rerank(RerankQuery(QUERY, DOCUMENTS))
    assert again.cached == 3 and service.model.pairs == 3  # the model did not run
    assert scores(again) == scores(first)  # bit-identical, not approximately equal
    # Computed in another batch composition, the score is the same bits: what the cache relies on.
    alone = await service.rerank(RerankQuery(QUERY, [DOCUMENTS[2]], bypass_cache=True))
    assert scores(alone)[0] == scores(first)[2]


async def test_a_document_whose_text_changed_is_recomputed(service):
    first = await service.rerank(RerankQuery(QUERY, DOCUMENTS))
    changed = [DOCUMENTS[0], DOCUMENTS[1] + " It is 330 metres tall.", DOCUMENTS[2]]
    second = await service.rerank(RerankQuery(QUERY, changed))
    assert second.cached == 2 and service.model.pairs == 4
    assert scores(second)[0] == scores(first)[0] and scores(second)[1] != scores(first)[1]
    other_query = await service.rerank(RerankQuery("Is radon dangerous?", DOCUMENTS))
    assert other_query.cached == 0  # a pair is the query and the document


async def test_two_concurrent_identical_requests_run_the_model_once(service):
    service.model.gate.clear()
    first = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    while not service.batcher.queued_items and not service.batcher.stats.batches:
        await asyncio.sleep(0.001)  # the first request's pairs are with the batcher
    second = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    await asyncio.sleep(0.05)
    service.model.gate.set()
    a, b = await asyncio.gather(first, second)
    assert service.model.pairs == 3
    assert (a.cached, b.cached) == (0, 3) and scores(a) == scores(b)


async def test_a_follower_is_answered_when_the_first_caller_goes_away_before_its_batch(service):
    service.model.gate.clear()
    leader = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    while not service.cache._in_flight:
        await asyncio.sleep(0.001)
    follower = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    await asyncio.sleep(0.05)
    leader.cancel()
    service.model.gate.set()
    outcome = await follower
    assert len(outcome.ranked) == 3 and not service.cache._in_flight
    assert service.model.pairs == 3  # computed once, for both


async def until(condition, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_the_computing_caller_going_away_still_fills_the_cache_for_the_others(service):
    service.model.gate.clear()
    first = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    await until(service.model.running.is_set)  # the first request's batch is in the model
    second = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    await until(lambda: service.cache.stats.shared == 3)  # the second awaits the first's pairs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    service.model.gate.set()
    outcome = await second
    assert len(outcome.ranked) == 3 and outcome.cached == 3
    assert service.model.pairs == 3  # the batch the first started was not thrown away and computed again
    third = await service.rerank(RerankQuery(QUERY, DOCUMENTS))
    assert third.cached == 3 and service.model.pairs == 3  # and its scores were stored
    assert scores(third) == scores(outcome) and not service.cache._in_flight


async def test_a_waiting_caller_going_away_leaves_the_shared_pairs_to_the_others(service):
    service.model.gate.clear()
    first = asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS)))
    await until(service.model.running.is_set)
    waiters = [asyncio.ensure_future(service.rerank(RerankQuery(QUERY, DOCUMENTS))) for _ in range(2)]
    await until(lambda: service.cache.stats.shared == 6)
    waiters[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    service.model.gate.set()
    a, b = await asyncio.gather(first, waiters[1])
    assert (a.cached, b.cached) == (0, 3) and scores(a) == scores(b)
    assert service.model.pairs == 3 and not service.cache._in_flight


async def test_bypassing_the_cache_computes_every_time(service, models):
    held = len(service.cache)  # the warm-up's pairs
    for _ in range(2):
        outcome = await service.rerank(RerankQuery(QUERY, DOCUMENTS, bypass_cache=True))
        assert outcome.cached == 0
    assert service.model.pairs == 6 and len(service.cache) == held  # neither read nor filled


async def test_cache_off_computes_every_time(models):
    service = RerankService(RerankSettings(port=0, score_cache_mb=0))
    await service.start()
    try:
        before = service.batcher.stats.items
        for _ in range(2):
            await service.rerank(RerankQuery(QUERY, DOCUMENTS))
        assert service.batcher.stats.items - before == 6 and service.cache is None
    finally:
        await service.close()


def test_the_byte_bound_holds_under_a_stream_of_unique_pairs():
    cache = PairScoreCache(max_bytes=50_000, model_identity="m:256")
    keep = cache.key("q", "kept warm")
    cache.put(keep, 1.0)
    for i in range(5_000):
        cache.put(cache.key("q", f"document {i}"), float(i))
        assert cache.bytes <= cache.max_bytes
        if i % 50 == 0:
            assert cache.get(keep) == 1.0  # used recently: LRU keeps it
    assert cache.stats.evictions > 4_000
    assert cache.bytes == sum(entry_bytes(k, v) for k, v in cache._scores.items())
    assert cache.get(cache.key("q", "document 0")) is None  # the oldest went first
    assert cache.key("ab", "c") != cache.key("a", "bc")


async def test_prometheus_reads_the_caches_own_totals_at_scrape_time():
    from twostage.metrics import ScoreCacheCollector

    collector = ScoreCacheCollector()
    cache = PairScoreCache(10_000, "model")
    collector.register(cache)
    keys = [cache.key("query", f"document {i}") for i in range(3)]
    _, _, to_compute = cache.split(keys)
    cache.finish([keys[i] for i in to_compute], [0.1, 0.2, 0.3])
    cache.split(keys[:2])
    exported = {family.name: family.samples[0].value for family in collector.collect()}
    assert exported == {"twostage_rerank_cache_hits": 2, "twostage_rerank_cache_misses": 3,
                        "twostage_rerank_cache_shared": 0, "twostage_rerank_cache_evictions": 0,
                        "twostage_rerank_cache_bytes": cache.bytes}
