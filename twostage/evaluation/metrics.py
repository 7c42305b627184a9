"""Ranking metrics with graded relevance, as trec_eval defines them.

- nDCG@k: gain ``rel`` (linear, as trec_eval's ndcg_cut), discount log2(rank + 1),
  normalised by the ideal ordering of all judged documents.
- MRR@k: 1 / rank of the first document with relevance > 0 within k.
- Recall@k: relevant documents (relevance > 0) retrieved within k / all relevant.

Queries without any relevant judgement are skipped, as BEIR does.
"""

import math


def ndcg_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    dcg = sum(judged.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranking[:k]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def mrr_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    for rank, doc in enumerate(ranking[:k]):
        if judged.get(doc, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def recall_at(ranking: list[str], judged: dict[str, int], k: int) -> float:
    relevant = {doc for doc, grade in judged.items() if grade > 0}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


def evaluate(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]], cutoffs: list[int]) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@k (for each cutoff) over judged queries."""
    queries = [q for q in rankings if any(g > 0 for g in qrels.get(q, {}).values())]
    if not queries:
        return {}
    totals = {"ndcg@10": 0.0, "mrr@10": 0.0, **{f"recall@{k}": 0.0 for k in cutoffs}}
    for q in queries:
        totals["ndcg@10"] += ndcg_at(rankings[q], qrels[q], 10)
        totals["mrr@10"] += mrr_at(rankings[q], qrels[q], 10)
        for k in cutoffs:
            totals[f"recall@{k}"] += recall_at(rankings[q], qrels[q], k)
    return {name: round(value / len(queries), 4) for name, value in totals.items()}
