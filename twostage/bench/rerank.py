"""``twostage bench rerank``: the stock graph's best rate over batch sizes (the ceiling), each batch-invariant
execution plan raw, the server under load, and peers, on the same model file and the same pairs, in one run."""

import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rerank_server.config import RerankSettings
from rerank_server.cross_encoder import CrossEncoder
from twostage import execution_plan
from twostage.batching import BatchPolicy, plan_batches
from twostage.bench.ceiling import best_rate, plan_rates
from twostage.bench.peers import run_peer
from twostage.bench.report import machine, percentiles_ms, print_table, write_json
from twostage.bench.workload import RerankRequest, default_dataset, rerank_workload
from twostage.model_store import resolve_model
from twostage.probe import wait_serving


def measure_ceiling(model: CrossEncoder, workload: list[RerankRequest], batch_sizes: list[int]) -> dict:
    """Best pairs/s of raw onnxruntime over batch sizes, all pairs length-sorted globally."""
    pairs = [p for r in workload for p in model.encode(r.query, r.documents).pairs]
    return best_rate(pairs, [p.length for p in pairs], model.score, batch_sizes)


def measure_plans(model: CrossEncoder, plans: list, workload: list[RerankRequest], settings: RerankSettings) -> dict:
    """Pairs/s of each execution plan, raw, in the batches the server's batcher would hand it."""
    pairs = [p for r in workload for p in model.encode(r.query, r.documents).pairs]
    return plan_rates(plans, pairs, model._call, BatchPolicy.from_settings(settings))


async def server_plan(target: str) -> str:
    """The execution plan a server chose (its Info)."""
    import grpc

    from twostage.v1 import common_pb2, rerank_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        return (await rerank_pb2_grpc.RerankStub(channel).Info(common_pb2.InfoRequest())).execution_plan


def single_pair_requests(workload: list[RerankRequest], count: int) -> list[RerankRequest]:
    """One-document requests: a lone caller whose batch can only fill by waiting (max_wait_ms)."""
    pairs = [(r.query, d) for r in workload for d in r.documents]
    return [RerankRequest(q, [d]) for q, d in pairs[:count]]


def raw_request_seconds(model: CrossEncoder, request: RerankRequest, settings: RerankSettings) -> float:
    """One request scored alone in the server's batches (as its execution plan sizes them): the latency floor."""
    pairs, _ = model.encode(request.query, request.documents)
    policy = model.plan.policy(BatchPolicy.from_settings(settings))
    start = time.perf_counter()
    for plan in plan_batches([p.length for p in pairs], policy.max_batch_size, policy.max_batch_tokens):
        model.score([pairs[i] for i in plan])
    return time.perf_counter() - start


class RerankServerProcess:
    """A rerank server in its own process, configured through the environment."""

    def __init__(self, port: int, metrics_port: int, env: dict[str, str]):
        self.target = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rerank_server", "--port", str(port), "--metrics-port", str(metrics_port)],
            env={**os.environ, **env, "TWOSTAGE_LOG_LEVEL": "WARNING"},
        )

    async def __aenter__(self):
        await wait_serving([self.target], 120, lambda: self.process.poll() is None)
        return self

    async def __aexit__(self, *exc):
        self.process.terminate()
        await asyncio.to_thread(self.process.wait, 60)

    def cache_bytes(self) -> tuple[float, int]:
        """(bytes the pair-score cache holds, its bound)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        held = next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "twostage_rerank_cache_bytes"), 0.0)
        return held, int(RerankSettings().score_cache_mb * 2**20)

    def batch_stats(self) -> dict:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        samples = {}
        sizes = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("batcher") != "rerank":
                    continue
                if sample.name == "twostage_batch_size_items_bucket":
                    sizes[sample.labels["le"]] = sample.value
                else:
                    samples[sample.name] = sample.value
        padded = samples.get("twostage_batch_padded_tokens_total", 0)
        real = samples.get("twostage_batch_real_tokens_total", 0)
        return {
            "batches": samples.get("twostage_batcher_batches_total", 0),
            "mean_batch_size": samples.get("twostage_batcher_items_total", 0)
            / max(samples.get("twostage_batcher_batches_total", 1), 1),
            "batch_size_cumulative": sizes,
            "padding_waste": 1 - real / padded if padded else 0.0,
            "shed_items": samples.get("twostage_batcher_shed_items_total", 0),
        }


async def drive(target: str, workload: list[RerankRequest], clients: int, requests: int,
                bypass_cache: bool = True) -> dict:
    """``clients`` concurrent callers send ``requests`` in all; returns throughput and latencies. The model is
    measured with the pair-score cache bypassed (the workload repeats); the cache section turns it on."""
    import grpc

    from twostage.v1 import rerank_pb2, rerank_pb2_grpc

    latencies, in_server_ms, queue_ms, handler_ms, errors = [], [], [], [], {}
    pairs = cached = 0
    next_index = iter(range(requests))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankStub(channel)

        async def client():
            nonlocal pairs, cached
            for i in next_index:
                request = workload[i % len(workload)]
                start = time.perf_counter()
                try:
                    reply = await stub.Rerank(rerank_pb2.RerankRequest(query=request.query, documents=request.documents,
                                                                       bypass_cache=bypass_cache))
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - start)
                # Server time beyond tokenizing: queueing plus the model's batches.
                in_server_ms.append(reply.timings_ms["total_ms"] - reply.timings_ms["tokenize_ms"])
                queue_ms.append(reply.cost.queue_ms)
                handler_ms.append(reply.timings_ms["total_ms"])
                pairs += len(reply.results)
                cached += reply.cached

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"pairs_per_s": pairs / wall, "latency_ms": percentiles_ms(latencies), "errors": errors,
            "pairs": pairs, "cached_pairs": cached, "handler_ms": handler_ms,
            "batcher_p50_ms": sorted(in_server_ms)[len(in_server_ms) // 2] if in_server_ms else 0.0,
            "queue_p50_ms": sorted(queue_ms)[len(queue_ms) // 2] if queue_ms else 0.0}


def spread(values: list[float]) -> float:
    """(max - min) / median: how far repeated measurements of one thing disagree."""
    return round((max(values) - min(values)) / statistics.median(values), 4) if values else 0.0


async def run(args) -> dict:
    settings = RerankSettings()
    if args.quick:
        queries, candidates, clients, load_requests, rounds = 2, 25, 4, 6, 2
    else:
        queries, candidates, clients, load_requests, rounds = (args.queries, args.candidates, args.clients,
                                                                args.requests, args.rounds)
    workload = rerank_workload(args.dataset or default_dataset(), queries, candidates)
    model_dir = resolve_model(settings.model)
    model = CrossEncoder(model_dir, settings, settings.max_length)  # the server's plan (auto: its cached choice)
    stock = CrossEncoder(model_dir, settings.model_copy(update={"batch_invariant": False, "execution_plan": "auto"}),
                         settings.max_length)
    sizes = [1, 8, 16] if args.quick else [1, 4, 8, 16, 32]
    plans = execution_plan.candidates(model.model_file, settings, [4, 8] if args.quick else [2, 4, 8, 16])
    if model.plan.label not in {plan.label for plan in plans}:
        plans.append(model.plan)
    floor_s = sorted(raw_request_seconds(model, r, settings) for r in workload)
    singles = single_pair_requests(workload, 20)
    single_floor_s = sorted(raw_request_seconds(model, r, settings) for r in singles)

    # Rounds: the ceiling, the server and each peer take turns, so a host's drift (another tenant, turbo,
    # thermal) lands on all of them alike; medians and spread are reported.
    stock_ceilings, servers, plan_runs = [], [], []
    peer_runs: dict[str, list] = {"sentence-transformers": [], "infinity": []}
    async with RerankServerProcess(args.port, args.port + 1, {}) as server:
        chosen = await server_plan(server.target)
        await drive(server.target, workload, 1, 1)  # warm the channel and the server
        low = await drive(server.target, workload, 1, len(workload))
        lone = await drive(server.target, singles, 1, len(singles))
        for round_ in range(rounds):
            print(f"round {round_ + 1} of {rounds}: stock graph over batch sizes {sizes}, plans "
                  f"({', '.join(p.label for p in plans)}), server ({chosen}; {clients} clients x {candidates} "
                  "candidates), peers ...", flush=True)
            stock_ceiling = measure_ceiling(stock, workload, sizes)
            stock_ceilings.append(stock_ceiling["rate"])
            plan_runs.append(measure_plans(model, plans, workload, settings))
            saturated = await drive(server.target, workload, clients, load_requests)
            servers.append(saturated["pairs_per_s"])
            for peer, runs in peer_runs.items():
                runs.append(await asyncio.to_thread(run_peer, peer, model_dir, workload, settings.max_length))
        stats = server.batch_stats()
        cache = await cache_section(server, args.dataset or default_dataset(), 12 if args.quick else 60,
                                    10 if args.quick else 20, clients)
    for plan in plans:
        plan.close()
    del model, stock, plans
    peers = {name: (statistics.median(runs) if all(isinstance(r, float) for r in runs) else runs[-1])
             for name, runs in peer_runs.items()}
    plan_medians = {label: statistics.median(run[label] for run in plan_runs) for label in plan_runs[0]}
    ceilings = [run[chosen] for run in plan_runs] if chosen in plan_medians else servers
    ceiling = {"rate": statistics.median(ceilings)}
    ceiling_stock = statistics.median(stock_ceilings)
    saturated["pairs_per_s"] = statistics.median(servers)

    floor_ms = 1000 * floor_s[len(floor_s) // 2]
    # What batching adds for a lone caller: time in the batcher and model beyond the same batches run raw.
    added_ms = low["batcher_p50_ms"] - floor_ms
    single_floor_ms = 1000 * single_floor_s[len(single_floor_s) // 2]
    single_added_ms = lone["batcher_p50_ms"] - single_floor_ms
    report = {
        "unit": "pairs/s",
        "model": settings.model,
        "max_length": settings.max_length,
        "batch_invariant": settings.batch_invariant,
        "pairs": sum(len(r.documents) for r in workload),
        "machine": machine(),
        "plan": chosen,  # the server's execution plan (its Info)
        # Each execution plan raw, in the batches the server's batcher would hand it (medians of the rounds).
        "plans": {label: round(rate, 2) for label, rate in plan_medians.items()},
        # The stock int8 graph's best rate over batch sizes (1 included), scores moving with batch-mates.
        "ceiling_stock": round(ceiling_stock, 2),
        "ceiling_stock_by_batch_size": {k: round(v, 2) for k, v in stock_ceiling["by_batch_size"].items()},
        # The server's plan raw.
        "ceiling": round(ceiling["rate"], 2),
        "ceiling_ratio_to_stock": round(ceiling["rate"] / ceiling_stock, 3),
        "server": round(saturated["pairs_per_s"], 2),
        # Target >= 0.97: the batch-invariant server against the stock graph's best.
        "ratio_to_stock": round(saturated["pairs_per_s"] / ceiling_stock, 3),
        "rounds": {"count": rounds, "ceiling_stock": [round(v, 2) for v in stock_ceilings],
                   "plans": [{label: round(rate, 2) for label, rate in run.items()} for run in plan_runs],
                   "server": [round(v, 2) for v in servers],
                   "server_ratio_to_stock": [round(v / c, 3) for v, c in zip(servers, stock_ceilings)],
                   "spread": {"ceiling_stock": spread(stock_ceilings), "server": spread(servers),
                              "server_ratio_to_stock": spread([v / c for v, c in zip(servers, stock_ceilings)])},
                   "peers": {name: [round(v, 2) if isinstance(v, float) else v for v in runs]
                             for name, runs in peer_runs.items()}},
        "ratio": round(saturated["pairs_per_s"] / ceiling["rate"], 3),
        "clients": clients,
        "latency_ms": saturated["latency_ms"],
        "errors": saturated["errors"],
        "low_load": {
            "latency_ms": low["latency_ms"],
            "raw_request_p50_ms": round(floor_ms, 2),
            "batcher_p50_ms": round(low["batcher_p50_ms"], 2),
            "added_by_batching_p50_ms": round(added_ms, 2),
            "single_pair_raw_p50_ms": round(single_floor_ms, 2),
            "single_pair_batcher_p50_ms": round(lone["batcher_p50_ms"], 2),
            "single_pair_added_p50_ms": round(single_added_ms, 2),
            "single_pair_queue_p50_ms": round(lone["queue_p50_ms"], 2),
            "max_wait_ms": settings.max_wait_ms,
        },
        "batching": stats,
        "cache": cache,
        "peers": {
            name: (round(v, 2) if isinstance(v, float) else v) for name, v in peers.items()
        },
        # Against the stock graph's best, as the server is.
        "peer_ratios": {name: round(v / ceiling_stock, 3) for name, v in peers.items() if isinstance(v, float)},
    }
    print_table(
        f"rerank: {settings.model}, max_length {settings.max_length}, {report['pairs']} pairs, "
        f"{machine()['cpus']} CPUs; ceiling: the stock graph's best over batch sizes",
        "pairs/s",
        ceiling_stock,
        {**{f"plan {label} (raw)": rate for label, rate in plan_medians.items()},
         f"twostage server ({chosen}, {clients} clients)": saturated["pairs_per_s"], **peers},
    )
    r = report["rounds"]
    print(f"  {rounds} rounds (medians above): server/stock {r['server_ratio_to_stock']}, spread {r['spread']}; "
          f"server {report['ratio_to_stock']:.3f} of the stock graph's best ({report['ceiling_stock']} pairs/s; "
          f"target >= 0.97), its plan raw {report['ceiling_ratio_to_stock']:.3f}")
    print(f"  server latency {saturated['latency_ms']}; errors {saturated['errors'] or 'none'}")
    print(f"  one client: latency {low['latency_ms']}; the same batches raw: p50 {floor_ms:.1f} ms, in the "
          f"batcher: p50 {low['batcher_p50_ms']:.1f} ms, added by batching {added_ms:.1f} ms "
          f"(max_wait_ms {settings.max_wait_ms})")
    print(f"  one client, one pair per request: raw p50 {single_floor_ms:.1f} ms, in the batcher p50 "
          f"{lone['batcher_p50_ms']:.1f} ms, added by batching {single_added_ms:.1f} ms; waiting in the "
          f"queue before its batch ran: p50 {lone['queue_p50_ms']:.2f} ms")
    print(f"  batches: mean size {stats['mean_batch_size']:.1f}, padding waste {stats['padding_waste']:.1%}, "
          f"shed {stats['shed_items']:.0f}")
    print(f"  pair-score cache, Zipf(1.0) stream of {cache['requests']} requests: hit rate {cache['hit_rate']:.1%}, "
          f"speedup {cache['speedup']:.2f}x, efficiency {cache['efficiency']:.2f} (target >= 0.9); a fully cached "
          f"request of 50 pairs: {cache['cached_50_pairs_server_ms']:.2f} ms at the server (target <= 2); "
          f"{cache['bytes']:,.0f} bytes held of {cache['max_bytes']:,}")
    write_json(args.json, report)
    return report


async def cache_section(server: "RerankServerProcess", dataset, requests: int, candidates: int,
                        clients: int) -> dict:
    """A Zipf(1.0) stream over the data set's queries, each with its candidates: pairs/s with the cache
    bypassed, then with it (starting empty), on one server."""
    from twostage.evaluation.loadtest import zipf_stream

    queries = rerank_workload(dataset, 300, candidates)
    stream = zipf_stream(queries, requests, 1.0, seed=5)
    print(f"cache: Zipf(1.0) stream of {requests} requests over {len(queries)} queries, off then on ...",
          flush=True)
    off = await drive(server.target, stream, clients, len(stream), bypass_cache=True)
    on = await drive(server.target, stream, clients, len(stream), bypass_cache=False)
    hit_rate = on["cached_pairs"] / on["pairs"]
    speedup = on["pairs_per_s"] / off["pairs_per_s"]
    fifty = [RerankRequest(queries[0].query,
                           [f"{d} ({i})" for i, d in enumerate((queries[0].documents * 50)[:50])])]
    await drive(server.target, fifty, 1, 1, bypass_cache=False)  # computed once: 50 pairs now cached
    cached_run = await drive(server.target, fifty, 1, 5, bypass_cache=False)
    bytes_held, max_bytes = server.cache_bytes()
    return {"requests": requests, "distinct_queries": len({r.query for r in stream}), "candidates": candidates,
            "pairs_per_s_off": round(off["pairs_per_s"], 2), "pairs_per_s_on": round(on["pairs_per_s"], 2),
            "hit_rate": round(hit_rate, 4), "speedup": round(speedup, 3),
            # 1.0 when every hit is free: the speedup the hit rate alone would give, achieved.
            "efficiency": round(speedup * (1 - hit_rate), 3),
            "cached_50_pairs_server_ms": round(statistics.median(cached_run["handler_ms"]), 3),
            "bytes": bytes_held, "max_bytes": max_bytes}

