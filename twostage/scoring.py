"""Every transformation a search's scores go through, from recall's lists to the final order.

Every function here is pure: it reads its arguments and returns new values, nothing else. The recall servers
and the gateway call the same functions, so a corpus split over shards ranks as one index would: each shard
fuses its own lists with ``fuse_recall``, and the gateway fuses the union of their candidates with it again.

Recall fusion (hybrid mode), ``fuse_recall``: a dense and a lexical list into one recall order. Both methods
need each candidate's two scores, so recall computes the missing one exactly (the cosine from the stored
vector, BM25 for the given ids). The fused score only orders one query's candidates.

- ``zscore``: each score standardised over the candidates (mean 0, standard deviation 1), then
  ``w * dense + (1 - w) * lexical``.
- ``rrf``: reciprocal rank fusion, ``w / (RRF_K + dense rank) + (1 - w) / (RRF_K + lexical rank)``; a document
  no query term occurs in gets no lexical part.

Final fusion, ``fuse_final``: recall and rerank scores of the reranked candidates into the final score.

- ``none``: the rerank score (the cross-encoder's logit) alone.
- ``linear``: per-query standardised scores of both, ``alpha * rerank + (1 - alpha) * recall``. Scores are
  standardised within each query because a cosine and a logit live on different scales.
- ``rrf``: reciprocal rank fusion, ``1 / (RRF_K + rerank rank) + 1 / (RRF_K + recall rank)``.
- ``calibrated``: ``sigmoid(alpha * logit + (1 - alpha) * recall_logit)``, with
  ``recall_logit = scale * (cosine - center) + lexical_scale * (bm25 - lexical_center)`` (the BM25 part only
  when recall ran lexically: hybrid or lexical mode): every score on the logit scale with constants
  (``Calibration``) instead of per-query statistics, then squashed to [0, 1]. Scores keep an absolute meaning: a
  query with no relevant document scores low, so a frontend can threshold and compare across queries. The
  per-query methods (``linear``, ``rrf``) cannot: they rescale every query to the same spread. The constants
  depend on the corpus (short product texts have far lower cosines and BM25 than scientific abstracts), so each
  recall server fits them from its own index (``recall_server.calibration``) and sends them with every answer;
  the gateway averages its shards' (``mean_calibration``) and lets its settings fix any of them. The defaults
  below (fitted for bge-small-en on SciFact) apply only until a shard has fitted.

The final order, ``rank_final``: the reranked candidates by final score, then the rest in recall order, each
scored by what the fusion gives a candidate with no rerank evidence (calibrated: its recall part alone,
``recall_part``; the relative fusions: the recall score), capped so that scores never rise with rank.

``relevance``: the cross-encoder's logit as a probability in [0, 1], whatever the fusion.
"""

import enum
import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class HybridFusion(enum.StrEnum):
    """How recall's hybrid mode fuses the dense and the lexical list."""

    ZSCORE = "zscore"
    RRF = "rrf"


class Fusion(enum.StrEnum):
    """How the final score combines recall and rerank."""

    NONE = "none"
    LINEAR = "linear"
    RRF = "rrf"
    CALIBRATED = "calibrated"


RRF_K = 60  # reciprocal rank fusion's damping constant, in recall's fusion and the final one alike
HYBRID_DENSE_WEIGHT = 0.7  # recall's default weight of the dense list


def standardised(scores: np.ndarray) -> np.ndarray:
    """Mean 0, standard deviation 1 over the given scores; all zeros when they do not spread."""
    spread = scores.std()
    return (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 for the best score; ties in the given order."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.clip(x, -60, 60)))


def fuse_recall(keys: Sequence[Hashable], dense: Sequence[float], lexical: Sequence[float], method: HybridFusion,
                dense_weight: float) -> list[tuple[Hashable, float]]:
    """(key, fused score), best first; ties go to the higher cosine."""
    if not keys:
        return []
    d, lex = np.asarray(dense, dtype=np.float64), np.asarray(lexical, dtype=np.float64)
    if method == HybridFusion.ZSCORE:
        fused = dense_weight * standardised(d) + (1 - dense_weight) * standardised(lex)
    elif method == HybridFusion.RRF:
        fused = dense_weight / (RRF_K + _ranks(d)) + np.where(lex > 0, (1 - dense_weight) / (RRF_K + _ranks(lex)), 0.0)
    else:
        raise ValueError(f"unknown hybrid fusion {method!r}")
    order = sorted(range(len(keys)), key=lambda i: (-fused[i], -d[i]))
    return [(keys[i], float(fused[i])) for i in order]


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


def fuse_final(recall_scores: list[float], rerank_scores: list[float], method: Fusion, alpha: float,
               calibration: Calibration = DEFAULT_CALIBRATION, lexical_scores: list[float] | None = None) -> list[float]:
    """Final scores for the reranked candidates, given in recall order. For ``calibrated``, recall_scores are
    the cosines and lexical_scores the BM25 (None when recall did not run lexically)."""
    recall = np.asarray(recall_scores, dtype=np.float64)
    rerank = np.asarray(rerank_scores, dtype=np.float64)
    if method == Fusion.NONE or len(rerank) == 0:
        return rerank.tolist()
    if method == Fusion.LINEAR:
        return (alpha * standardised(rerank) + (1 - alpha) * standardised(recall)).tolist()
    if method == Fusion.RRF:
        recall_rank = np.arange(1, len(recall) + 1)  # candidates arrive in recall order
        return (1 / (RRF_K + _ranks(rerank)) + 1 / (RRF_K + recall_rank)).tolist()
    if method == Fusion.CALIBRATED:
        return _sigmoid(alpha * rerank + (1 - alpha) * calibration.recall_logits(recall, lexical_scores)).tolist()
    raise ValueError(f"unknown fusion {method!r}")


class RecallScored(Protocol):
    """What the final order reads of a recall candidate."""

    @property
    def score(self) -> float: ...  # the recall order's own score (cosine, BM25 or fused, by mode)

    @property
    def dense_score(self) -> float: ...

    @property
    def lexical_score(self) -> float: ...


def rank_final(candidates: Sequence[RecallScored], rerank_scores: Mapping[int, float], fusion: Fusion,
               alpha: float, calibration: Calibration = DEFAULT_CALIBRATION,
               lexical: bool = False) -> list[tuple[int, float]]:
    """(position in recall order, final score), best first: the reranked candidates (``rerank_scores`` by
    position) by fused score, then the rest in recall order; scores never rise with rank, and every candidate
    not reranked scores strictly below every reranked one. ``lexical``: recall ran lexically, so calibrated
    fusion counts BM25 too."""
    calibrated = fusion == Fusion.CALIBRATED
    positions = sorted(rerank_scores)
    # Calibrated fusion reads the cosine (fixed constants); the relative ones the recall order's own score.
    recall_scores = [candidates[i].dense_score if calibrated else candidates[i].score for i in positions]
    bm25 = [candidates[i].lexical_score for i in positions] if lexical else None
    fused = fuse_final(recall_scores, [rerank_scores[i] for i in positions], fusion, alpha, calibration, bm25)
    reranked = sorted(zip(positions, fused), key=lambda pair: -pair[1])
    # Not reranked: what the fusion gives a candidate with no rerank evidence (calibrated: its recall part
    # alone; the relative fusions: the recall score), never above a reranked hit, so order and score agree.
    rest = []
    ceiling = reranked[-1][1] if reranked else math.inf
    for i, c in enumerate(candidates):
        if i in rerank_scores:
            continue
        natural = (recall_part(c.dense_score, alpha, calibration, c.lexical_score if lexical else None)
                   if calibrated else c.score)
        score = min(natural, ceiling)
        if reranked and score >= ceiling:
            score = math.nextafter(ceiling, -math.inf)
        ceiling = score
        rest.append((i, score))
    return reranked + rest
