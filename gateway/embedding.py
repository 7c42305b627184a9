"""Embeddings of the caller's texts from the recall tier (Gateway.Embed).

Every recall replica serves the same model, so a request is cut into pieces of
the size a replica accepts (its published max_embed_texts) and the pieces go to
the shards in turn, one replica each: a large request is spread over the tier,
and a replica that is down hands over to the next of its shard.
"""

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from gateway.config import GatewaySettings
from gateway.pipeline import RequestBudget, StageLimits, resolve_budget
from gateway.recall_tier import RecallShard
from twostage import errors, tracing


@dataclass(frozen=True)
class EmbedTextsQuery:
    texts: list[str]
    is_query: bool = False
    model: str = ""
    dimensions: int = 0  # 0: all of them
    # True: scaled to unit length; False: as the model gives them (cut to ``dimensions`` if set); None: unit length
    # only after a cut (what a Matryoshka-style shortening means).
    normalize: bool | None = None
    budget_ms: int = 0
    request_id: str = ""
    deadline_s: float | None = None  # client deadline, time.monotonic() clock
    refuse_truncation: bool = False  # TooLong rather than cut a text to the model's window


@dataclass
class EmbedTextsResult:
    vectors: np.ndarray  # (texts, dims) float32
    model: str
    tokens: int
    request_id: str
    timings_ms: dict[str, float] = field(default_factory=dict)


class TextEmbedder:
    def __init__(self, settings: GatewaySettings, shards: list[RecallShard], limits: StageLimits):
        self.settings = settings
        self.shards = shards
        self.limits = limits
        self._turn = itertools.count()

    def resolve(self, q: EmbedTextsQuery) -> RequestBudget:
        """Validate as the recall tier would, before any replica sees it."""
        s = self.settings
        errors.check_limit("texts (count)", len(q.texts), 1, s.max_embed_texts)
        max_chars = self.limits.recall_max_doc_chars or 100_000
        for i, text in enumerate(q.texts):
            errors.check_text(f"texts[{i}]", text, max_chars)
        served = self.limits.embed_model
        if q.model and served and q.model != served:
            raise errors.InvalidArgument(f"unknown model {q.model!r}; the recall tier serves {served!r}")
        errors.check_limit("dimensions", q.dimensions, 0, self.limits.embed_dims or 2**31 - 1)
        return resolve_budget(s, q.budget_ms, q.request_id)

    async def embed(self, q: EmbedTextsQuery) -> EmbedTextsResult:
        with tracing.span("embed texts") as span:
            result = await self._embed(q)
            if span.is_recording():
                span.set_attributes({"twostage.request_id": result.request_id, "twostage.texts": len(q.texts),
                                     "twostage.is_query": q.is_query, "twostage.dims": int(result.vectors.shape[1]),
                                     "twostage.tokens": result.tokens,
                                     "twostage.total_ms": round(result.timings_ms["total_ms"], 2)})
            return result

    async def _embed(self, q: EmbedTextsQuery) -> EmbedTextsResult:
        budget_s, request_id = self.resolve(q)
        start = time.monotonic()
        deadline = start + budget_s if q.deadline_s is None else min(start + budget_s, q.deadline_s)
        size = self.limits.recall_max_embed_texts or 256
        pieces = [q.texts[i:i + size] for i in range(0, len(q.texts), size)]
        first = next(self._turn)

        refuse = {"refuse_truncation": True} if q.refuse_truncation else {}

        def on(shard: RecallShard, piece: list[str]):
            return shard.on_one_replica(
                lambda client, timeout: client.embed(piece, q.is_query, timeout, q.model, **refuse), deadline)

        try:
            replies = await asyncio.gather(*(on(self.shards[(first + i) % len(self.shards)], piece)
                                             for i, piece in enumerate(pieces)))
        except errors.DeadlineExceeded:
            raise errors.DeadlineExceeded(f"the texts were not embedded within {1000 * budget_s:.0f} ms; allow "
                                          "more budget_ms (or a longer deadline)") from None
        vectors = np.asarray([v for vectors, _ in replies for v in vectors], dtype=np.float32)
        if q.dimensions and q.dimensions > vectors.shape[1]:
            raise errors.InvalidArgument(f"dimensions must be at most {vectors.shape[1]}, got {q.dimensions}")
        cut = bool(q.dimensions) and q.dimensions < vectors.shape[1]
        if cut:
            vectors = vectors[:, :q.dimensions]
        if q.normalize or (q.normalize is None and cut):
            vectors = _unit(vectors)
        return EmbedTextsResult(vectors, self.limits.embed_model or "", sum(tokens for _, tokens in replies),
                                request_id, {"total_ms": 1000 * (time.monotonic() - start)})


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
