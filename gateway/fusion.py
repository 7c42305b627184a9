"""Combining recall and rerank scores into the final ranking.

- ``none``: the rerank score alone.
- ``linear``: per-query z-scores of both, ``alpha * rerank + (1 - alpha) * recall``.
  Scores are standardised within each query because a cosine and a logit live
  on different scales.
- ``rrf``: reciprocal rank fusion, ``1/(k + rerank_rank) + 1/(k + recall_rank)``.

Only reranked candidates are fused; the rest keep their recall order after them.
"""

from typing import Literal

import numpy as np

Fusion = Literal["none", "linear", "rrf"]
RRF_K = 60


def _zscores(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def fuse(recall_scores: list[float], rerank_scores: list[float], method: Fusion, alpha: float) -> list[float]:
    """Final scores for the reranked candidates, given in recall order."""
    recall = np.asarray(recall_scores, dtype=np.float64)
    rerank = np.asarray(rerank_scores, dtype=np.float64)
    if method == "none" or len(rerank) == 0:
        return rerank.tolist()
    if method == "linear":
        return (alpha * _zscores(rerank) + (1 - alpha) * _zscores(recall)).tolist()
    if method == "rrf":
        rerank_rank = np.empty(len(rerank))
        rerank_rank[np.argsort(-rerank, kind="stable")] = np.arange(1, len(rerank) + 1)
        recall_rank = np.arange(1, len(recall) + 1)  # candidates arrive in recall order
        return (1 / (RRF_K + rerank_rank) + 1 / (RRF_K + recall_rank)).tolist()
    raise ValueError(f"unknown fusion {method!r}")
