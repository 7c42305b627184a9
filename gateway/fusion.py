"""Combining recall and rerank scores into the final ranking.

- ``none``: the rerank score alone.
- ``linear``: per-query z-scores of both, ``alpha * rerank + (1 - alpha) * recall``.
  Scores are standardised within each query because a cosine and a logit live
  on different scales.
- ``rrf``: reciprocal rank fusion, ``1/(k + rerank_rank) + 1/(k + recall_rank)``.
- ``calibrated``: ``sigmoid(alpha * logit + (1 - alpha) * recall_logit)``, with
  ``recall_logit = scale * (cosine - center) + lexical_scale * (bm25 - lexical_center)``
  (the BM25 part only when recall ran lexically: hybrid or lexical mode):
  every score on the logit scale with constants instead of per-query
  statistics, then squashed to [0, 1]. Scores keep an absolute meaning: a query
  with no relevant document scores low, so a frontend can threshold and compare
  across queries. The per-query methods (``linear``, ``rrf``) cannot: they
  rescale every query to the same spread. The constants depend on the corpus
  (short product texts have far lower cosines and BM25 than scientific
  abstracts), so each recall server fits them from its own index
  (``recall_server.calibration``) and sends them with every answer; the gateway
  averages its shards' and lets its settings fix any of them. The defaults
  below (fitted for bge-small-en on SciFact) apply only until a shard has fitted.

Only reranked candidates are fused; the rest keep their recall order after them.
"""

import statistics
from dataclasses import dataclass
from typing import Literal

import numpy as np

Fusion = Literal["none", "linear", "rrf", "calibrated"]
FUSIONS: tuple[str, ...] = ("none", "linear", "rrf", "calibrated")
RRF_K = 60


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.clip(x, -60, 60)))


def relevance(logit: float) -> float:
    """The cross-encoder's calibrated relevance in [0, 1]."""
    return float(_sigmoid(logit))


RECALL_SCALE = 100.0
RECALL_CENTER = 0.72
LEXICAL_SCALE = 0.5
LEXICAL_CENTER = 13.0


@dataclass(frozen=True)
class Calibration:
    """Constants that put recall's scores on the cross-encoder's logit scale."""

    scale: float = RECALL_SCALE
    center: float = RECALL_CENTER
    lexical_scale: float = LEXICAL_SCALE
    lexical_center: float = LEXICAL_CENTER

    def recall_logits(self, cosines, bm25=None) -> np.ndarray:
        logits = self.scale * (np.asarray(cosines, dtype=np.float64) - self.center)
        if bm25 is not None:
            logits = logits + self.lexical_scale * (np.asarray(bm25, dtype=np.float64) - self.lexical_center)
        return logits


DEFAULT_CALIBRATION = Calibration()


def mean_calibration(calibrations: list[Calibration]) -> Calibration | None:
    """The shards' calibrations averaged (shards hold random parts of one corpus, so theirs agree closely)."""
    if not calibrations:
        return None
    if len(calibrations) == 1:  # one shard: its own, without numpy's cost on a handful of floats
        return calibrations[0]
    return Calibration(*(statistics.fmean(values) for values in zip(
        *((c.scale, c.center, c.lexical_scale, c.lexical_center) for c in calibrations))))


def recall_part(cosine: float, alpha: float, calibration: Calibration = DEFAULT_CALIBRATION,
                bm25: float | None = None) -> float:
    """The calibrated score of a candidate with no rerank evidence: its recall part alone."""
    return float(_sigmoid((1 - alpha) * calibration.recall_logits([cosine], None if bm25 is None else [bm25]))[0])


def _zscores(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def fuse(recall_scores: list[float], rerank_scores: list[float], method: Fusion, alpha: float,
         calibration: Calibration = DEFAULT_CALIBRATION, lexical_scores: list[float] | None = None) -> list[float]:
    """Final scores for the reranked candidates, given in recall order. For ``calibrated``, recall_scores are
    the cosines and lexical_scores the BM25 (None when recall did not run lexically)."""
    recall = np.asarray(recall_scores, dtype=np.float64)
    rerank = np.asarray(rerank_scores, dtype=np.float64)
    if method == "none" or len(rerank) == 0:
        return rerank.tolist()
    if method == "linear":
        return (alpha * _zscores(rerank) + (1 - alpha) * _zscores(recall)).tolist()
    if method == "calibrated":
        return _sigmoid(alpha * rerank + (1 - alpha) * calibration.recall_logits(recall, lexical_scores)).tolist()
    if method == "rrf":
        rerank_rank = np.empty(len(rerank))
        rerank_rank[np.argsort(-rerank, kind="stable")] = np.arange(1, len(rerank) + 1)
        recall_rank = np.arange(1, len(recall) + 1)  # candidates arrive in recall order
        return (1 / (RRF_K + rerank_rank) + 1 / (RRF_K + recall_rank)).tolist()
    raise ValueError(f"unknown fusion {method!r}")
