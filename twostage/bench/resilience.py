"""``twostage bench resilience``: searches while documents are written, and how fast the
rerank tier takes in a replica that joins.

- ``bulk_upsert``: Recall.Search p99 at a steady rate, idle and then during a sustained bulk
  upsert through the gateway (target: during <= 1.5 x idle).
- ``replica_added``: with traffic flowing, a second rerank replica is written into the gateway's
  membership file; the time until it scores its first pair (target: within one re-resolution
  period, plus the time one search takes to arrive).
"""

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from twostage.bench.gateway import bench_index
from twostage.bench.report import machine, write_json
from twostage.corpus import DEMO_CORPUS, read_corpus, read_queries
from twostage.evaluation.loadtest import run_load
from twostage.model_store import fetch_defaults
from twostage.stack import Stack


async def bulk_upsert(gateway_target: str, recall_target: str, queries: list[str], docs: int, rate_rps: float,
                      idle_s: float) -> dict:
    from twostage.corpus import Document

    idle = await run_load(recall_target, "recall", queries, rate_rps, idle_s, 100_000, recall_k=10, progress=False)
    corpus = list(read_corpus(DEMO_CORPUS))
    writes = [Document(f"bulk-{i}", d.title, d.text) for i, d in enumerate((corpus * (docs // len(corpus) + 1))[:docs])]
    done = asyncio.Event()

    async def write() -> float:
        from twostage.connect import PLAINTEXT
        from twostage.convert import document_to_proto
        from twostage.v1 import common_pb2, gateway_pb2_grpc

        start = time.perf_counter()
        async with PLAINTEXT.aio_channel(gateway_target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for i in range(0, len(writes), 50):
                batch = [document_to_proto(d) for d in writes[i:i + 50]]
                await stub.Upsert(common_pb2.UpsertRequest(documents=batch), timeout=600)
        done.set()
        return time.perf_counter() - start

    writer = asyncio.ensure_future(write())
    during = await run_load(recall_target, "recall", queries, rate_rps, 3600, 100_000, recall_k=10, progress=False,
                            stop=done)
    write_s = await writer
    idle_report, during_report = idle.report(), during.report()
    return {
        "rate_rps": rate_rps,
        "documents_written": docs,
        "write_docs_per_s": round(docs / write_s, 2),
        "idle": {k: idle_report[k] for k in ("requests", "p50_ms", "p99_ms", "errors")},
        "during_bulk": {k: during_report[k] for k in ("requests", "p50_ms", "p99_ms", "errors")},
        "p99_ratio": round(during_report["p99_ms"] / idle_report["p99_ms"], 3),
        "target_p99_ratio": 1.5,
    }


async def replica_added(stack: Stack, queries: list[str], port: int, resolve_period_s: float) -> dict:
    from gateway.config import GatewaySettings
    from gateway.servicer import build_server

    members = Path(tempfile.mkdtemp(prefix="twostage-members-")) / "rerank"
    members.write_text(stack.rerank_targets[0] + "\n")
    gateway = build_server(GatewaySettings(port=0, recall_targets=stack.recall_targets[0],
                                           rerank_targets=f"file://{members}", resolve_period_s=resolve_period_s))
    target = f"127.0.0.1:{await gateway.start()}"
    extra = await asyncio.create_subprocess_exec(sys.executable, "-m", "rerank_server", "--port", str(port),
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        while line := await extra.stdout.readline():
            if line.decode().startswith("rerank serving"):
                break
        stop = asyncio.Event()
        load = asyncio.ensure_future(run_load(target, "gateway", queries, 2.0, 600, 100_000, recall_k=8,
                                              budget_ms=5000, progress=False, stop=stop))
        await asyncio.sleep(3)
        added_at = time.perf_counter()
        members.write_text(f"{stack.rerank_targets[0]}\n127.0.0.1:{port}\n")
        pool = gateway.lifecycle.pool
        first_pair_s = None
        while time.perf_counter() - added_at < 60:
            fresh = [r for r in pool.replicas if r.target.endswith(f":{port}")]
            if fresh and fresh[0].pairs_scored:
                first_pair_s = time.perf_counter() - added_at
                break
            await asyncio.sleep(0.02)
        stop.set()
        report = (await load).report()
    finally:
        extra.terminate()
        await extra.wait()
        await gateway.stop(grace_s=1)
        shutil.rmtree(members.parent, ignore_errors=True)
    return {"resolve_period_s": resolve_period_s, "first_pair_after_s": round(first_pair_s, 3) if first_pair_s else None,
            "errors_during": report["errors"]}


async def run(args) -> dict:
    fetch_defaults(log=lambda message: None)
    queries = list(read_queries(DEMO_CORPUS).values())
    index_dir = await asyncio.to_thread(bench_index, 200 if args.quick else 1000)
    work = Path(tempfile.mkdtemp(prefix="twostage-bench-"))
    shutil.copytree(index_dir, work / "index")
    try:
        async with Stack("127.0.0.1", args.port, str(work / "index")).running(300) as stack:
            print("bulk upsert against steady searches ...", flush=True)
            bulk = await bulk_upsert(stack.gateway_target, stack.recall_targets[0], queries,
                                     100 if args.quick else 400, args.rate_rps, 5 if args.quick else 15)
            print("a rerank replica joins under load ...", flush=True)
            joined = await replica_added(stack, queries, args.port + 10, args.resolve_period_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": machine(), "bulk_upsert": bulk, "replica_added": joined}
    print(json.dumps(report, indent=2))
    write_json(args.json, report)
    return report
