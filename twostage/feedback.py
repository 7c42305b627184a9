"""Pseudo-relevance feedback in the embedding space (Rocchio).

After a first search, the query's vector moves toward the stored vectors of
its top ``depth`` hits and the search runs again with it:

    refined = unit((1 - weight) * unit(query) + weight * mean(unit(hit_i)))

The top hits of a first pass are usually relevant, and their vectors carry
the corpus's own words for what the query asks, so the second pass finds
relevant documents the short query's vector missed.

A recall server runs it on its own index. A gateway over several shards runs
the same function on the global first pass (whose top hits may sit on any
shard) and sends the refined vector to every shard: with the same hits in the
same order both compute the same vector, bit for bit, so a sharded corpus
answers as one index would.
"""

from dataclasses import dataclass

import numpy as np

from twostage.errors import InvalidArgument
from twostage.recall_mode import RecallMode

MAX_DEPTH = 100


@dataclass(frozen=True)
class Feedback:
    depth: int  # top hits of the first pass; 0: no feedback
    weight: float  # share of their centroid in the refined vector; 0: no feedback

    @property
    def active(self) -> bool:
        return self.depth > 0 and self.weight > 0


OFF = Feedback(0, 0.0)
# What hybrid recall runs unless its settings or the request say otherwise (measured on SciFact: see the README).
DEFAULT = Feedback(5, 0.5)


def check(depth: int | None, weight: float | None, default: Feedback, k: tuple[str, int] | None = None) -> Feedback:
    """A request's feedback: each field given, else the default; INVALID_ARGUMENT names a bad field. ``k``: (the
    field's name, its value) for the candidates asked for, which a depth given must not exceed (feedback reads
    the first pass's top hits; a default depth above it reads them all)."""
    if depth is not None and not 0 <= depth <= MAX_DEPTH:
        raise InvalidArgument(f"prf_depth must be between 0 and {MAX_DEPTH}, got {depth}")
    if depth is not None and k is not None and depth > k[1]:
        raise InvalidArgument(f"prf_depth ({depth}) must not exceed {k[0]} ({k[1]}): feedback is formed from the "
                              "first pass's top hits")
    if weight is not None and not 0 <= weight <= 1:  # also refuses NaN
        raise InvalidArgument(f"prf_weight must be between 0 and 1, got {weight}")
    return Feedback(default.depth if depth is None else depth, default.weight if weight is None else float(weight))


def for_mode(prf: Feedback, mode: RecallMode | None, asked: bool) -> Feedback:
    """The feedback a search in ``mode`` gets: none in lexical mode (its order never reads the vector); in dense
    mode only when the request asks for it (``asked``): on SciFact feedback after a hybrid first pass lifted
    recall, after a dense one it did not."""
    if mode == RecallMode.LEXICAL or (mode == RecallMode.DENSE and not asked):
        return OFF
    return prf


def refine(query: np.ndarray, hits: np.ndarray, weight: float) -> np.ndarray:
    """The refined query vector (float32, unit length) from the query's vector and the top hits' stored vectors
    (one row each, best first). Pure: the same inputs give the same bits wherever it runs."""
    query = np.asarray(query, dtype=np.float32)
    hits = np.asarray(hits, dtype=np.float32).reshape(-1, query.shape[-1])
    if len(hits) == 0 or weight <= 0:
        return query
    # In float32 throughout: a weight read from a setting (float64) and the same weight sent in a request (a
    # proto float) must give the same bits.
    weight = np.float32(weight)
    centroid = (hits / np.maximum(np.linalg.norm(hits, axis=1, keepdims=True), np.float32(1e-12))).mean(axis=0)
    mixed = (np.float32(1) - weight) * _unit(query) + weight * centroid
    return _unit(mixed)


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.maximum(np.linalg.norm(vector), np.float32(1e-12))).astype(np.float32)
