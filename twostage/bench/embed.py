"""``twostage bench embed``: index-build throughput against the raw embedding ceiling."""

import json
import shutil
import tempfile
import time
from pathlib import Path

from recall_server.build import DEFAULT_BUILD_POLICY, build_index, embed_documents
from recall_server.config import RecallSettings
from recall_server.embedder import Embedder
from twostage.bench.ceiling import best_rate
from twostage.bench.report import machine, print_table, write_json
from twostage.bench.workload import default_dataset, documents
from twostage.corpus import document_text
from twostage.model_store import resolve_model


def measure_ceiling(embedder: Embedder, texts: list[str], batch_sizes: list[int]) -> dict:
    """Best docs/s of raw onnxruntime over batch sizes, documents length-sorted globally."""
    encoded = embedder.encode(texts, is_query=False)
    return best_rate(encoded, [e.length for e in encoded], embedder.embed, batch_sizes)


def run(args) -> dict:
    settings = RecallSettings()
    count = 48 if args.quick else args.docs
    dataset = args.dataset or default_dataset()
    docs = documents(dataset, count)
    embedder = Embedder(resolve_model(settings.model), settings, settings.max_length)
    sizes = [16, 32] if args.quick else [8, 16, 32, 64]
    print(f"ceiling: raw onnxruntime over batch sizes {sizes} on {len(docs)} documents ...", flush=True)
    ceiling = measure_ceiling(embedder, [document_text(d) for d in docs], sizes)

    policy = DEFAULT_BUILD_POLICY  # what `twostage index build` uses
    work = Path(tempfile.mkdtemp())
    try:
        corpus = work / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
        print("index build: tokenize, embed, store, index ...", flush=True)
        start = time.perf_counter()
        build_index(corpus, work / "index", embedder, policy, RecallSettings().document_limits(), progress=False)
        build_rate = len(docs) / (time.perf_counter() - start)
        start = time.perf_counter()
        embed_documents(embedder, docs, policy)
        embed_rate = len(docs) / (time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "unit": "docs/s",
        "model": settings.model,
        "max_length": settings.max_length,
        "batch_invariant": settings.batch_invariant,
        "docs": len(docs),
        "machine": machine(),
        "ceiling": round(ceiling["rate"], 2),
        "ceiling_by_batch_size": {k: round(v, 2) for k, v in ceiling["by_batch_size"].items()},
        "server": round(build_rate, 2),
        "ratio": round(build_rate / ceiling["rate"], 3),
        "embed_only": round(embed_rate, 2),
        "peers": {},
    }
    print_table(
        f"embed: {settings.model}, max_length {settings.max_length}, {len(docs)} documents, {machine()['cpus']} CPUs",
        "docs/s",
        ceiling["rate"],
        {"twostage index build (embed + store + HNSW)": build_rate, "twostage embed_documents": embed_rate},
    )
    write_json(args.json, report)
    return report
