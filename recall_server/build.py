"""``twostage index build``: embed a corpus and write a DocumentIndex."""

import itertools
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recall_server.embedder import Embedder
from recall_server.index import DocumentIndex
from twostage.batching import BatchPolicy, plan_batches
from twostage.corpus import Document, corpus_file, document_text, read_corpus

log = logging.getLogger(__name__)


def embed_documents(embedder: Embedder, docs: list[Document], policy: BatchPolicy, bar: tqdm | None = None) -> np.ndarray:
    """Embed in length-sorted batches within the policy's size and token limits."""
    encoded = embedder.encode([document_text(d) for d in docs], is_query=False)
    vectors = np.empty((len(docs), embedder.dims), dtype=np.float32)
    for plan in plan_batches([e.length for e in encoded], policy.max_batch_size, policy.max_batch_tokens):
        vectors[plan] = embedder.embed([encoded[i] for i in plan])
        if bar is not None:
            bar.update(len(plan))
    return vectors


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(docs)
    while chunk := list(itertools.islice(iterator, size)):
        # Within a chunk the last copy of an id wins, as it would across chunks.
        yield list({doc.id: doc for doc in chunk}.values())


def build_index(
    corpus: Path,
    out: Path,
    embedder: Embedder,
    policy: BatchPolicy,
    limit: int | None = None,
    chunk_docs: int = 4096,
    progress: bool = True,
) -> int:
    """Embed every document of ``corpus`` (BEIR dir or JSONL) into a new index at ``out``.

    The index is written beside ``out`` and moved into place when complete, so a
    failed build leaves nothing that looks like an index.
    """
    if not corpus_file(corpus).is_file():
        raise FileNotFoundError(f"no corpus at {corpus_file(corpus)}")
    if Path(out).exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    docs: Iterable[Document] = read_corpus(corpus)
    if limit:
        docs = itertools.islice(docs, limit)
    partial = Path(out).with_name(Path(out).name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    index = DocumentIndex.create(partial, embedder.name, embedder.dims, save_every_writes=1 << 62)
    with open(corpus_file(corpus), "rb") as f:
        total = sum(1 for line in f if line.strip())
    with tqdm(total=min(total, limit or total), unit="doc", desc="embedding", disable=not progress) as bar:
        for chunk in _chunks(docs, chunk_docs):
            if missing := [d for d in chunk if not d.id]:
                raise ValueError(f"{len(missing)} documents have no _id")
            index.upsert(chunk, embed_documents(embedder, chunk, policy, bar))
    count = index.store.count()
    index.close()
    partial.rename(out)
    log.info("indexed %d documents into %s", count, out)
    return count
