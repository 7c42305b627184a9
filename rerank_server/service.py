"""The rerank service logic: validate, tokenize off the event loop, batch, sort."""

import asyncio
import time
from dataclasses import dataclass, field

from rerank_server.config import RerankSettings
from rerank_server.cross_encoder import CrossEncoder
from twostage import errors
from twostage.batching import BatchPolicy, DynamicBatcher
from twostage.metrics import watch_batcher
from twostage.model_store import resolve_model
from twostage.runtime import choose_providers


@dataclass(frozen=True)
class RerankQuery:
    query: str
    documents: list[str]
    top_n: int = 0
    model: str = ""
    deadline_s: float | None = None


@dataclass(frozen=True)
class RerankOutcome:
    ranked: list[tuple[int, float]]  # (document index, score), best first
    tokens: int
    queue_items: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    query_truncated: bool = False


class RerankService:
    def __init__(self, settings: RerankSettings, model: CrossEncoder | None = None):
        self.settings = settings
        self.model = model
        self.batcher: DynamicBatcher | None = None

    async def start(self) -> None:
        if self.model is None:
            self.model = await asyncio.to_thread(
                CrossEncoder, resolve_model(self.settings.model), self.settings, self.settings.max_length
            )
        self.batcher = DynamicBatcher("rerank", self.model.score, BatchPolicy.from_settings(self.settings))
        watch_batcher(self.batcher)
        self.batcher.start()
        # Warm up: the first run allocates and optimizes; keep that off the first request.
        await self.rerank(RerankQuery("warm up", ["a short document", "another, slightly longer document"]))

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close(drain=True)

    def validate(self, request: RerankQuery) -> None:
        s = self.settings
        errors.check_text("query", request.query, s.max_query_chars)
        errors.check_limit("documents (count)", len(request.documents), 1, s.max_documents)
        for i, doc in enumerate(request.documents):
            if len(doc) > s.max_document_chars:
                raise errors.InvalidArgument(
                    f"documents[{i}] is {len(doc)} characters; the limit is {s.max_document_chars}"
                )
        errors.check_limit("top_n", request.top_n, 0, s.max_documents)
        if request.model and request.model != self.model.name:
            raise errors.InvalidArgument(f"unknown model {request.model!r}; this server serves {self.model.name!r}")

    async def rerank(self, request: RerankQuery) -> RerankOutcome:
        if self.batcher is None:
            raise errors.NotReady("rerank server is still loading its model")
        started = time.perf_counter()
        self.validate(request)
        pairs, query_truncated = await asyncio.to_thread(self.model.encode, request.query, request.documents)
        tokenized = time.perf_counter()
        done = await self.batcher.submit(pairs, [p.length for p in pairs], request.deadline_s)
        ranked = sorted(enumerate(map(float, done.values)), key=lambda pair: -pair[1])
        if request.top_n:
            ranked = ranked[: request.top_n]
        return RerankOutcome(
            ranked=ranked,
            tokens=sum(p.length for p in pairs),
            queue_items=self.batcher.queued_items,
            timings_ms={
                "tokenize_ms": 1000 * (tokenized - started),
                "queue_ms": done.queue_ms,
                "compute_ms": done.compute_ms,
                # What one pair costs the model now: callers model this replica's service time with it.
                "model_ms_per_pair": self.batcher.ms_per_item,
                "total_ms": 1000 * (time.perf_counter() - started),
            },
            query_truncated=query_truncated,
        )

    def info(self) -> dict:
        s = self.settings
        return {
            "model": self.model.name if self.model else s.model,
            "max_length": s.max_length,
            "execution_provider": self.model.session.get_providers()[0] if self.model else choose_providers(s.provider)[0],
            "limits": {
                "max_documents": s.max_documents,
                "max_document_chars": s.max_document_chars,
                "max_query_chars": s.max_query_chars,
                "max_query_tokens": self.model.max_query_tokens if self.model else s.max_length // 2,
                "max_queue_items": s.max_queue_items,
            },
        }
