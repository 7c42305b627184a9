"""Fusing a dense and a lexical candidate list into one recall order.

Both methods need each candidate's two scores, so recall computes the
missing one exactly (the cosine from the stored vector, BM25 for the given
ids). The same function fuses one shard's lists on the recall server and the
union of every shard's candidates at the gateway, so a sharded corpus ranks
as one index would.

- ``zscore``: each score standardised over the candidates (mean 0, standard
  deviation 1), then ``w * dense + (1 - w) * lexical``.
- ``rrf``: reciprocal rank fusion, ``w / (60 + dense rank) + (1 - w) / (60 +
  lexical rank)``; a document no query term occurs in gets no lexical part.
"""

from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

HybridFusion = Literal["zscore", "rrf"]
RRF_K = 60


def fuse(keys: Sequence[Hashable], dense: Sequence[float], lexical: Sequence[float], method: HybridFusion,
         dense_weight: float) -> list[tuple[Hashable, float]]:
    """(key, fused score), best first."""
    if not keys:
        return []
    d, lex = np.asarray(dense, dtype=np.float64), np.asarray(lexical, dtype=np.float64)
    if method == "zscore":
        fused = dense_weight * _standardised(d) + (1 - dense_weight) * _standardised(lex)
    elif method == "rrf":
        fused = dense_weight / (RRF_K + _ranks(d)) + np.where(lex > 0, (1 - dense_weight) / (RRF_K + _ranks(lex)), 0.0)
    else:
        raise ValueError(f"unknown hybrid fusion {method!r}")
    order = sorted(range(len(keys)), key=lambda i: (-fused[i], -d[i]))
    return [(keys[i], float(fused[i])) for i in order]


def _standardised(scores: np.ndarray) -> np.ndarray:
    spread = scores.std()
    return (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 for the best score."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks
