"""``twostage bench http``: the HTTP/JSON face against gRPC, in the same run, on the same stack.

Two calls, each over both faces: one search (recall_k 4, top_k 4) and one rerank of 20 texts (Gateway.Rerank
and TEI's /rerank). The pair-score cache is warmed first, so what is measured is the faces and the gateway,
not the model. Latency: requests one at a time, the two faces interleaved, client-side p50. Throughput at
saturation: ``--clients`` concurrent callers, the faces taking turns, requests per second. Targets: HTTP adds
at most 1 ms p50; HTTP's throughput is at least 0.95 of gRPC's.

Then the framework choice, measured the same way in this process: one JSON POST validated with pydantic,
on FastAPI/uvicorn (httptools), the face's stack, and on aiohttp.web.
"""

import asyncio
import statistics
import time

import grpc

from gateway.http.face import EmbeddedServer, listen
from twostage.bench.gateway import bench_index
from twostage.bench.report import machine, write_json
from twostage.corpus import DEMO_CORPUS, read_corpus, read_queries
from twostage.model_store import fetch_defaults
from twostage.stack import Stack
from twostage.v1 import gateway_pb2, gateway_pb2_grpc

# The gateway plans each rerank against the tier's backlog counted at the model's cost per pair; at saturation
# that backlog (cached pairs too) would refuse calls a short budget cannot cover. The faces are measured here,
# not admission: the largest budget.
BUDGET_MS = 60_000


def _calls(stub, session, base: str, queries: list[str], texts: list[str]) -> dict:
    """name -> (gRPC call, HTTP call), each taking the i-th request."""

    async def search_grpc(i):
        await stub.Search(gateway_pb2.SearchRequest(query=queries[i % len(queries)], recall_k=4, top_k=4,
                                                    budget_ms=BUDGET_MS))

    async def search_http(i):
        async with session.post(f"{base}/v1/search", json={"query": queries[i % len(queries)], "recall_k": 4,
                                                             "top_k": 4, "budget_ms": BUDGET_MS}) as answer:
            assert answer.status == 200, await answer.text()
            await answer.read()

    async def rerank_grpc(i):
        await stub.Rerank(gateway_pb2.RerankTextsRequest(query=queries[i % 5], documents=texts, budget_ms=BUDGET_MS))

    async def rerank_http(i):
        async with session.post(f"{base}/rerank", json={"query": queries[i % 5], "texts": texts},
                                headers={"X-Twostage-Budget-Ms": str(BUDGET_MS)}) as answer:
            assert answer.status == 200, await answer.text()
            await answer.read()

    return {"search": (search_grpc, search_http), "rerank_20": (rerank_grpc, rerank_http)}


async def _latency(grpc_call, http_call, requests: int) -> tuple[list[float], list[float]]:
    grpc_s, http_s = [], []
    for i in range(requests):
        for call, out in ((grpc_call, grpc_s), (http_call, http_s)):
            start = time.perf_counter()
            await call(i)
            out.append(time.perf_counter() - start)
    return grpc_s, http_s


async def _throughput(call, clients: int, requests: int) -> float:
    """Requests per second with ``clients`` callers until ``requests`` are answered."""
    counter = iter(range(requests))

    async def caller():
        for i in counter:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return requests / (time.perf_counter() - start)


def _p50_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


async def compare_faces(stack: Stack, queries: list[str], texts: list[str], requests: int, clients: int,
                        rounds: int) -> dict:
    import aiohttp

    base = f"http://{stack.host}:{stack.http_port}"
    connector = aiohttp.TCPConnector(limit=clients)
    async with grpc.aio.insecure_channel(stack.gateway_target) as channel, \
            aiohttp.ClientSession(connector=connector) as session:
        calls = _calls(gateway_pb2_grpc.GatewayStub(channel), session, base, queries, texts)
        for grpc_call, http_call in calls.values():  # warm: connections, the score cache
            for i in range(len(queries)):
                await grpc_call(i)
                await http_call(i)
        report = {}
        for name, (grpc_call, http_call) in calls.items():
            grpc_s, http_s = await _latency(grpc_call, http_call, requests)
            grpc_rps, http_rps = [], []
            for _ in range(rounds):  # the faces take turns, so drift in the host's load hits both
                grpc_rps.append(await _throughput(grpc_call, clients, requests))
                http_rps.append(await _throughput(http_call, clients, requests))
            report[name] = {
                "grpc_p50_ms": _p50_ms(grpc_s), "http_p50_ms": _p50_ms(http_s),
                "http_added_p50_ms": round(_p50_ms(http_s) - _p50_ms(grpc_s), 3),
                "grpc_rps": round(statistics.median(grpc_rps), 1), "http_rps": round(statistics.median(http_rps), 1),
                "http_rps_ratio": round(statistics.median(http_rps) / statistics.median(grpc_rps), 3),
            }
            print(f"{name}: p50 gRPC {report[name]['grpc_p50_ms']} ms, HTTP {report[name]['http_p50_ms']} ms "
                  f"(+{report[name]['http_added_p50_ms']} ms); at saturation gRPC {report[name]['grpc_rps']} rps, "
                  f"HTTP {report[name]['http_rps']} rps ({report[name]['http_rps_ratio']:.2f})", flush=True)
    return report


async def compare_frameworks(requests: int, clients: int) -> dict:
    """The same JSON route on FastAPI/uvicorn (httptools) and on aiohttp.web, in this process."""
    import aiohttp
    import uvicorn
    from aiohttp import web
    from fastapi import FastAPI
    from pydantic import BaseModel, ConfigDict

    class Ask(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        query: str
        texts: list[str]

    fast = FastAPI()

    @fast.post("/rerank")
    async def fast_rerank(body: Ask):
        return [{"index": i, "score": 0.5} for i in range(len(body.texts))]

    async def aio_rerank(request):
        body = Ask.model_validate(await request.json())
        return web.json_response([{"index": i, "score": 0.5} for i in range(len(body.texts))])

    aio = web.Application()
    aio.router.add_post("/rerank", aio_rerank)

    sock = listen("127.0.0.1", 0)
    config = uvicorn.Config(fast, http="httptools", lifespan="off", log_config=None, access_log=False)
    config.load()
    server = EmbeddedServer(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    runner = web.AppRunner(aio, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ports = {"fastapi_uvicorn": sock.getsockname()[1], "aiohttp": site._server.sockets[0].getsockname()[1]}
    body = {"query": "q", "texts": [f"text {i}" for i in range(20)]}
    report = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
            async def call(name, i=0):
                async with session.post(f"http://127.0.0.1:{ports[name]}/rerank", json=body) as answer:
                    await answer.read()

            for name in ports:
                for _ in range(50):
                    await call(name)
            latencies = {name: [] for name in ports}
            for _ in range(requests):
                for name in ports:
                    start = time.perf_counter()
                    await call(name)
                    latencies[name].append(time.perf_counter() - start)
            for name in ports:
                rps = await _throughput(lambda i, name=name: call(name, i), clients, requests)
                report[name] = {"p50_ms": _p50_ms(latencies[name]), "rps": round(rps, 1)}
    finally:
        server.should_exit = True
        await server.shutdown(sockets=[sock])
        await runner.cleanup()
    print("frameworks (one validated JSON POST, client in this process): " + ", ".join(
        f"{name} p50 {row['p50_ms']} ms, {row['rps']} rps" for name, row in report.items()), flush=True)
    return report


async def run(args) -> dict:
    fetch_defaults(log=lambda message: None)
    queries = list(read_queries(DEMO_CORPUS).values())[:20]
    texts = [(d.title + " " + d.text)[:400] for d in list(read_corpus(DEMO_CORPUS))[:20]]
    index_dir = await asyncio.to_thread(bench_index, 200 if args.quick else 1000)
    requests = 100 if args.quick else 400
    stack = Stack("127.0.0.1", args.port, str(index_dir), http_port=args.port + 10)
    await stack.start(300)
    try:
        faces = await compare_faces(stack, queries, texts, requests, args.clients, 2 if args.quick else 3)
    finally:
        await stack.stop()
    frameworks = await compare_frameworks(requests, args.clients)
    report = {"machine": machine(), "requests": requests, "clients": args.clients, "faces": faces,
              "frameworks": frameworks,
              "targets_met": {name: row["http_added_p50_ms"] <= 1.0 and row["http_rps_ratio"] >= 0.95
                              for name, row in faces.items()}}
    write_json(args.json, report)
    return report
