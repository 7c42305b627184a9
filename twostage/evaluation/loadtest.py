"""``twostage loadtest``: open-loop load on a gateway or a single stage.

Requests leave on a schedule (constant rate or Poisson arrivals) whether or
not earlier ones have returned, and each latency is measured from its
scheduled send time, so a slow server cannot hide its queueing
(no coordinated omission). Runs are bounded in requests and seconds.
"""

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from twostage.connect import PLAINTEXT, Credentials
from twostage.v1 import gateway_pb2, gateway_pb2_grpc, recall_pb2, recall_pb2_grpc, rerank_pb2, rerank_pb2_grpc

MAX_DURATION_S = 600
MAX_LATENCY_US = 600_000_000


@dataclass
class LoadResult:
    offered_rps: float  # the schedule's nominal rate
    duration_s: float
    window_s: float = 0.0  # the time the schedule sends over (duration_s grows to include the last answers)
    latencies_ms: list[float] = field(default_factory=list)
    send_offsets_s: list[float] = field(default_factory=list)  # actual send time - scheduled time
    scheduled_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)  # status -> the first message with it
    degraded: Counter = field(default_factory=Counter)
    reranked: list[int] = field(default_factory=list)  # gateway: candidates reranked per answer
    # Pairs scored and, of them, answered from the rerank replicas' score cache: repeated queries are cheaper,
    # so a run's latency reads differently with many hits.
    scored_pairs: int = 0
    cached_pairs: int = 0
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))

    def report(self) -> dict:
        h = self.histogram
        done = h.get_total_count()
        sent = done + sum(self.errors.values())
        percentile = (lambda p: round(h.get_value_at_percentile(p) / 1000, 2)) if done else (lambda p: None)
        return {
            "offered_rps": round(self.offered_rps, 3),
            # What was really sent: a Poisson schedule's count varies around the nominal rate.
            "sent_rps": round(sent / self.window_s, 3) if self.window_s else None,
            "achieved_rps": round(done / self.duration_s, 3) if self.duration_s else 0.0,
            "requests": sent,
            "ok": done,
            "p50_ms": percentile(50),
            "p90_ms": percentile(90),
            "p99_ms": percentile(99),
            "p999_ms": percentile(99.9),
            "max_ms": round(h.get_max_value() / 1000, 2) if done else None,
            "errors": dict(self.errors),
            "error_examples": dict(self.error_examples),
            "degraded": dict(self.degraded),
            "mean_reranked": round(sum(self.reranked) / len(self.reranked), 3) if self.reranked else None,
            "score_cache_hits": self.cached_pairs,
            "score_cache_hit_rate": round(self.cached_pairs / self.scored_pairs, 4) if self.scored_pairs else None,
        }


def schedule(rate_rps: float, duration_s: float, max_requests: int, poisson: bool, seed: int = 1) -> list[float]:
    """Send times (seconds from start) for a run."""
    if not poisson:
        count = min(max_requests, int(duration_s * rate_rps + 1e-9))
        return [(i + 1) / rate_rps for i in range(count)]
    rng = random.Random(seed)
    times, t = [], 0.0
    while len(times) < max_requests:
        t += rng.expovariate(rate_rps)
        if t > duration_s:
            break
        times.append(t)
    return times


def degradation_codes(reply: gateway_pb2.SearchResponse) -> list[str]:
    """The answer's degradation codes as the metrics name them (rerank_partial, ...)."""
    return [gateway_pb2.DegradationCode.Name(d.code).lower() for d in reply.degradations]


def make_caller(channel: grpc.aio.Channel, stage: str, top_k: int, recall_k: int, budget_ms: int, documents: list[str],
                metadata=()):
    """An async function query -> its degradation codes (empty if none), for the chosen target."""
    if stage == "gateway":
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def call(query: str, timeout_s: float) -> tuple[list[str], int | None, int | None]:
            reply = await stub.Search(
                gateway_pb2.SearchRequest(query=query, top_k=top_k, recall_k=recall_k, budget_ms=budget_ms),
                timeout=timeout_s, metadata=metadata,
            )
            return degradation_codes(reply), reply.reranked, reply.rerank_cached
    elif stage == "recall":
        stub = recall_pb2_grpc.RecallStub(channel)

        async def call(query: str, timeout_s: float) -> tuple[list[str], int | None, int | None]:
            await stub.Search(recall_pb2.RecallSearchRequest(query=query, k=recall_k), timeout=timeout_s,
                              metadata=metadata)
            return [], None, None
    else:
        stub = rerank_pb2_grpc.RerankStub(channel)

        async def call(query: str, timeout_s: float) -> tuple[list[str], int | None, int | None]:
            reply = await stub.Rerank(rerank_pb2.RerankRequest(query=query, documents=documents), timeout=timeout_s,
                                      metadata=metadata)
            return [], len(reply.results), reply.cached

    return call


def zipf_stream(queries: list[str], count: int, s: float, seed: int = 0) -> list[str]:
    """``count`` queries drawn with Zipf popularity: the i-th (1-based) with probability proportional to
    1 / i**s, so the head repeats as real query streams do; s = 0 draws uniformly."""
    if not queries:
        raise ValueError("no queries to draw from")
    weights = 1.0 / np.arange(1, len(queries) + 1) ** s
    picks = np.random.default_rng(seed).choice(len(queries), size=count, p=weights / weights.sum())
    return [queries[i] for i in picks]


async def run_load(target: str, stage: str, queries: list[str], rate_rps: float, duration_s: float,
                   max_requests: int, poisson: bool = False, timeout_s: float = 30.0, top_k: int = 0,
                   recall_k: int = 0, budget_ms: int = 0, documents: list[str] | None = None,
                   progress: bool = True, credentials: Credentials = PLAINTEXT,
                   stop: asyncio.Event | None = None) -> LoadResult:
    """Send on schedule for ``duration_s`` (or until ``stop`` is set), then wait for every answer."""
    if not queries:
        raise ValueError("no queries to send")
    if stage == "recall" and recall_k < 1:
        raise ValueError("a load test of the recall stage needs --recall-k (candidates per search)")
    duration_s = min(duration_s, MAX_DURATION_S)
    times = schedule(rate_rps, duration_s, max_requests, poisson)
    result = LoadResult(offered_rps=rate_rps, duration_s=duration_s, window_s=duration_s)
    async with credentials.aio_channel(target) as channel:
        call = make_caller(channel, stage, top_k, recall_k, budget_ms, documents or [], credentials.metadata)
        start = time.perf_counter()

        async def one(index: int, scheduled: float) -> None:
            result.send_offsets_s.append(time.perf_counter() - start - scheduled)
            try:
                codes, reranked, cached = await call(queries[index % len(queries)], timeout_s)
            except grpc.aio.AioRpcError as error:
                result.errors[error.code().name] += 1
                result.error_examples.setdefault(error.code().name, error.details() or "")
                return
            latency_us = int(1e6 * (time.perf_counter() - start - scheduled))
            result.histogram.record_value(min(max(latency_us, 1), MAX_LATENCY_US))
            result.latencies_ms.append(latency_us / 1000)
            result.scheduled_s.append(scheduled)
            result.degraded.update(codes)
            if reranked is not None:
                result.reranked.append(reranked)
                result.scored_pairs += reranked
                result.cached_pairs += cached

        tasks = []
        for index, scheduled in enumerate(tqdm(times, desc=f"{rate_rps:g} rps", unit="req", disable=not progress)):
            if stop is not None and stop.is_set():
                result.window_s = time.perf_counter() - start
                break
            delay = scheduled - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule itself: open loop
            tasks.append(asyncio.create_task(one(index, scheduled)))
        await asyncio.gather(*tasks)
        result.duration_s = max(time.perf_counter() - start, 1e-9)
    return result


async def find_max_rate(target: str, stage: str, queries: list[str], rates: list[float], step_s: float,
                        slo_p99_ms: float, **kwargs) -> dict:
    """Raise the rate step by step until p99 breaks the SLO, or errors or degraded answers appear:
    a rate is sustained only when every answer is complete and in time."""
    steps, sustainable = [], None
    for rate in rates:
        outcome = (await run_load(target, stage, queries, rate, step_s, int(rate * step_s) + 1, **kwargs)).report()
        steps.append(outcome)
        healthy = (not outcome["errors"] and not outcome["degraded"] and outcome["p99_ms"] is not None
                   and outcome["p99_ms"] <= slo_p99_ms)
        if not healthy:
            break
        sustainable = rate
    return {"slo_p99_ms": slo_p99_ms, "max_sustainable_rps": sustainable, "steps": steps}
