"""``twostage bench recall``: what lexical search and fusion add to a recall search on a real index, and
filtered dense search on a large synthetic index (random vectors), checked exact against brute force."""

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from recall_server.build import cached_index
from recall_server.config import RecallSettings
from recall_server.index import DocumentIndex
from recall_server.service import RecallService
from twostage.bench.report import machine, write_json
from twostage.bench.workload import default_dataset
from twostage.corpus import Document, read_queries
from twostage.filters import FilterClause, check_filter
from twostage.model_store import fetch_defaults
from twostage.recall_mode import RecallMode

# Each row's recall mode. hybrid+prf: hybrid with pseudo-relevance feedback as the settings have it (the default);
# the others without.
MODES = {"dense": RecallMode.DENSE, "lexical": RecallMode.LEXICAL, "hybrid": RecallMode.HYBRID,
         "hybrid+prf": RecallMode.HYBRID}


async def mode_latency(index_dir: Path, queries: list[str], k: int) -> dict:
    """Per-search time of each mode, the embedding included; the modes take turns query by query."""
    service = RecallService(RecallSettings(port=0, index_dir=index_dir, read_only=True))
    await service.start()
    prf = {"depth": service.settings.prf_depth, "weight": service.settings.prf_weight}
    try:
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        feedback_ms: list[float] = []
        for query in queries:
            for mode, recall_mode in MODES.items():
                start = time.perf_counter()
                answer = await service.answer(query, k, mode=recall_mode,
                                              prf_depth=None if mode == "hybrid+prf" else 0)
                times[mode].append(1000 * (time.perf_counter() - start))
                if mode == "hybrid+prf":
                    feedback_ms.append(answer.timings.get("prf_ms", 0.0))
    finally:
        await service.close()
    p50 = {mode: round(statistics.median(t), 3) for mode, t in times.items()}
    return {"queries": len(queries), "k": k, "p50_ms": p50, "prf": prf,
            "hybrid_added_p50_ms": round(p50["hybrid"] - p50["dense"], 3),
            # What feedback adds to a hybrid search: the difference of the p50s, and its own step's p50.
            "prf_added_p50_ms": round(p50["hybrid+prf"] - p50["hybrid"], 3),
            "prf_step_p50_ms": round(statistics.median(feedback_ms), 3)}


def filtered_search(docs: int, dims: int, queries: int, k: int, seed: int = 11) -> dict:
    """p50 of filtered searches at 1% and 50% selectivity; every answer compared with brute force. Vectors
    are clustered (as embeddings are; uniform random vectors in hundreds of dimensions are all nearly
    equidistant, where no graph index finds neighbours), queries are near documents."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(docs // 100, 1), dims)).astype(np.float32)
    vectors = centers[rng.integers(0, len(centers), docs)] + 0.5 * rng.standard_normal((docs, dims)).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="twostage-bench-filter-"))
    try:
        index = DocumentIndex.create(work / "index", "random", dims, save_every_writes=10**9)
        start = time.perf_counter()
        for first in range(0, docs, 5000):
            part = range(first, min(first + 5000, docs))
            index.upsert([Document(f"d{i}", "", "", {"bucket": i % 100, "half": i % 2 == 0}) for i in part],
                         vectors[first:part.stop])
        build_s = time.perf_counter() - start
        report = {"docs": docs, "dims": dims, "k": k, "build_s": round(build_s, 1),
                  "unfiltered_graph_recall_at_k": _graph_recall(index, vectors, rng, queries, k)}
        for name, clause in (("1%", FilterClause("bucket", equals=7)), ("50%", FilterClause("half", equals=True))):
            filter_ = check_filter([clause])
            passing = np.asarray([i for i in range(docs) if filter_.matches({"bucket": i % 100, "half": i % 2 == 0})])
            unit = vectors[passing] / np.linalg.norm(vectors[passing], axis=1, keepdims=True)
            times, exact, found = [], 0, 0
            for _ in range(queries):
                query = vectors[rng.integers(0, docs)] + 0.5 * rng.standard_normal(dims).astype(np.float32)
                start = time.perf_counter()
                hits = index.search(query, k, filter_)
                times.append(1000 * (time.perf_counter() - start))
                got = [int(doc.id[1:]) for doc, _ in hits]
                truth = passing[np.argsort(-(unit @ query))[:k]].tolist()
                exact += got == truth
                found += len(set(got) & set(truth))
            report[name] = {"p50_ms": round(statistics.median(times), 3), "exact_answers": f"{exact}/{queries}",
                            "recall_at_k": round(found / (k * queries), 4), "passing_docs": len(passing),
                            "path": "exact" if len(passing) <= index.filter_exact_max_docs else "graph"}
        index.close()
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _graph_recall(index: DocumentIndex, vectors: np.ndarray, rng, queries: int, k: int) -> float:
    """The graph's own recall@k without a filter: the reference for the over-fetch path."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found = 0
    for _ in range(queries):
        query = vectors[rng.integers(0, len(vectors))] + 0.5 * rng.standard_normal(vectors.shape[1]).astype(np.float32)
        got = {int(doc.id[1:]) for doc, _ in index.search(query, k)}
        found += len(got & set(np.argsort(-(unit @ query))[:k].tolist()))
    return round(found / (k * queries), 4)


async def snapshot_switch(index_dir: Path, queries: list[str], k: int) -> dict:
    """Publishing a shard from a built part (the merge: stored vectors, no embedding), and a recall server
    switching to a newer snapshot while a client searches back to back: how long, and whether any failed."""
    from recall_server.build import merge_parts
    from recall_server.snapshots import SNAPSHOT_FILE, Snapshot, publish, read_snapshot, shard_root

    work = Path(tempfile.mkdtemp(prefix="twostage-bench-snapshots-"))
    try:
        part = work / "parts" / "part-0"
        await asyncio.to_thread(shutil.copytree, index_dir, part, ignore=shutil.ignore_patterns(".lock"))
        root = work / "snapshots"
        start = time.perf_counter()
        first = await asyncio.to_thread(merge_parts, [part], root, 0, 1, "v1")
        merge_s = time.perf_counter() - start
        documents = read_snapshot(first).documents
        service = RecallService(RecallSettings(port=0, index_dir=work / "data" / "index", snapshot_dir=root,
                                               snapshot_poll_s=0.05))
        await service.start()
        try:
            building = shard_root(root, 0) / ".building-v2"
            await asyncio.to_thread(shutil.copytree, first, building, ignore=shutil.ignore_patterns(SNAPSHOT_FILE))
            latencies, failures, switched = [], 0, asyncio.Event()

            async def search_throughout() -> None:
                nonlocal failures
                turn = 0
                while not switched.is_set() or turn < 20:
                    began = time.perf_counter()
                    try:
                        await service.answer(queries[turn % len(queries)], k)
                        latencies.append(1000 * (time.perf_counter() - began))
                    except Exception:  # noqa: BLE001 - any failure counts: the point is that none happens
                        failures += 1
                        await asyncio.sleep(0)  # a search failing at once must not keep the switch from running
                    turn += 1

            searching = asyncio.create_task(search_throughout())
            published_at = time.perf_counter()
            snapshot = Snapshot("v2", 0, 1, read_snapshot(first).model, documents, time.time())
            await asyncio.to_thread(publish, building, root, snapshot)
            while service.snapshots.current.version != "v2":
                await asyncio.sleep(0.005)  # polling the server's own state: it switches on its own
            switch_s = time.perf_counter() - published_at
            switched.set()
            await searching
        finally:
            await service.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"documents": documents, "merge_s": round(merge_s, 3), "merge_docs_per_s": round(documents / merge_s),
            "switch_after_publish_s": round(switch_s, 3), "poll_s": 0.05, "searches": len(latencies) + failures,
            "failed_searches": failures, "search_p50_ms": round(statistics.median(latencies), 2),
            "search_max_ms": round(max(latencies), 2)}


def run(args) -> dict:
    fetch_defaults(log=lambda message: None)
    dataset = args.dataset or default_dataset()
    index_dir = cached_index(dataset)
    queries = list(read_queries(dataset).values())[: 50 if args.quick else 300]
    print(f"recall modes on {dataset.name}: {len(queries)} queries each ...", flush=True)
    modes = asyncio.run(mode_latency(index_dir, queries, args.recall_k))
    docs = 20_000 if args.quick else 100_000
    print(f"filtered search on {docs:,} clustered random {args.dims}-d vectors ...", flush=True)
    filtered = filtered_search(docs, args.dims, 20 if args.quick else 100, 10)
    print("snapshots: merging a part, and switching while searching ...", flush=True)
    snapshots = asyncio.run(snapshot_switch(index_dir, queries, args.recall_k))
    report = {"machine": machine(), "dataset": dataset.name, "modes": modes, "filtered": filtered,
              "snapshots": snapshots}
    print("\nrecall p50 (embedding included): " + ", ".join(f"{m} {v} ms" for m, v in modes["p50_ms"].items())
          + f"; hybrid adds {modes['hybrid_added_p50_ms']} ms to dense (target <= 5); pseudo-relevance feedback "
          f"(depth {modes['prf']['depth']}, weight {modes['prf']['weight']}) adds {modes['prf_added_p50_ms']} ms to "
          f"hybrid, its own step {modes['prf_step_p50_ms']} ms (target <= 15)")
    print(f"graph recall@10 without a filter: {filtered['unfiltered_graph_recall_at_k']}")
    for name in ("1%", "50%"):
        row = filtered[name]
        print(f"filtered search, {name} of {docs:,} pass ({row['path']}): p50 {row['p50_ms']} ms, "
              f"{row['exact_answers']} equal to brute force, recall@10 {row['recall_at_k']}")
    print(f"snapshot of {snapshots['documents']:,} documents: merged from a part in {snapshots['merge_s']} s "
          f"({snapshots['merge_docs_per_s']} docs/s); served {snapshots['switch_after_publish_s']} s after publishing "
          f"(poll {snapshots['poll_s']} s), {snapshots['failed_searches']} of {snapshots['searches']} searches failed "
          f"during the switch (p50 {snapshots['search_p50_ms']} ms, max {snapshots['search_max_ms']} ms)")
    write_json(args.json, report)
    return report
