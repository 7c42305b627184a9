"""``twostage bench gateway``: the gateway's own overhead, its answers under
twice the load the rerank tier can sustain, and what tracing costs."""

import asyncio
import contextlib
import itertools
import math
import os
import random
import statistics
import time
from pathlib import Path

import grpc

from twostage.bench.report import machine, write_json
from twostage.connect import PLAINTEXT, Credentials
from twostage.corpus import DEMO_CORPUS, read_queries
from twostage.evaluation.loadtest import run_load
from twostage.model_store import cache_dir, fetch_defaults
from twostage.stack import Stack
from twostage.v1 import gateway_pb2, gateway_pb2_grpc


def bench_index(docs: int) -> Path:
    """A cached index of the first ``docs`` demo documents, kept as the eval's are (one per model and embedding
    graph), so the stacks measured never serve vectors another graph embedded."""
    from recall_server.build import cached_index

    return cached_index(DEMO_CORPUS, root=cache_dir().parent / "bench-indexes", limit=docs)


def _overhead_of(elapsed_ms: float, timings: dict[str, float]) -> tuple[float, ...]:
    """One search's time outside the stages' own handlers: (as the client sees it, inside the gateway, the
    gateway's own work, the recall hop, the rerank hop). A hop is a stage's time at the gateway less its
    server's handler time: the call both ways, both ends' gRPC and interceptors, the conversions."""
    stages_ms = timings["recall.total_ms"] + timings.get("rerank.total_ms", 0.0)
    recall_hop = timings["recall_ms"] - timings["recall.total_ms"]
    rerank_hop = timings["rerank_ms"] - timings.get("rerank.total_ms", 0.0)
    own = timings["total_ms"] - timings["recall_ms"] - timings["rerank_ms"]
    return elapsed_ms - stages_ms, timings["total_ms"] - stages_ms, own, recall_hop, rerank_hop


def _overhead_summary(rows: list[tuple[float, ...]]) -> dict:
    client, inside, own, recall_hop, rerank_hop = (statistics.median(column) for column in zip(*rows))
    hops = statistics.median(r[3] + r[4] for r in rows)
    return {"client_p50_ms": round(client, 3), "gateway_p50_ms": round(inside, 3), "gateway_own_p50_ms": round(own, 3),
            "downstream_hops_p50_ms": round(hops, 3),
            "hop_p50_ms": {"recall": round(recall_hop, 3), "rerank": round(rerank_hop, 3)}}


OVERHEAD_QUERIES = 20  # repeated, so that after the warm-up the score cache answers rerank


def _search(query: str) -> gateway_pb2.SearchRequest:
    return gateway_pb2.SearchRequest(query=query, recall_k=4, top_k=4, budget_ms=10_000)


async def overhead(targets: dict[str, tuple[str, Credentials]], queries: list[str], requests: int,
                   repeats: int) -> dict:
    """Time not spent inside the stages' handlers, per search, for stacks running side by side
    (``targets``: name -> (gateway target, credentials)): each repeat takes turns between them request by
    request, so a shared machine's drift reaches each alike. Searches of 4 candidates whose rerank the score
    cache answers once warm (the stages' own time is left out anyway; a model running would only add its
    threads' noise to the hops). Per stack: the medians of the repeats' p50s, and each repeat's."""
    asked = queries[:OVERHEAD_QUERIES]
    async with contextlib.AsyncExitStack() as channels:
        stubs = {}
        for name, (target, credentials) in targets.items():
            channel = await channels.enter_async_context(credentials.aio_channel(target))
            stubs[name] = (gateway_pb2_grpc.GatewayStub(channel), credentials.metadata)

        async def ask(name: str, query: str) -> tuple[float, ...]:
            stub, metadata = stubs[name]
            start = time.perf_counter()
            reply = await stub.Search(_search(query), metadata=metadata)
            return _overhead_of(1000 * (time.perf_counter() - start), reply.timings_ms)

        for query in asked * 2:  # warm: connections, the score cache
            for name in stubs:
                await ask(name, query)
        rounds = []
        for _ in range(repeats):
            rows = {name: [] for name in stubs}
            for i in range(requests):
                turn = list(stubs) if i % 2 == 0 else list(stubs)[::-1]
                for name in turn:
                    rows[name].append(await ask(name, asked[i % len(asked)]))
            rounds.append({name: _overhead_summary(r) for name, r in rows.items()})
    report = {}
    for name in targets:
        each = [r[name] for r in rounds]
        summary = {key: round(statistics.median(e[key] for e in each), 3) for key in each[0] if key != "hop_p50_ms"}
        summary["hop_p50_ms"] = {hop: round(statistics.median(e["hop_p50_ms"][hop] for e in each), 3)
                                 for hop in each[0]["hop_p50_ms"]}
        report[name] = {**summary, "requests_each": requests, "repeats": each}
    return report


async def hop_cost(index_dir: Path, port: int, queries: list[str], requests: int, repeats: int) -> dict:
    """The overhead of a plaintext stack and of one with TLS on every hop (mutual between tiers) and tokens on
    every call, side by side; what TLS and tokens add, per repeat and the median."""
    import shutil
    import tempfile

    from twostage.auth import add_token
    from twostage.dev_certs import write_dev_certs

    with tempfile.TemporaryDirectory(prefix="twostage-bench-") as scratch:
        tls, tokens, copy = Path(scratch) / "tls", Path(scratch) / "tokens", Path(scratch) / "index"
        write_dev_certs(tls)
        token = add_token(tokens, "search", "bench")
        # A recall server holds its index alone.
        await asyncio.to_thread(shutil.copytree, index_dir, copy, ignore=shutil.ignore_patterns(".lock"))
        plain = Stack("127.0.0.1", port, str(index_dir))
        secured = Stack("127.0.0.1", port + 3, str(copy), tls_dir=str(tls), auth_tokens=str(tokens))
        async with plain.running(300), secured.running(300):
            measured = await overhead({"plaintext": (plain.gateway_target, PLAINTEXT),
                                       "tls_and_tokens": (secured.gateway_target, Credentials(tls, token))},
                                      queries, requests, repeats)
    plaintext, tls_and_tokens = measured["plaintext"], measured["tls_and_tokens"]

    def added(key: str) -> list[float]:
        return [round(s[key] - p[key], 3) for p, s in zip(plaintext["repeats"], tls_and_tokens["repeats"])]

    return {"plaintext": plaintext, "tls_and_tokens": tls_and_tokens,
            # Target <= 1 ms: what TLS on every hop and the token checks add, as the client sees it.
            "added_client_p50_ms": round(statistics.median(added("client_p50_ms")), 3),
            "added_client_p50_ms_each": added("client_p50_ms"),
            "added_gateway_p50_ms": round(statistics.median(added("gateway_p50_ms")), 3),
            "added_gateway_p50_ms_each": added("gateway_p50_ms")}


async def hop_floor(requests: int, repeats: int) -> dict:
    """What a bare grpc.aio unary call between two processes takes here, shaped as the overhead's hops (4
    candidates) and as a full recall reply (20), for the hops to be read against."""
    from twostage.bench.grpc_floor import floor

    return {"candidates_4": await floor(requests, 4, repeats), "candidates_20": await floor(requests, 20, repeats)}


def print_floor(bare: dict, cost: dict) -> None:
    four, twenty = bare["candidates_4"]["p50_ms"], bare["candidates_20"]["p50_ms"]
    print(f"floor (a bare grpc.aio echo between two processes, same sizes): recall {four['recall']} ms, rerank "
          f"{four['rerank']} ms (with 20 documents of ~1 KB: {twenty['recall']}, {twenty['rerank']} ms); the hops add "
          f"{cost['hop_p50_ms']['recall'] - four['recall']:.3f} and {cost['hop_p50_ms']['rerank'] - four['rerank']:.3f} "
          "ms to it", flush=True)


def print_overhead(security: dict) -> None:
    cost, secured = security["plaintext"], security["tls_and_tokens"]
    each = [r["hop_p50_ms"] for r in cost["repeats"]]
    print(f"gateway overhead p50 (stages' own handler time excluded; medians of {len(each)} repeats): "
          f"{cost['client_p50_ms']} ms as the client sees it, {cost['gateway_p50_ms']} ms inside the gateway, of "
          f"which {cost['gateway_own_p50_ms']} ms is the gateway's own work and {cost['downstream_hops_p50_ms']} ms "
          f"the two gRPC hops to the stages (recall {cost['hop_p50_ms']['recall']} ms, rerank "
          f"{cost['hop_p50_ms']['rerank']} ms; each repeat: "
          + ", ".join(f"{h['recall']}/{h['rerank']}" for h in each) + ")", flush=True)
    print(f"TLS (mutual between tiers) and tokens add {security['added_client_p50_ms']} ms p50 as the client sees "
          f"it (each repeat {security['added_client_p50_ms_each']}; {secured['client_p50_ms']} vs "
          f"{cost['client_p50_ms']} ms); hops with them: recall {secured['hop_p50_ms']['recall']} ms, rerank "
          f"{secured['hop_p50_ms']['rerank']} ms", flush=True)


async def sustainable_rps(target: str, queries: list[str], recall_k: int) -> float:
    """Full-depth searches per second the rerank tier sustains: pairs it scored per second, one search at
    a time, divided by recall_k (counting pairs keeps the figure right even if depth is cut)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        start, pairs = time.perf_counter(), 0
        for query in queries[:3]:
            reply = await stub.Search(gateway_pb2.SearchRequest(query=query, recall_k=recall_k, budget_ms=600_000))
            pairs += reply.reranked
        return pairs / recall_k / (time.perf_counter() - start)


def scrape(metrics_port: int, names: list[str]) -> dict[str, float]:
    """These samples (name with labels, as exposed) from a server's own Prometheus endpoint; 0 when absent."""
    import urllib.request

    found = dict.fromkeys(names, 0.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name in found:
                found[name] = float(value)
    return found


def rerank_totals(metrics_port: int) -> tuple[float, float]:
    """(seconds the rerank model has spent computing, pairs it has scored)."""
    totals = scrape(metrics_port, ['twostage_batch_compute_seconds_sum{batcher="rerank"}',
                                   'twostage_batcher_items_total{batcher="rerank"}'])
    return tuple(totals.values())


def cache_counts(metrics_port: int) -> tuple[float, float]:
    """(pairs answered from the score cache or a pair in flight, pairs computed) at one rerank replica."""
    counts = scrape(metrics_port, ["twostage_rerank_cache_hits_total", "twostage_rerank_cache_shared_total",
                                   "twostage_rerank_cache_misses_total"])
    hits, shared, misses = counts.values()
    return hits + shared, misses


async def cache_affinity(index_dir: Path, port: int, queries: list[str], searches: int, recall_k: int) -> dict:
    """The score cache's hit rate over a Zipf(1.0) query stream through the gateway: one rerank replica,
    two with affinity (each document sent where a hash of its text says), two without (contiguous slices)."""
    from twostage.evaluation.loadtest import zipf_stream

    stream = zipf_stream(queries, searches, 1.0, seed=3)
    rows = {}
    for name, replicas, affinity in (("one_replica", 1, True), ("two_replicas_affinity", 2, True),
                                     ("two_replicas_no_affinity", 2, False)):
        os.environ["TWOSTAGE_GATEWAY_RERANK_AFFINITY"] = "true" if affinity else "false"
        stack = Stack("127.0.0.1", port, str(index_dir), rerank_replicas=replicas, metrics_port=port + 20)
        async with stack.running(300):
            async with grpc.aio.insecure_channel(stack.gateway_target) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                for query in stream:
                    await stub.Search(gateway_pb2.SearchRequest(query=query, recall_k=recall_k, budget_ms=600_000))
            ports = stack.metrics_ports()
            counts = [await asyncio.to_thread(cache_counts, ports[t]) for t in stack.rerank_targets]
        hits, misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
        rows[name] = {"hit_rate": round(hits / (hits + misses), 4), "pairs_computed": misses}
    os.environ.pop("TWOSTAGE_GATEWAY_RERANK_AFFINITY", None)
    return {"searches": searches, "distinct_queries": len(set(stream)), "recall_k": recall_k, **rows}


TRACING_SEARCHES = 500  # per stack and repeat, for p50 and CPU a search
TRACING = {  # what each stack of the tracing comparison runs with
    "off": {},
    "sampled_1.0": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"},
    "sampled_0.01": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    # The control: a second untraced stack, measured as the others against off. What it "adds" is the
    # benchmark's own spread between stacks, the smallest cost a run can tell from nothing.
    "off_again": {},
}


def cpu_s(pids: list[int]) -> float:
    """CPU seconds these processes have used so far, every thread of theirs (Linux's /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # user and system time
    return total


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """These variables (and no other OTEL_* one) for what starts inside; the process's own restored after."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def turn_cycle(names: list[str]) -> list[str]:
    """A cyclic order of turns in which each name comes straight after each other one exactly once, the step
    from the last turn back to the first included, and never after itself: an Eulerian circuit of the
    complete directed graph (Hierholzer's algorithm). n(n-1) turns, each name n-1 of them. Run over and
    over, every stack meets the after-effects of every other one (its export work, its caches' state)
    equally often, and none finds its own caches warm from a turn just before."""
    n = len(names)
    if n < 2:
        return list(names)
    unused = {i: [j for j in range(n) if j != i] for i in range(n)}
    path, circuit = [0], []
    while path:
        if unused[path[-1]]:
            path.append(unused[path[-1]].pop())
        else:
            circuit.append(path.pop())
    return [names[i] for i in reversed(circuit[1:])]  # the circuit ends where it began: once is enough


def turns_per_cycle(stacks: int) -> int:
    """A stack's turns in one ``turn_cycle`` over ``stacks`` stacks."""
    return max(1, stacks - 1)


def requests_per_stack(requests: int, stacks: int) -> int:
    """The measured requests each stack gets: at least ``requests``, in whole cycles."""
    return math.ceil(requests / turns_per_cycle(stacks)) * turns_per_cycle(stacks)


def tracing_turns(order: list[str], seed: str, requests: int) -> tuple[list[str], list[str]]:
    """(the turns for p50 and CPU, the turns for throughput slices) of one repeat: ``turn_cycle`` over the
    stacks in an order drawn from ``seed`` (so that which stack's turns come at which gaps changes from
    repeat to repeat), each list led by an unmeasured turn of the cycle's last stack, so that every measured
    turn follows the one the cycle puts before it. Every stack gets at least ``requests`` measured requests
    and one throughput slice per other stack."""
    cycle = turn_cycle(random.Random(seed).sample(order, len(order)))
    cycles = requests_per_stack(requests, len(order)) // turns_per_cycle(len(order))
    return [cycle[-1], *cycle * cycles], [cycle[-1], *cycle]


async def _tracing_round(index_dir: Path, port: int, order: list[str], queries: list[str], requests: int,
                         throughput_s: float, clients: int, exporting: dict[str, str], receiver,
                         hash_seed: str) -> dict:
    """One repeat of the comparison: a stack per setting, side by side (ports in ``order``), measured alike;
    per setting (p50 ms, searches per second, CPU ms per search)."""
    import shutil
    import tempfile

    copies = Path(tempfile.mkdtemp(prefix="twostage-bench-"))  # a recall server holds its index alone
    # One model thread per server: a dozen processes on a few cores, each with a thread per core spinning, would
    # make the stacks differ by more than what is measured.
    alike = {"TWOSTAGE_RECALL_INTRA_OP_THREADS": "1", "TWOSTAGE_RERANK_INTRA_OP_THREADS": "1",
             # One hash seed for the stacks of a repeat, another each repeat: a process's seed sets its dicts' and
             # sets' layouts for good, a lasting difference between two processes that is not the one measured.
             "PYTHONHASHSEED": hash_seed}
    try:
        async with contextlib.AsyncExitStack() as running:
            stubs, pids, tiers = {}, {}, {}
            for i, name in enumerate(order):
                copy = copies / name
                await asyncio.to_thread(shutil.copytree, index_dir, copy, ignore=shutil.ignore_patterns(".lock"))
                sampler = TRACING[name]
                with environment({**alike, **({**exporting, **sampler} if sampler else {})}):
                    stack = await running.enter_async_context(Stack("127.0.0.1", port + 3 * i, str(copy))
                                                              .running(300))
                channel = await running.enter_async_context(grpc.aio.insecure_channel(stack.gateway_target))
                stubs[name] = gateway_pb2_grpc.GatewayStub(channel)
                pids[name] = [child.process.pid for child in stack.children]
                tiers[name] = {child.name.split()[0]: child.process.pid for child in stack.children}
            # Each stack cycles through the same queries on its own: one cycle shared by stacks taking turns would
            # give a stack only every n-th query in the warm-up, and the rest would run the model when measured.
            asked = {name: itertools.cycle(queries[:20]) for name in stubs}

            async def ask(name: str) -> float:
                start = time.perf_counter()
                await stubs[name].Search(gateway_pb2.SearchRequest(query=next(asked[name]), recall_k=4, top_k=4,
                                                                   budget_ms=60_000))
                return 1000 * (time.perf_counter() - start)

            for _ in range(2 * min(len(queries), 20)):  # warm: models, connections, the score cache
                for name in stubs:
                    await ask(name)

            # Turns in which each stack follows each other one equally often (the one exporting every span leaves
            # work behind for whichever comes next: its spans still queued when its turn ends reach the receiver in
            # a later turn) and never itself; the first of each list is not measured.
            request_turns, slice_turns = tracing_turns(order, hash_seed, requests)
            latencies = {name: [] for name in stubs}
            await ask(request_turns[0])
            # The CPU each stack's three processes spend a search, all their threads: what the wall clock on a
            # shared machine blurs.
            used = {name: cpu_s(pids[name]) for name in stubs}
            by_tier = {name: {tier: cpu_s([pid]) for tier, pid in tiers[name].items()} for name in stubs}
            for name in request_turns[1:]:
                latencies[name].append(await ask(name))
            asked_each = {name: len(latencies[name]) for name in stubs}
            used = {name: 1000 * (cpu_s(pids[name]) - used[name]) / asked_each[name] for name in stubs}
            by_tier = {name: {tier: 1000 * (cpu_s([pid]) - by_tier[name][tier]) / asked_each[name]
                              for tier, pid in tiers[name].items()} for name in stubs}
            answered, elapsed = dict.fromkeys(stubs, 0), dict.fromkeys(stubs, 0.0)
            for turn, name in enumerate(slice_turns):  # throughput: closed-loop slices, one a turn
                await asyncio.to_thread(receiver.wait_quiet)  # spans already on their way received first
                end = time.perf_counter() + throughput_s / turns_per_cycle(len(order))

                async def client(name=name, end=end) -> int:
                    count = 0
                    while time.perf_counter() < end:
                        await ask(name)
                        count += 1
                    return count

                start = time.perf_counter()
                count = sum(await asyncio.gather(*(client() for _ in range(clients))))
                if turn:  # the lead-in slice is not measured
                    answered[name] += count
                    elapsed[name] += time.perf_counter() - start
    finally:
        shutil.rmtree(copies, ignore_errors=True)
    return {name: (statistics.median(latencies[name]), answered[name] / elapsed[name], used[name], by_tier[name])
            for name in stubs}


async def tracing_cost(index_dir: Path, port: int, queries: list[str], requests: int, repeats: int,
                       throughput_s: float, clients: int = 4) -> dict:
    """Searches with tracing off, sampling every trace and sampling 1%, spans exported to a local OTLP receiver,
    and an untraced control stack beside them, whose difference from off is the run's resolution.
    Each repeat starts a stack per setting, side by side, and gives them turns (``tracing_turns``) at requests
    (p50 and CPU, one at a time) and at closed-loop slices of ``clients`` concurrent searches (throughput), so
    a shared machine's drift hits every stack alike; fresh processes each repeat, the settings' places rotated
    and a new hash seed, so that what differs between processes (where the OS put their threads) averages out.
    Queries repeat: after the warm-up the score cache answers rerank, leaving the hops and the query
    embedding, where tracing's cost would show."""
    from twostage.bench.otlp import OtlpReceiver

    receiver = OtlpReceiver().start()
    names = list(TRACING)
    rounds = []
    try:
        for repeat in range(repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            print(f"  repeat {repeat + 1} of {repeats} ...", flush=True)
            rounds.append(await _tracing_round(index_dir, port, order, queries, requests, throughput_s, clients,
                                               # The SDK's export interval (5 s), as deployed: a
                                               # shorter one costs every traced process CPU by itself.
                                               {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}, receiver,
                                               hash_seed=str(repeat + 1)))
    finally:
        receiver.stop()
    rows = {}
    for name in names:
        p50s = [r[name][0] for r in rounds]
        rates = [r[name][1] for r in rounds]
        cpu = [r[name][2] for r in rounds]
        rows[name] = {"p50_ms": round(statistics.median(p50s), 3), "throughput_rps": round(statistics.median(rates), 2),
                      "p50_ms_each": [round(v, 3) for v in p50s], "throughput_rps_each": [round(v, 2) for v in rates],
                      "cpu_ms_per_search": round(statistics.median(cpu), 3),
                      "cpu_ms_by_tier": {tier: round(statistics.median(r[name][3][tier] for r in rounds), 3)
                                         for tier in rounds[0][name][3]}}
    for name in names[1:]:
        added = [r[name][0] - r["off"][0] for r in rounds]
        ratios = [r[name][1] / r["off"][1] for r in rounds]
        cpu_added = [r[name][2] - r["off"][2] for r in rounds]
        # Which tier's processes the added CPU is in (gateway, recall, rerank): where to look for a cost.
        rows[name]["cpu_added_ms_by_tier"] = {
            tier: round(statistics.median(r[name][3][tier] - r["off"][3][tier] for r in rounds), 3)
            for tier in rounds[0]["off"][3]}
        rows[name].update({"cpu_added_ms": round(statistics.median(cpu_added), 3),
                           "cpu_added_ms_each": [round(v, 3) for v in cpu_added], "p50_added_ms": round(statistics.median(added), 3),
                           "p50_added_ms_each": [round(v, 3) for v in added],
                           "throughput_ratio": round(statistics.median(ratios), 4),
                           "throughput_ratio_each": [round(v, 4) for v in ratios]})
    at_1pct, control = rows["sampled_0.01"], rows["off_again"]
    # Targets: sampling 1%, p50 rises by 0.1 ms at most and throughput stays at 0.99 of untraced or more. A run
    # whose control differs from off by as much, or spreads as much from repeat to repeat, cannot tell a cost of
    # that size from its own noise.
    # Resolution: the control's median difference from off, or the standard error of its repeats, the larger.
    def resolution_of(median: float, each: list[float]) -> float:
        error = statistics.stdev(each) / math.sqrt(len(each)) if len(each) > 1 else 0.0
        return round(max(abs(median), error), 4)

    resolution = {"p50_ms": resolution_of(control["p50_added_ms"], control["p50_added_ms_each"]),
                  "throughput": resolution_of(1 - control["throughput_ratio"], control["throughput_ratio_each"]),
                  "cpu_ms": resolution_of(control["cpu_added_ms"], control["cpu_added_ms_each"])}
    return {"requests_each": requests_per_stack(requests, len(names)), "repeats": repeats, "throughput_s": throughput_s, "clients": clients,
            "spans_received": len(receiver.spans), **rows, "resolution": resolution,
            "resolves_targets": resolution["p50_ms"] <= 0.1 and resolution["throughput"] <= 0.01,
            "meets_targets_at_0.01": at_1pct["p50_added_ms"] <= 0.1 and at_1pct["throughput_ratio"] >= 0.99}


def print_tracing(cost: dict) -> None:
    off = cost["off"]
    print(f"tracing (medians of {cost['repeats']} repeats): off p50 {off['p50_ms']} ms, {off['throughput_rps']} "
          f"searches/s, {off['cpu_ms_per_search']} ms CPU a search (its three processes); " + "; ".join(
              f"{name.replace('_', ' ')}: p50 {row['p50_added_ms']:+} ms (each repeat {row['p50_added_ms_each']}), "
              f"throughput x{row['throughput_ratio']} (each {row['throughput_ratio_each']}), CPU a search "
              f"{row['cpu_added_ms']:+} ms (each {row['cpu_added_ms_each']}; by tier {row['cpu_added_ms_by_tier']})"
              for name, row in cost.items() if name in TRACING and name != "off")
          + f"; {cost['spans_received']} spans exported", flush=True)
    resolution = cost["resolution"]
    print(f"resolution (off against the untraced control, off_again): p50 {resolution['p50_ms']} ms, throughput "
          f"{resolution['throughput']}, CPU {resolution['cpu_ms']} ms a search: the targets (+0.1 ms, 0.99) are "
          f"{'within' if cost['resolves_targets'] else 'BELOW'} what this run can resolve; at 0.01 they are "
          f"{'met' if cost['meets_targets_at_0.01'] else 'missed'}", flush=True)


async def run(args) -> dict:
    fetch_defaults(log=lambda message: None)
    repeats = getattr(args, "repeat", None) or (2 if args.quick else 3)
    if getattr(args, "only", None) == "overhead":
        queries = list(read_queries(DEMO_CORPUS).values())
        index_dir = await asyncio.to_thread(bench_index, 200 if args.quick else 1000)
        print("gateway overhead, plaintext and with TLS and tokens, side by side ...", flush=True)
        security = await hop_cost(index_dir, args.port + 50, queries, 40 if args.quick else 100, repeats)
        print("the floor under a hop: a bare grpc.aio echo between two processes ...", flush=True)
        bare = await hop_floor(200 if args.quick else 500, repeats)
        print_overhead(security)
        print_floor(bare, security["plaintext"])
        report = {"machine": machine(), "overhead": {**security["plaintext"], "floor": bare}, "security": security}
        write_json(args.json, report)
        return report
    if getattr(args, "only", None) == "tracing":
        queries = list(read_queries(DEMO_CORPUS).values())
        index_dir = await asyncio.to_thread(bench_index, 200 if args.quick else 1000)
        print("tracing off, sampling 1.0 and 0.01, side by side ...", flush=True)
        cost = await tracing_cost(index_dir, args.port + 40, queries, 100 if args.quick else TRACING_SEARCHES,
                                  repeats, 6.0 if args.quick else 12.0)
        print_tracing(cost)
        report = {"machine": machine(), "tracing": cost}
        write_json(args.json, report)
        return report
    # The overload measures the model's capacity: its queries repeat, and the pair-score cache would answer
    # them for free (the cache has its own benchmark, 'twostage bench rerank').
    os.environ["TWOSTAGE_RERANK_SCORE_CACHE_MB"] = "0"
    queries = list(read_queries(DEMO_CORPUS).values())
    index_dir = await asyncio.to_thread(bench_index, 200 if args.quick else 1000)
    metrics_base = args.port + 20
    stack = Stack("127.0.0.1", args.port, str(index_dir), metrics_port=metrics_base)
    async with stack.running(300):
        rerank_metrics = stack.metrics_ports()[stack.rerank_targets[0]]
        capacity = await sustainable_rps(stack.gateway_target, queries, args.recall_k)
        rate = 2 * capacity
        duration = 10 if args.quick else 40
        print(f"overload: {rate:.2f} rps (2x the {capacity:.2f} rps rerank sustains at recall_k "
              f"{args.recall_k}), budget {args.budget_ms} ms, {duration} s ...", flush=True)
        (busy_before, scored_before), wall_before = await asyncio.to_thread(rerank_totals, rerank_metrics), \
            time.perf_counter()
        load = await run_load(stack.gateway_target, "gateway", queries, rate, duration, 10_000,
                              poisson=True, recall_k=args.recall_k, budget_ms=args.budget_ms,
                              timeout_s=args.budget_ms / 1000 * 3)
        busy_after, scored_after = await asyncio.to_thread(rerank_totals, rerank_metrics)
        utilization = (busy_after - busy_before) / (time.perf_counter() - wall_before)
        scored = scored_after - scored_before
    os.environ.pop("TWOSTAGE_RERANK_SCORE_CACHE_MB")  # the overhead and the cache's own parts use the cache
    print("gateway overhead, plaintext and with TLS and tokens, side by side ...", flush=True)
    security = await hop_cost(index_dir, args.port + 50, queries, 40 if args.quick else 100, repeats)
    print("the floor under a hop: a bare grpc.aio echo between two processes ...", flush=True)
    bare = await hop_floor(200 if args.quick else 500, repeats)
    print("score cache through the gateway: one replica, two with and without affinity ...", flush=True)
    affinity = await cache_affinity(index_dir, args.port + 30, queries, 12 if args.quick else 40, args.recall_k)
    print("tracing off, sampling 1.0 and 0.01, side by side ...", flush=True)
    tracing = await tracing_cost(index_dir, args.port + 40, queries, 100 if args.quick else TRACING_SEARCHES,
                                 repeats, 6.0 if args.quick else 12.0)
    overload = load.report()

    def fair_share(rate_rps: float) -> float:
        """What the tier can rerank per answer at this rate, capped at recall_k."""
        return round(min(args.recall_k, capacity * args.recall_k / rate_rps), 3)

    budget_used = [ms / args.budget_ms for ms in load.latencies_ms]
    report = {
        "machine": machine(),
        # Targets: each hop <= 1 ms p50 (hop_p50_ms), TLS with tokens adds <= 1 ms p50 (added_client_p50_ms).
        "overhead": {**security["plaintext"], "floor": bare},
        "security": security,
        "cache_affinity": affinity,
        "tracing": tracing,
        "overload": {**overload, "budget_ms": args.budget_ms, "recall_k": args.recall_k,
                     "sustainable_full_depth_rps": round(capacity, 3),
                     # The rerank tier's model time over wall time (target >= 0.85).
                     "rerank_utilization": round(utilization, 3),
                     # At the rate really sent (the Poisson schedule's count varies around 2x); mean_reranked
                     # should reach 0.85 of it.
                     "fair_share_pairs": fair_share(overload["sent_rps"]),
                     "fair_share_pairs_at_nominal_rate": fair_share(rate),
                     # Pairs the model scored whose answer was not used (its caller's time ran out first).
                     "pairs_scored": scored,
                     "wasted_share": round(1 - overload["mean_reranked"] * overload["ok"] / scored, 3) if scored else 0,
                     # Each answer's latency (from its scheduled send) over its budget: how much it used.
                     "budget_used_mean": round(statistics.fmean(budget_used), 3) if budget_used else None,
                     "budget_used_p50": round(statistics.median(budget_used), 3) if budget_used else None,
                     "p99_within_budget_plus_5pct": overload["p99_ms"] is not None
                     and overload["p99_ms"] <= 1.05 * args.budget_ms,
                     "deadline_exceeded": overload["errors"].get("DEADLINE_EXCEEDED", 0)},
    }
    print()
    print_overhead(security)
    print_floor(bare, security["plaintext"])
    o = report["overload"]
    print(f"rerank tier {o['rerank_utilization']:.0%} busy; {o['mean_reranked']} candidates reranked per answer "
          f"against a fair share of {o['fair_share_pairs']} (target >= 0.85 of it); {o['wasted_share']:.1%} of "
          f"the {o['pairs_scored']:.0f} pairs scored went unused")
    print(f"overload at {rate:.2f} rps ({overload['sent_rps']} sent): p50 {overload['p50_ms']} ms, p99 "
          f"{overload['p99_ms']} ms (budget {args.budget_ms} ms; {o['budget_used_mean']:.0%} of it used on average), "
          f"errors {overload['errors'] or 'none'}, degraded {overload['degraded']}")
    print("score cache hit rate over a Zipf(1.0) stream: " + ", ".join(
        f"{name} {row['hit_rate']:.1%}" for name, row in affinity.items() if isinstance(row, dict)))
    print_tracing(tracing)
    write_json(args.json, report)
    return report
