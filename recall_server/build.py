"""``twostage index build``: embed a corpus and write a DocumentIndex."""

import itertools
import logging
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recall_server.embedder import Embedder
from recall_server.index import DocumentIndex
from twostage.batching import BatchPolicy, plan_batches
from twostage.corpus import Document, corpus_file, document_text, read_corpus

log = logging.getLogger(__name__)
# Measured on 2 CPU cores (twostage bench embed): 8 documents of 512 tokens per call is fastest.
DEFAULT_BUILD_POLICY = BatchPolicy(max_batch_size=32, max_batch_tokens=4096)


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


def shard_of(doc_id: str, shards: int) -> int:
    """Stable shard assignment: the same id lands on the same shard on every build."""
    return zlib.crc32(doc_id.encode()) % shards


def shard_dirs(index_dir: Path, shards: int) -> list[Path]:
    return [Path(index_dir) / f"shard-{i}" for i in range(shards)]


def build_index(
    corpus: Path,
    out: Path,
    embedder: Embedder,
    policy: BatchPolicy,
    limit: int | None = None,
    shards: int = 1,
    chunk_docs: int = 4096,
    progress: bool = True,
) -> int:
    """Embed every document of ``corpus`` (BEIR dir or JSONL) into a new index at ``out``;
    with ``shards`` > 1, into ``out/shard-0`` .. ``out/shard-{N-1}``, one recall server each.

    Each index is written beside its target and moved into place when complete,
    so a failed build leaves nothing that looks like an index.
    """
    if not corpus_file(corpus).is_file():
        raise FileNotFoundError(f"no corpus at {corpus_file(corpus)}")
    if Path(out).exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    with open(corpus_file(corpus), "rb") as f:
        total = min(sum(1 for line in f if line.strip()), limit or 1 << 62)
    targets = [Path(out)] if shards == 1 else shard_dirs(out, shards)
    count = 0
    with tqdm(total=total, unit="doc", desc="embedding", disable=not progress) as bar:
        for shard, target in enumerate(targets):
            docs: Iterable[Document] = itertools.islice(read_corpus(corpus), limit)
            if shards > 1:
                docs = (d for d in docs if shard_of(d.id, shards) == shard)
            count += _build_one(docs, target, embedder, policy, chunk_docs, bar)
    log.info("indexed %d documents into %s", count, out)
    return count


def _build_one(docs: Iterable[Document], out: Path, embedder, policy, chunk_docs: int, bar: tqdm) -> int:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    index = DocumentIndex.create(partial, embedder.name, embedder.dims, save_every_writes=1 << 62)
    for chunk in _chunks(docs, chunk_docs):
        if missing := [d for d in chunk if not d.id]:
            raise ValueError(f"{len(missing)} documents have no _id")
        index.upsert(chunk, embed_documents(embedder, chunk, policy, bar))
    count = index.store.count()
    index.close()
    partial.rename(out)
    return count
