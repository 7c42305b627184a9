"""``twostage bench gateway``: the gateway's own overhead, and its answers
under twice the load the rerank tier can sustain."""

import asyncio
import statistics
import time
from pathlib import Path

import grpc

from bench.report import machine, write_json
from twostage.corpus import DEMO_CORPUS, read_queries
from twostage.evaluation.loadtest import run_load
from twostage.model_store import cache_dir, fetch_defaults
from twostage.stack import Stack
from twostage.v1 import gateway_pb2, gateway_pb2_grpc


def bench_index(docs: int) -> Path:
    """A cached index of the first ``docs`` demo documents."""
    from recall_server.build import build_from_corpus

    out = cache_dir().parent / "bench-indexes" / f"demo-{docs}"
    if not (out / "index.json").exists():
        build_from_corpus(DEMO_CORPUS, out, limit=docs)
    return out


async def overhead(target: str, queries: list[str], requests: int) -> dict:
    """Time not spent inside the stages, per request: as the client sees it and inside the gateway."""
    client_ms, inside_ms, own_ms = [], [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for i in range(requests):
            start = time.perf_counter()
            reply = await stub.Search(gateway_pb2.SearchRequest(query=queries[i % len(queries)], recall_k=4, top_k=4))
            elapsed_ms = 1000 * (time.perf_counter() - start)
            stages_ms = reply.timings_ms["recall.total_ms"] + reply.timings_ms.get("rerank.total_ms", 0.0)
            client_ms.append(elapsed_ms - stages_ms)
            inside_ms.append(reply.timings_ms["total_ms"] - stages_ms)
            # The gateway's own work: everything but the two downstream calls.
            own_ms.append(reply.timings_ms["total_ms"] - reply.timings_ms["recall_ms"] - reply.timings_ms["rerank_ms"])
    return {"client_p50_ms": round(statistics.median(client_ms), 3),
            "gateway_p50_ms": round(statistics.median(inside_ms), 3),
            "gateway_own_p50_ms": round(statistics.median(own_ms), 3),
            "downstream_hops_p50_ms": round(statistics.median(i - o for i, o in zip(inside_ms, own_ms)), 3)}


async def sustainable_rps(target: str, queries: list[str], recall_k: int) -> float:
    """Full-depth searches per second one at a time: what the rerank tier sustains."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        start = time.perf_counter()
        for query in queries[:3]:
            await stub.Search(gateway_pb2.SearchRequest(query=query, recall_k=recall_k, budget_ms=600_000))
        return 3 / (time.perf_counter() - start)


async def run(args) -> dict:
    fetch_defaults(log=lambda message: None)
    queries = list(read_queries(DEMO_CORPUS).values())
    index_dir = await asyncio.to_thread(bench_index, 200 if args.quick else 1000)
    stack = Stack("127.0.0.1", args.port, str(index_dir))
    await stack.start(300)
    try:
        print("gateway overhead ...", flush=True)
        cost = await overhead(stack.gateway_target, queries, 20 if args.quick else 100)
        capacity = await sustainable_rps(stack.gateway_target, queries, args.recall_k)
        rate = 2 * capacity
        duration = 10 if args.quick else 40
        print(f"overload: {rate:.2f} rps (2x the {capacity:.2f} rps rerank sustains at recall_k "
              f"{args.recall_k}), budget {args.budget_ms} ms, {duration} s ...", flush=True)
        load = await run_load(stack.gateway_target, "gateway", queries, rate, duration, 10_000,
                              poisson=True, recall_k=args.recall_k, budget_ms=args.budget_ms,
                              timeout_s=args.budget_ms / 1000 * 3)
    finally:
        await stack.stop()
    overload = load.report()
    report = {
        "machine": machine(),
        "overhead": cost,
        "overload": {**overload, "budget_ms": args.budget_ms, "recall_k": args.recall_k,
                     "sustainable_full_depth_rps": round(capacity, 3),
                     "p99_within_budget_plus_5pct": overload["p99_ms"] is not None
                     and overload["p99_ms"] <= 1.05 * args.budget_ms,
                     "deadline_exceeded": overload["errors"].get("DEADLINE_EXCEEDED", 0)},
    }
    print(f"\ngateway overhead p50 (stages' own handler time excluded): {cost['client_p50_ms']} ms as the client "
          f"sees it, {cost['gateway_p50_ms']} ms inside the gateway, of which {cost['gateway_own_p50_ms']} ms "
          f"is the gateway's own work and {cost['downstream_hops_p50_ms']} ms the two gRPC hops to the stages")
    print(f"overload at {rate:.2f} rps: p50 {overload['p50_ms']} ms, p99 {overload['p99_ms']} ms "
          f"(budget {args.budget_ms} ms), errors {overload['errors'] or 'none'}, degraded {overload['degraded']}")
    write_json(args.json, report)
    return report
