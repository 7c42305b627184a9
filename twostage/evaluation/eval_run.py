"""``twostage eval``: quality and latency of recall, rerank and the final
ranking on a BEIR data set, through a running gateway."""

import asyncio
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from twostage.connect import PLAINTEXT, Credentials
from twostage.convert import FUSIONS, calibration_from_proto, fusion_from_proto, recall_mode_to_proto
from twostage.corpus import read_qrels, read_queries
from twostage.evaluation.loadtest import degradation_codes
from twostage.evaluation.metrics import evaluate
from twostage.recall_mode import RecallMode
from twostage.scoring import DEFAULT_CALIBRATION, Fusion, fuse_final
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, recall_pb2, recall_pb2_grpc

# Bins of recall positions for the promotion-depth histogram.
DEPTH_BINS = [1, 11, 21, 51, 101, 201, 501, 1001]


@dataclass
class Answer:
    query_id: str
    hits: list[dict]  # id, recall_rank, recall_score, rerank_score (or None), score
    latency_s: float
    degradations: list[str]  # codes: rerank_partial, ...
    prf_ms: float | None = None  # the gateway's second recall round or the shard's second pass, when feedback ran


async def ask_gateway(target: str, queries: dict[str, str], recall_k: int, budget_ms: int, progress=True,
                      credentials: Credentials = PLAINTEXT, recall_mode: RecallMode | None = None,
                      skip_rerank: bool = False, prf_depth: int | None = None,
                      prf_weight: float | None = None) -> list[Answer]:
    """One query at a time (latency without queueing), the whole candidate list returned. ``prf_depth`` and
    ``prf_weight``: pseudo-relevance feedback per request (None: the recall servers' settings)."""
    answers = []
    mode = recall_mode_to_proto(recall_mode)
    label = f"recall_k={recall_k}" + (f" {recall_mode}" if recall_mode else "") + "".join(
        f" {name}={value:g}" for name, value in (("prf_depth", prf_depth), ("prf_weight", prf_weight))
        if value is not None)
    feedback = {name: value for name, value in (("prf_depth", prf_depth), ("prf_weight", prf_weight))
                if value is not None}
    async with credentials.aio_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for query_id, text in tqdm(queries.items(), desc=label, disable=not progress, unit="q"):
            start = time.perf_counter()
            reply = await stub.Search(
                gateway_pb2.SearchRequest(query=text, top_k=recall_k, recall_k=recall_k, budget_ms=budget_ms,
                                          recall_mode=mode, skip_rerank=skip_rerank, **feedback),
                metadata=credentials.metadata,
            )
            hits = [
                {"id": h.id, "recall_rank": h.recall_rank, "recall_score": h.recall_score, "score": h.score,
                 "rerank_score": h.rerank_score if h.HasField("rerank_score") else None,
                 "dense_score": h.dense_score, "lexical_score": h.lexical_score}
                for h in reply.hits
            ]
            answers.append(Answer(query_id, hits, time.perf_counter() - start, degradation_codes(reply),
                                  reply.timings_ms.get("prf_ms")))
    return answers


async def recall_positions(target: str, queries: dict[str, str], qrels, depth: int,
                           credentials: Credentials = PLAINTEXT,
                           recall_mode: RecallMode | None = None) -> dict[str, dict[str, int | None]]:
    """Where recall alone ranks each relevant document (None: beyond ``depth``)."""
    positions = {}
    async with credentials.aio_channel(target) as channel:
        stub = recall_pb2_grpc.RecallStub(channel)
        for query_id, text in queries.items():
            request = recall_pb2.RecallSearchRequest(query=text, k=depth, mode=recall_mode_to_proto(recall_mode))
            reply = await stub.Search(request, metadata=credentials.metadata)
            rank = {c.id: i + 1 for i, c in enumerate(reply.candidates)}
            relevant = [d for d, g in qrels.get(query_id, {}).items() if g > 0]
            positions[query_id] = {d: rank.get(d) for d in relevant}
    return positions


def rankings(answers: list[Answer], fusion: Fusion | None = None, alpha: float = 0.7,
             calibration=None) -> dict[str, dict[str, list[str]]]:
    """The recall, rerank and final orderings of each answer (final recomputed when ``fusion`` is given).

    ``calibrated`` fuses the cosine and BM25 of each hit with ``calibration`` (a ``twostage.scoring.Calibration``;
    None: the built-in constants), as the gateway does for hybrid recall."""
    out = {"recall": {}, "rerank": {}, "final": {}}
    for a in answers:
        by_recall = sorted(a.hits, key=lambda h: h["recall_rank"])
        reranked = [h for h in by_recall if h["rerank_score"] is not None]
        rest = [h["id"] for h in by_recall if h["rerank_score"] is None]
        out["recall"][a.query_id] = [h["id"] for h in by_recall]
        out["rerank"][a.query_id] = [h["id"] for h in sorted(reranked, key=lambda h: -h["rerank_score"])] + rest
        if fusion is None:
            out["final"][a.query_id] = [h["id"] for h in a.hits]
        else:
            if fusion == Fusion.CALIBRATED:
                fused = fuse_final([h["dense_score"] for h in reranked], [h["rerank_score"] for h in reranked],
                                   fusion, alpha, calibration or DEFAULT_CALIBRATION,
                                   [h["lexical_score"] for h in reranked])
            else:
                fused = fuse_final([h["recall_score"] for h in reranked], [h["rerank_score"] for h in reranked],
                                   fusion, alpha)
            order = [h["id"] for _, h in sorted(zip(fused, reranked), key=lambda pair: -pair[0])]
            out["final"][a.query_id] = order + rest
    return out


def promotion_histogram(answers: list[Answer], top_k: int = 10) -> dict[str, int]:
    """How deep in the recall list the final top-k came from."""
    bins = list(itertools.pairwise(DEPTH_BINS))
    counts = dict.fromkeys([f"{lo}-{hi - 1}" for lo, hi in bins], 0)
    for a in answers:
        for hit in a.hits[:top_k]:
            for (lo, hi), name in zip(bins, counts):
                if lo <= hit["recall_rank"] < hi:
                    counts[name] += 1
    return counts


def recall_k_advice(positions: dict[str, dict[str, int | None]], recall_k: int, depth: int,
                    not_indexed: set[str] = frozenset()) -> tuple[float, str]:
    """Share of indexed relevant documents recall ranks beyond recall_k, and what that means in words.

    Relevant documents absent from the index are no fault of recall_k: they are counted apart."""
    ranks = [r for per_query in positions.values() for d, r in per_query.items() if d not in not_indexed]
    absent = f" {len(not_indexed)} judged relevant documents are not in the index at all." if not_indexed else ""
    if not ranks:
        return 0.0, "no judged documents in the index to judge recall_k by." + absent
    beyond = sum(r is None or r > recall_k for r in ranks) / len(ranks)
    if beyond <= 0.02:
        return beyond, (f"recall_k={recall_k} looks large enough: {beyond:.1%} of relevant documents in the index "
                        f"rank below it.{absent}")
    ordered = sorted(r if r is not None else depth + 1 for r in ranks)
    needed = ordered[min(len(ordered) - 1, math.ceil(0.98 * len(ordered)) - 1)]
    cover = (f"recall_k={needed} would cover 98% (at more rerank cost)." if needed <= depth
             else f"even recall_k={depth} covers less than 98%.")
    return beyond, (
        f"recall_k={recall_k} looks too small: {beyond:.1%} of relevant documents in the index rank below it in "
        f"recall, where no reranker can reach them. {cover}{absent}"
    )


async def not_in_index(gateway_target: str, doc_ids: set[str], batch: int = 500,
                       credentials: Credentials = PLAINTEXT) -> set[str]:
    """The ids the stack does not store (asked through the gateway, which covers every shard)."""
    missing: set[str] = set()
    ids = sorted(doc_ids)
    async with credentials.aio_channel(gateway_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for start in range(0, len(ids), batch):
            reply = await stub.Get(common_pb2.GetRequest(ids=ids[start:start + batch]), metadata=credentials.metadata)
            missing.update(reply.missing)
    return missing


def summarise(answers: list[Answer], qrels, recall_k: int) -> dict:
    latencies = np.array([a.latency_s for a in answers]) * 1000
    degraded: dict[str, int] = {}
    for a in answers:
        for code in a.degradations:
            degraded[code] = degraded.get(code, 0) + 1
    cutoffs = sorted({10, 20, 100, recall_k})
    prf_ms = [a.prf_ms for a in answers if a.prf_ms is not None]
    return {
        **{name: evaluate(ranking, qrels, cutoffs) for name, ranking in rankings(answers).items()},
        "latency_ms": {"mean": round(float(latencies.mean()), 2), "p95": round(float(np.percentile(latencies, 95)), 2)},
        # Pseudo-relevance feedback: the answers it ran for, and what it took (p50), as the gateway reports it.
        "prf": {"answers": len(prf_ms), "p50_ms": round(float(np.median(prf_ms)), 2) if prf_ms else None},
        "degraded": degraded,
        "queries": len(answers),
        # Pairs the cross-encoder scored per query (rounds and budgets make it less than recall_k).
        "mean_reranked": round(sum(h["rerank_score"] is not None for a in answers for h in a.hits) / len(answers), 3),
    }


def _advice(target: str, recall_target: str, queries: dict[str, str], qrels, recall_k: int,
            credentials: Credentials, recall_mode: RecallMode | None, absent: set[str] | None = None) -> dict:
    depth = max(1000, recall_k)
    positions = asyncio.run(recall_positions(recall_target, queries, qrels, depth, credentials, recall_mode))
    if absent is None:
        relevant = {d for per_query in positions.values() for d in per_query}
        absent = asyncio.run(not_in_index(target, relevant, credentials=credentials))
    beyond, advice = recall_k_advice(positions, recall_k, depth, absent)
    return {"relevant_not_indexed": len(absent), "beyond_recall_k": beyond, "advice": advice, "absent": absent}


async def gateway_fusion(target: str, credentials: Credentials = PLAINTEXT):
    """The gateway's default fusion method and alpha, and the calibration its calibrated fusion uses.

    ValueError when the gateway names no method this client knows: recomputing the final order needs one, and
    without it every alpha would silently give the gateway's own order."""
    async with credentials.aio_channel(target) as channel:
        info = await gateway_pb2_grpc.GatewayStub(channel).Info(common_pb2.InfoRequest(),
                                                                metadata=credentials.metadata)
    fusion = fusion_from_proto(info.default_fusion)
    if fusion is None:
        code = info.default_fusion
        reported = (gateway_pb2.FusionMethod.Name(code) if code in gateway_pb2.FusionMethod.values()
                    else f"unknown value {code}")
        raise ValueError(f"the gateway at {target} reports default_fusion {reported}; the final order can only be "
                         f"recomputed for one of {', '.join(FUSIONS)}")
    return fusion, info.default_fusion_alpha, calibration_from_proto(info.calibration)


def calibration_comparison(answers: list[Answer], qrels, alpha: float, in_use) -> dict:
    """Final nDCG@10 of the same answers with the constants the gateway used (the recall servers' fit, with
    any overrides) and with the built-in ones (fitted by hand on SciFact): fitting from the index is judged
    against them on identical candidates and rerank scores."""
    def ndcg(calibration) -> float:
        return evaluate(rankings(answers, Fusion.CALIBRATED, alpha, calibration)["final"], qrels, [10])["ndcg@10"]

    return {"in_use": {**in_use.__dict__, "final_ndcg@10": ndcg(in_use)},
            "built_in": {**DEFAULT_CALIBRATION.__dict__, "final_ndcg@10": ndcg(DEFAULT_CALIBRATION)}}


def load(dataset: Path, split: str, limit: int | None) -> tuple[dict[str, str], dict]:
    qrels = read_qrels(dataset, split)
    queries = {q: t for q, t in read_queries(dataset).items() if q in qrels}
    if limit:
        queries = dict(list(queries.items())[:limit])
    return queries, qrels


def write_report(path: Path | None, report: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def run(target: str, recall_target: str | None, dataset: Path, split: str, recall_k: int, budget_ms: int,
        limit: int | None, sweep_recall_k: list[int], sweep_alpha: list[float], fusion: Fusion,
        progress: bool = True, credentials: Credentials = PLAINTEXT, recall_mode: RecallMode | None = None,
        stages: str = "all", sweep_recall_mode: list[RecallMode] = (), sweep_prf: dict[str, list] | None = None) -> dict:
    """``stages="recall"`` evaluates recall alone (no reranking; rerank and final then equal recall)."""
    queries, qrels = load(dataset, split, limit)
    skip_rerank = stages == "recall"
    answers = asyncio.run(ask_gateway(target, queries, recall_k, budget_ms, progress, credentials, recall_mode,
                                      skip_rerank))
    report = summarise(answers, qrels, recall_k)
    report["recall_k"] = recall_k
    report["recall_mode"] = recall_mode or "server default"
    report["stages"] = stages
    report["promotion_depth"] = promotion_histogram(answers)
    absent: set[str] = set()
    if recall_target:
        advice = _advice(target, recall_target, queries, qrels, recall_k, credentials, recall_mode)
        absent = advice.pop("absent")
        report.update(advice)
    default_fusion, default_alpha, in_use = asyncio.run(gateway_fusion(target, credentials))
    if not skip_rerank and default_fusion == Fusion.CALIBRATED:
        report["calibration"] = calibration_comparison(answers, qrels, default_alpha, in_use)
    if sweep_recall_mode:
        report["sweep_recall_mode"] = {}
        for mode in sweep_recall_mode:
            swept = asyncio.run(ask_gateway(target, queries, recall_k, budget_ms, progress, credentials, mode,
                                            skip_rerank))
            summary = summarise(swept, qrels, recall_k)
            row = {**{c: summary["recall"][c] for c in ("ndcg@10", "recall@10", "recall@20", "recall@100")
                      if c in summary["recall"]},
                   "final_ndcg@10": summary["final"]["ndcg@10"], "mean_latency_ms": summary["latency_ms"]["mean"]}
            if recall_target:
                mode_advice = _advice(target, recall_target, queries, qrels, recall_k, credentials, mode, absent)
                row["beyond_recall_k"], row["advice"] = mode_advice["beyond_recall_k"], mode_advice["advice"]
            report["sweep_recall_mode"][mode] = row
    for name, values in (sweep_prf or {}).items():
        report[f"sweep_{name}"] = {}
        for value in values:
            swept = asyncio.run(ask_gateway(target, queries, recall_k, budget_ms, progress, credentials, recall_mode,
                                            skip_rerank, **{name: value}))
            summary = summarise(swept, qrels, recall_k)
            report[f"sweep_{name}"][f"{value:g}"] = {
                "ndcg@10": summary["recall"]["ndcg@10"], f"recall@{recall_k}": summary["recall"][f"recall@{recall_k}"],
                "final_ndcg@10": summary["final"]["ndcg@10"], "mean_latency_ms": summary["latency_ms"]["mean"],
                "prf_p50_ms": summary["prf"]["p50_ms"]}
    if sweep_alpha:
        report["sweep_alpha"] = {
            str(alpha): evaluate(rankings(answers, fusion, alpha, in_use)["final"], qrels, [10])["ndcg@10"]
            for alpha in sweep_alpha
        }
    if sweep_recall_k:
        report["sweep_recall_k"] = {}
        for k in sweep_recall_k:
            swept = asyncio.run(ask_gateway(target, queries, k, budget_ms, progress, credentials))
            summary = summarise(swept, qrels, k)
            report["sweep_recall_k"][str(k)] = {
                "final_ndcg@10": summary["final"]["ndcg@10"],
                "recall@k": summary["recall"][f"recall@{k}"],
                "mean_latency_ms": summary["latency_ms"]["mean"],
                "degraded": sum(summary["degraded"].values()),
            }
    return report


async def serve_and_measure(dataset: Path, port: int, measure, index_dir: Path | None = None,
                            settings_file: Path | None = None, skip_invalid: bool = False) -> dict:
    """Build (once, cached, or at ``index_dir``; ``skip_invalid``: around the corpus's invalid documents) an
    index of the data set, serve it as a local stack from ``port`` on (with ``settings_file``'s settings), and
    return ``measure(gateway_target, recall_target)``."""
    from recall_server.build import cached_index
    from twostage.model_store import fetch_defaults
    from twostage.stack import Stack

    fetch_defaults()
    index_dir = await asyncio.to_thread(cached_index, dataset, index_dir, skip_invalid)
    stack = Stack("127.0.0.1", port, str(index_dir), settings_file=str(settings_file) if settings_file else None)
    async with stack.running(300):
        return await asyncio.to_thread(measure, stack.gateway_target, stack.recall_targets[0])


def sweep_max_length(dataset: Path, split: str, limit: int | None, recall_k: int, budget_ms: int,
                     recall_mode: RecallMode | None, port: int, lengths: list[int], skip_invalid: bool = False) -> dict:
    """Quality and rerank throughput per truncation length, each on a fresh local stack."""
    import os

    queries, qrels = load(dataset, split, limit)
    rows = {}
    before = os.environ.get("TWOSTAGE_RERANK_MAX_LENGTH")
    try:
        for length in lengths:
            os.environ["TWOSTAGE_RERANK_MAX_LENGTH"] = str(length)  # the rerank server reads its settings here

            def measure(target: str, recall_target: str | None) -> dict:
                answers = asyncio.run(ask_gateway(target, queries, recall_k, budget_ms, recall_mode=recall_mode))
                summary = summarise(answers, qrels, recall_k)
                seconds = sum(a.latency_s for a in answers)
                return {"final_ndcg@10": summary["final"]["ndcg@10"], "rerank_ndcg@10": summary["rerank"]["ndcg@10"],
                        "pairs_per_s": round(summary["mean_reranked"] * len(answers) / seconds, 2),
                        "mean_latency_ms": summary["latency_ms"]["mean"]}

            rows[str(length)] = asyncio.run(serve_and_measure(dataset, port, measure, skip_invalid=skip_invalid))
    finally:
        if before is None:
            os.environ.pop("TWOSTAGE_RERANK_MAX_LENGTH", None)
        else:
            os.environ["TWOSTAGE_RERANK_MAX_LENGTH"] = before
    return rows
