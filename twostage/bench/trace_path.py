"""What tracing costs one search in CPU, measured in one process without the network or the models.

One search runs the gateway's real interceptors and ``SearchPipeline`` (recall shard, rerank pool and clients
included); the clients' stubs hand each call, with the metadata the client sent, straight to the recall or
rerank tier's real interceptors, whose handlers make the tracing calls their services make (spans for embed,
dense and lexical search, fusion, tokenize, a real ``DynamicBatcher`` per tier computing inline with its
metrics observer, the search-time histogram). Each setting runs in a fresh process (tracing is set up once
per process): off; on with every request dropped by the sampler at the gateway (the unsampled path, 99 in 100
requests at a 1% ratio); sampling 1% and sampling every request, exported to an OTLP receiver in this
process. The four processes run side by side and take turns at slices of searches. Reported: microseconds per
search, CPU (the process's, export thread included) and wall, the least of the slices' means (a loaded machine
only ever adds time), and each setting's cost over off.

    python -m twostage.bench.trace_path [--requests 500] [--repeats 20] [--profile drop]

``--same-process`` compares only off and the unsampled path, both in one process (see ``_same_process``).
"""

import argparse
import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "off": {},
    "drop": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    "sampled_0.01": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "sampled_1.0": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"},
}
CANDIDATES = 20


class _Inline(concurrent.futures.Executor):
    """Runs the model's batch at once on the caller's thread: no thread hand-off to blur the measure."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting side
            future.set_exception(error)
        return future


class _Context:
    """What the interceptors read of a grpc.aio ServicerContext."""

    def code(self):
        return None

    def details(self):
        return ""

    def time_remaining(self):
        return 30.0


class _Details:
    __slots__ = ("invocation_metadata", "method")

    def __init__(self, method: str, metadata):
        self.method = method
        self.invocation_metadata = metadata


async def _intercepted(interceptors, method: str, metadata, behavior, request):
    """One unary call through ``interceptors`` as grpc.aio runs them (outermost first), then the handler."""
    import grpc

    async def terminal(details):
        return grpc.unary_unary_rpc_method_handler(behavior)

    async def chain(position: int, details):
        if position == len(interceptors):
            return await terminal(details)
        return await interceptors[position].intercept_service(lambda d: chain(position + 1, d), details)

    handler = await chain(0, _Details(method, tuple(metadata or ())))
    return await handler.unary_unary(request, _Context())


def _interceptors():
    """The interceptors a GrpcService puts before its token check (none here)."""
    from twostage import tracing
    from twostage.metrics import RpcMetricsInterceptor

    return [RpcMetricsInterceptor(traced=tracing.enabled)]


async def _stack(received: list | None = None):
    """(the gateway's search for one query (and the metadata to call it with), what to close); ``received``
    collects (method, metadata, its trace_unsampled field) of each call a recall or rerank tier receives."""
    from gateway.clients import RecallClient, RerankClient
    from gateway.config import GatewaySettings
    from gateway.pipeline import SearchPipeline, SearchQuery
    from gateway.recall_tier import RecallShard
    from gateway.rerank_pool import RerankPool
    from twostage import tracing
    from twostage.batching import BatchPolicy, DynamicBatcher
    from twostage.membership import Target
    from twostage.metrics import RECALL_SEARCH_SECONDS, batch_observer
    from twostage.recall_mode import RecallMode
    from twostage.tracing import exemplar
    from twostage.v1 import common_pb2, recall_pb2, rerank_pb2

    policy = BatchPolicy(max_wait_ms=0.0)
    embedder = DynamicBatcher("embed", lambda items: [0.0] * len(items), policy, _Inline(),
                              [batch_observer("embed")])
    scorer = DynamicBatcher("rerank", lambda items: [float(len(i)) for i in items], policy, _Inline(),
                            [batch_observer("rerank")])
    embedder.start()
    scorer.start()
    reply = recall_pb2.RecallSearchResponse(
        candidates=[recall_pb2.Candidate(id=f"d{i}", title="", text=f"document {i} " * 20, score=1 - i / 100,
                                         dense_score=1 - i / 100) for i in range(CANDIDATES)],
        timings_ms={"embed_ms": 1.0, "total_ms": 2.0}, mode=common_pb2.RECALL_MODE_HYBRID)

    async def recall_search(request, context):  # the tracing calls RecallService.search makes
        start = time.perf_counter()
        with tracing.span("embed"):
            await embedder.submit([request.query], [12], time.monotonic() + 10)
        with tracing.span("dense search") as span:
            if span.is_recording():
                span.set_attributes({"twostage.k": request.k, "twostage.found": CANDIDATES,
                                     "twostage.filtered": False})
        with tracing.span("lexical search") as span:
            if span.is_recording():
                span.set_attributes({"twostage.depth": 100, "twostage.matches": CANDIDATES,
                                     "twostage.filtered": False})
        with tracing.span("fusion") as span:
            if span.is_recording():
                span.set_attributes({"twostage.fusion": "rrf", "twostage.fused": CANDIDATES})
        if (span := tracing.current_span()).is_recording():
            span.set_attributes({"twostage.shard": 0, "twostage.shards": 1, "twostage.recall_mode": RecallMode.HYBRID,
                                 "twostage.k": request.k, "twostage.candidates": CANDIDATES})
        RECALL_SEARCH_SECONDS.labels(RecallMode.HYBRID).observe(time.perf_counter() - start, exemplar())
        return reply

    async def rerank(request, context):  # the tracing calls RerankService.rerank makes
        with tracing.span("tokenize query"):
            pass
        lengths = [len(d) // 4 for d in request.documents]
        with tracing.span("tokenize") as span:
            if span.is_recording():
                span.set_attributes({"twostage.pairs": len(lengths), "twostage.tokens": sum(lengths)})
        done = await scorer.submit(list(request.documents), lengths, time.monotonic() + 10, partial=True)
        if (span := tracing.current_span()).is_recording():
            span.set_attributes({"twostage.documents": len(lengths), "twostage.cached": 0, "twostage.unscored": 0,
                                 "twostage.tokens": sum(lengths), "twostage.query_truncated": False})
        return rerank_pb2.RerankResponse(results=[rerank_pb2.RerankResult(index=i, score=s)
                                                  for i, s in enumerate(done.values)], tokens=sum(lengths))

    class Stub:
        def __init__(self, method: str, behavior):
            self.method, self.behavior, self.interceptors = method, behavior, _interceptors()

        async def __call__(self, request, timeout=None, metadata=None):
            if received is not None:
                received.append((self.method, tuple(metadata or ()), request.trace_unsampled))
            return await _intercepted(self.interceptors, self.method, metadata, self.behavior, request)

    class Recall(RecallClient):
        fake = type("RecallStub", (), {"Search": Stub("/twostage.v1.Recall/Search", recall_search)})()

        @property
        def stub(self):
            return self.fake

    class Rerank(RerankClient):
        fake = type("RerankStub", (), {"Rerank": Stub("/twostage.v1.Rerank/Rerank", rerank)})()

        @property
        def stub(self):
            return self.fake

    settings = GatewaySettings(rerank_slice_ms=0)
    shard = RecallShard(0, Target("127.0.0.1:1"), lambda address, name: Recall(address, name))
    pool = RerankPool([Rerank("127.0.0.1:2", "rerank replica 0")], initial_ms_per_pair=0.01, affinity=False)
    pipeline = SearchPipeline(settings, [shard], pool)
    gateway = _interceptors()

    async def search(request, context):  # the servicer's Search, less building its reply
        return await pipeline.search(SearchQuery(query=request["query"], top_k=5, recall_k=CANDIDATES,
                                                 budget_ms=10_000))

    async def one(query: str, metadata: tuple = ()):
        return await _intercepted(gateway, "/twostage.v1.Gateway/Search", metadata, search, {"query": query})

    async def close():
        await embedder.close()
        await scorer.close()
        await pipeline.close()

    return one, close


async def _serve(profile: bool) -> None:
    """The child: set up as the environment says, warm up, then run slices of searches as told on stdin
    ("N": N searches, answered with a JSON line of microseconds per search; "" or EOF: stop)."""
    from twostage import tracing

    tracing.setup("bench")
    one, close = await _stack()
    result = await one("warm up")
    assert result.reranked == CANDIDATES and not result.degraded, result.degradations
    for i in range(500):
        await one(f"query {i % 50}")
    print("ready", flush=True)
    count = 0
    while line := (await asyncio.to_thread(sys.stdin.readline)).strip():
        requests = int(line)
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        wall, cpu = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(requests):
            count += 1
            await one(f"query {count % 50}")
        wall, cpu = time.perf_counter_ns() - wall, time.process_time_ns() - cpu
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
            profile = False
        print(json.dumps({"wall_us": wall / requests / 1000, "cpu_us": cpu / requests / 1000}), flush=True)
    await close()
    tracing.shutdown(2)


def run(requests: int = 500, repeats: int = 20, profile: str | None = None) -> dict:
    """The settings' processes side by side, taking turns at slices of ``requests`` searches, ``repeats`` times
    (each setting's least kept): a drift in the machine's load reaches every setting alike."""
    from twostage.bench.otlp import OtlpReceiver

    receiver = OtlpReceiver().start()
    children: dict[str, subprocess.Popen] = {}
    measured: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    try:
        for name, variables in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            # Spans exported within the slice that made them (its CPU is counted then); the export thread's
            # wake-ups every 0.2 s cost a slice of 300 searches about 0.5 us a search.
            env.update(variables, OTEL_BSP_SCHEDULE_DELAY="200")
            if variables:
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
            command = [sys.executable, "-m", "twostage.bench.trace_path", "--child"]
            children[name] = subprocess.Popen(command + (["--profile", name] if profile == name else []), env=env,
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name, child in children.items():
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{name}: the child did not start (exit {child.wait()})")
        names = list(SETTINGS)
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                children[name].stdin.write(f"{requests}\n")
                children[name].stdin.flush()
                measured[name].append(json.loads(children[name].stdout.readline()))
                if SETTINGS[name]:
                    receiver.wait_quiet(0.3)  # its spans exported before the next setting's turn
    finally:
        for child in children.values():
            if child.poll() is None:
                child.stdin.close()
        for child in children.values():
            child.wait(60)
        receiver.stop()
    rows = {name: {"wall_us": round(min(m["wall_us"] for m in runs), 1),
                   "cpu_us": round(min(m["cpu_us"] for m in runs), 1),
                   "cpu_us_median": round(sorted(m["cpu_us"] for m in runs)[len(runs) // 2], 1)}
            for name, runs in measured.items()}
    for row in rows.values():
        row["wall_added_us"] = round(row["wall_us"] - rows["off"]["wall_us"], 1)
        row["cpu_added_us"] = round(row["cpu_us"] - rows["off"]["cpu_us"], 1)
    return {"requests": requests, "repeats": repeats, "spans_received": len(receiver.spans), **rows}


async def _same_process(requests: int, repeats: int) -> dict:
    """The unsampled path's cost in one process: a stack made with tracing off and one with tracing on (every
    request dropped by the sampler), slices of ``requests`` searches taking turns ``repeats`` times each. Off
    and on then share one heap, one set of loaded modules and one core, which separate processes do not: what
    is left between them is the tracing calls. Per setting, the least and the median slice's CPU per search."""
    from twostage import tracing

    tracing.setup("bench", {**os.environ, **SETTINGS["drop"], "OTEL_TRACES_EXPORTER": "console"})
    stacks = {}
    for name, on in (("off", False), ("drop", True)):
        tracing.enabled = on  # read when the interceptors are made, and by the clients at every call
        stacks[name] = (await _stack(), on)
    cpu: dict[str, list[float]] = {name: [] for name in stacks}
    try:
        for repeat in range(-1, repeats):  # the first round warms up
            for name in (list(stacks) if repeat % 2 else list(stacks)[::-1]):
                (one, _), on = stacks[name]
                tracing.enabled = on
                start = time.process_time_ns()
                for i in range(requests):
                    await one(f"query {i % 50}")
                if repeat >= 0:
                    cpu[name].append((time.process_time_ns() - start) / requests / 1000)
    finally:
        for (_, close), on in stacks.values():
            tracing.enabled = on
            await close()
        tracing.enabled = True
        tracing.shutdown(2)
    rows = {name: {"cpu_us": round(min(v), 1), "cpu_us_median": round(sorted(v)[len(v) // 2], 1)}
            for name, v in cpu.items()}
    rows["drop"].update(cpu_added_us=round(rows["drop"]["cpu_us"] - rows["off"]["cpu_us"], 1),
                        cpu_added_us_median=round(rows["drop"]["cpu_us_median"] - rows["off"]["cpu_us_median"], 1))
    return {"requests": requests, "repeats": repeats, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="searches per slice")
    parser.add_argument("--repeats", type=int, default=20, help="slices per setting")
    parser.add_argument("--profile", choices=list(SETTINGS), default=None,
                        help="print where this setting's first slice spends its time (cProfile, to stderr)")
    parser.add_argument("--same-process", action="store_true",
                        help="only off against the unsampled path, both in this process (less noise between them)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(_serve(args.profile is not None))
        return
    if args.same_process:
        report = asyncio.run(_same_process(args.requests, args.repeats))
        drop = report["drop"]
        print(f"same process: off {report['off']['cpu_us']} us CPU per search (median {report['off']['cpu_us_median']}), "
              f"unsampled {drop['cpu_us']} ({drop['cpu_added_us']:+}; median {drop['cpu_us_median']}, "
              f"{drop['cpu_added_us_median']:+}); least and median of {args.repeats} slices of {args.requests}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=2)
        return
    report = run(args.requests, args.repeats, args.profile)
    for name in SETTINGS:
        row = report[name]
        print(f"{name:>13}: {row['cpu_us']:8.1f} us CPU ({row['cpu_added_us']:+7.1f}), "
              f"{row['wall_us']:8.1f} us wall ({row['wall_added_us']:+7.1f}) per search")
    print(f"least of {report['repeats']} slices of {report['requests']} searches each; "
          f"{report['spans_received']} spans exported")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
