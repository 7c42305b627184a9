"""The recall service logic: validate, embed through the batcher, search the index."""

import asyncio
import re
import time
from dataclasses import dataclass

import numpy as np

from recall_server.config import RecallSettings
from recall_server.embedder import Embedder
from recall_server.index import DocumentIndex
from twostage import errors
from twostage.batching import BatchPolicy, DynamicBatcher
from twostage.corpus import Document, document_text
from twostage.metrics import watch_batcher
from twostage.model_store import resolve_model

# Printable, no whitespace at the ends: ids travel in logs, URLs and TSV files.
_ID_PATTERN = re.compile(r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$")


@dataclass(frozen=True)
class Candidate:
    document: Document
    score: float


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)


class RecallService:
    def __init__(self, settings: RecallSettings):
        self.settings = settings
        self.embedder: Embedder | None = None
        self.index: DocumentIndex | None = None
        self.batcher: DynamicBatcher | None = None

    async def start(self) -> None:
        s = self.settings
        self.embedder = await asyncio.to_thread(Embedder, resolve_model(s.model), s, s.max_length)
        self.index = await asyncio.to_thread(
            DocumentIndex.open, s.index_dir, self.embedder.name, self.embedder.dims, save_every_writes=s.save_every_writes
        )
        self.batcher = DynamicBatcher("embed", self.embedder.embed, BatchPolicy.from_settings(s))
        watch_batcher(self.batcher)
        self.batcher.start()
        await self.search("warm up", 1)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close(drain=True)
        if self.index is not None:
            await asyncio.to_thread(self.index.close)

    def _require_ready(self) -> None:
        if self.batcher is None or self.index is None:
            raise errors.NotReady("recall server is still loading its model and index")

    async def _embed(self, texts: list[str], is_query: bool, deadline_s: float | None) -> np.ndarray:
        encoded = await asyncio.to_thread(self.embedder.encode, texts, is_query)
        done = await self.batcher.submit(encoded, [e.length for e in encoded], deadline_s)
        return np.stack(done.values) if done.values else np.empty((0, self.embedder.dims), np.float32)

    async def search(self, query: str, k: int, deadline_s: float | None = None) -> tuple[list[Candidate], dict]:
        self._require_ready()
        errors.check_text("query", query, self.settings.max_query_chars)
        errors.check_limit("k", k, 1, self.settings.max_k)
        start = time.perf_counter()
        (vector,) = await self._embed([query], True, deadline_s)
        embedded = time.perf_counter()
        hits = await asyncio.to_thread(self.index.search, vector, k)
        timings = {"embed_ms": 1000 * (embedded - start), "search_ms": _ms_since(embedded), "total_ms": _ms_since(start)}
        return [Candidate(doc, score) for doc, score in hits], timings

    async def embed(self, texts: list[str], is_query: bool, model: str, deadline_s: float | None) -> np.ndarray:
        self._require_ready()
        errors.check_limit("texts (count)", len(texts), 1, self.settings.max_embed_texts)
        for i, text in enumerate(texts):
            errors.check_text(f"texts[{i}]", text, self.settings.max_doc_chars)
        if model and model != self.embedder.name:
            raise errors.InvalidArgument(f"unknown model {model!r}; this server serves {self.embedder.name!r}")
        return await self._embed(texts, is_query, deadline_s)

    def _check_ids(self, ids: list[str]) -> None:
        errors.check_limit("ids (count)", len(ids), 1, self.settings.max_upsert_docs)
        seen = set()
        for i, doc_id in enumerate(ids):
            if len(doc_id) > self.settings.max_id_chars or not _ID_PATTERN.match(doc_id):
                raise errors.InvalidArgument(
                    f"id [{i}] {doc_id[:40]!r} is malformed: 1-{self.settings.max_id_chars} printable "
                    "characters, no surrounding whitespace"
                )
            if doc_id in seen:
                raise errors.InvalidArgument(f"id {doc_id!r} appears more than once in the request")
            seen.add(doc_id)

    async def upsert(self, docs: list[Document], deadline_s: float | None = None) -> int:
        """Embed and store; returns once the documents are durable and searchable."""
        self._require_ready()
        self._check_ids([d.id for d in docs])
        texts = [document_text(d) for d in docs]
        for doc, text in zip(docs, texts):
            errors.check_text(f"document {doc.id!r} title + text", text, self.settings.max_doc_chars)
        vectors = await self._embed(texts, False, deadline_s)
        await asyncio.to_thread(self.index.upsert, docs, vectors)
        return len(docs)

    async def delete(self, ids: list[str]) -> int:
        self._require_ready()
        self._check_ids(ids)
        return await asyncio.to_thread(self.index.delete, ids)

    def doc_count(self) -> int:
        return self.index.store.count() if self.index else 0

    def info(self) -> dict:
        s = self.settings
        return {
            "model": self.embedder.name if self.embedder else s.model,
            "dims": self.embedder.dims if self.embedder else 0,
            "doc_count": self.doc_count(),
            "execution_provider": self.embedder.session.get_providers()[0] if self.embedder else "",
            "limits": {
                "max_k": s.max_k,
                "max_query_chars": s.max_query_chars,
                "max_embed_texts": s.max_embed_texts,
                "max_upsert_docs": s.max_upsert_docs,
                "max_doc_chars": s.max_doc_chars,
                "max_id_chars": s.max_id_chars,
            },
        }
