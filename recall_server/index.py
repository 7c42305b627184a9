"""A searchable document index: usearch HNSW (cosine) for vectors, the SQLite
DocStore for documents.

Writes go to SQLite first (the acknowledgement point), then to the HNSW graph
in memory. The graph is saved to disk every ``save_every_writes`` writes and
on close, together with the store sequence it reflects; opening an index
replays every store write after that sequence, so a crash between saves loses
nothing that was acknowledged. The sequence saved is the graph's own: a write
committed to the store whose graph insert failed (out of memory, say) leaves
the graph behind, and it is caught up from the store before the next write
and never claimed by a save.

A save copies the graph under the lock (a memory copy) and writes the copy
without it, so searches never wait on the disk. The graph file and the
directory are fsynced before the manifest names the sequence, so after a
power cut the manifest never claims a graph that is not on disk. A missing or
unreadable graph is rebuilt from the store (which holds every vector), never
served partially.
"""

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from usearch.index import Index

from recall_server import calibration
from recall_server.docstore import Applied, DocStore, Write
from recall_server.durable import fsync_directory, fsync_file, write_atomically
from recall_server.index_lock import IndexLock
from twostage.corpus import Document
from twostage.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ModelMismatch
from twostage.filters import Filter
from twostage.versions import HybridClock, Version

log = logging.getLogger(__name__)
MANIFEST = "index.json"
GRAPH = "vectors.usearch"
STORE = "docs.sqlite"
FORMAT_VERSION = 1
# Rebuild the graph once removals (deletes and replaced documents) reach this share of it.
COMPACT_SHARE = 0.2
COMPACT_MIN_REMOVALS = 256
# usearch links vectors added concurrently less well: 200 vectors added on two threads missed their own
# nearest neighbour in 1% of searches, on one thread never. Small batches gain nothing from threads anyway.
PARALLEL_ADD_MIN_VECTORS = 4096
# A filtered search that scores passing documents exactly holds the graph lock for this many at a time.
EXACT_CHUNK_KEYS = 4096


@dataclass(frozen=True)
class IndexManifest:
    model: str
    dims: int
    metric: str = "cos"
    applied_seq: int = 0
    format_version: int = FORMAT_VERSION
    # The part of a sharded corpus this index holds (ids with shard_of(id, shards) == shard).
    shard: int = 0
    shards: int = 1
    # The type of each metadata key (twostage.schema); the store holds it durably, a save copies it here.
    metadata_schema: dict[str, str] = field(default_factory=dict)
    # Which graph of the model embedded the documents (recall_server.embedder.Embedder.graph): vectors of
    # another graph differ slightly, so a server embedding queries with another one warns. "": not recorded.
    embedding_graph: str = ""

    @classmethod
    def read(cls, directory: Path) -> "IndexManifest":
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise InvalidArgument(f"{directory} is not an index; build one with 'twostage index build'")
        return cls(**json.loads(path.read_text()))


def _add(graph: Index, keys: np.ndarray, vectors: np.ndarray) -> None:
    graph.add(keys, vectors, threads=0 if len(keys) >= PARALLEL_ADD_MIN_VECTORS else 1)


@dataclass(frozen=True)
class CalibrationSample:
    """Documents sampled to fit the score calibration from."""

    keys: np.ndarray  # the sampled documents' keys
    partners: np.ndarray  # random other keys per sampled one: the pairs that are not relevant
    documents: list[Document]  # the sampled documents, in the order of ``keys``


class DocumentIndex:
    def __init__(self, directory: Path, manifest: IndexManifest, save_every_writes: int = 1000, read_only: bool = False,
                 filter_exact_max_docs: int = 10_000, filter_max_fetch: int = 4096):
        self.directory = Path(directory)
        self.filter_exact_max_docs = filter_exact_max_docs
        self.filter_max_fetch = filter_max_fetch
        self.manifest = manifest
        self.save_every_writes = save_every_writes
        self.read_only = read_only
        self._lock = IndexLock(self.directory, exclusive=not read_only)
        try:
            self.store = DocStore(self.directory / STORE, read_only=read_only)
        except BaseException:
            self._lock.release()
            raise
        if not read_only and (declared := {k: t for k, t in manifest.metadata_schema.items()
                                           if k not in self.store.schema()}):
            self.store.declare_schema(declared)  # a manifest written with a schema the store lacks
        self._graph = self._new_graph()
        # _write_lock orders writers so the graph applies store writes in sequence
        # (a save must never claim a sequence the graph has not applied);
        # _graph_lock is held only for graph reads and mutations.
        self._write_lock = threading.RLock()
        self._graph_lock = threading.Lock()
        # One save at a time, so manifests only move forward. Lock order: _save_lock before _write_lock;
        # a writer never saves while it holds _write_lock.
        self._save_lock = threading.Lock()
        self._unsaved_writes = 0
        self._removed_since_compaction = 0
        self._graph_seq = manifest.applied_seq  # every store write up to here is in the graph
        self.graph_behind = False  # a graph insert failed: caught up from the store before the next write
        self.clock = HybridClock(f"index-{uuid.uuid4().hex[:12]}")  # versions for writes given none

    @classmethod
    def create(cls, directory: Path, model: str, dims: int, shard: int = 0, shards: int = 1, embedding_graph: str = "",
               **kwargs) -> "DocumentIndex":
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise InvalidArgument(f"{directory} already holds an index; remove it or choose another --out")
        directory.mkdir(parents=True, exist_ok=True)
        index = cls(directory, IndexManifest(model=model, dims=dims, shard=shard, shards=shards,
                                             embedding_graph=embedding_graph), **kwargs)
        index.save()
        return index

    @classmethod
    def open(cls, directory: Path, model: str, dims: int, **kwargs) -> "DocumentIndex":
        directory = Path(directory)
        manifest = IndexManifest.read(directory)
        if manifest.format_version != FORMAT_VERSION:
            raise ModelMismatch(f"{directory}: index format {manifest.format_version}, expected {FORMAT_VERSION}")
        if (manifest.model, manifest.dims) != (model, dims):
            raise ModelMismatch(
                f"{directory} was built with model {manifest.model!r} ({manifest.dims} dims) but the server "
                f"loads {model!r} ({dims} dims); rebuild the index or serve the model it was built with"
            )
        index = cls(directory, manifest, **kwargs)
        try:
            applied_seq = manifest.applied_seq
            if not index._load_graph():
                applied_seq = 0  # rebuild: replay every live document from the store
            index._catch_up(applied_seq)
            if applied_seq == 0 and manifest.applied_seq and not index.read_only:
                index.save()
        except BaseException:
            index.store.close()
            index._lock.release()
            raise
        return index

    def _new_graph(self) -> Index:
        return Index(ndim=self.manifest.dims, metric=self.manifest.metric, dtype="f32")

    def _load_graph(self) -> bool:
        """Load the saved graph; False (and an empty graph) when it is missing or unreadable."""
        path = self.directory / GRAPH
        if not path.exists():
            if self.manifest.applied_seq:
                log.warning("%s: the graph file is missing; rebuilding it from the document store", self.directory)
            return False
        try:
            self._graph.load(str(path))
        except (RuntimeError, ValueError, OSError) as error:  # what usearch raises on a torn file
            log.warning("%s: the graph file is unreadable (%s); rebuilding it from the document store",
                        self.directory, error)
            self._graph = self._new_graph()
            return False
        return True

    def rebuild_graph(self) -> int:
        """Rebuild the graph from the store alone and save it (``twostage index repair``). Returns its size."""
        self.require_writable()
        with self._write_lock:
            with self._graph_lock:
                self._graph = self._new_graph()
            self._catch_up(0)
            self.save()
            return len(self._graph)

    def __len__(self) -> int:
        return len(self._graph)

    def _catch_up(self, applied_seq: int) -> None:
        """Apply every store write after ``applied_seq`` to the graph (no write runs meanwhile)."""
        target = self.store.max_seq()
        for changes in self.store.changes_since(applied_seq):
            with self._graph_lock:
                for change in changes:
                    self._remove_key(change.key)
                live = [c for c in changes if c.vector is not None]
                if live:
                    _add(self._graph, np.array([c.key for c in live], dtype=np.uint64),
                         np.stack([c.vector for c in live]))
        self._graph_seq = target
        self.graph_behind = False

    def _remove_key(self, key: int) -> None:
        if self._graph.contains(key):
            self._graph.remove(key)
            self._removed_since_compaction += 1

    def _compact_if_worn(self) -> None:
        """HNSW removals leave tombstones that still route searches; past a share of the graph they cut it
        apart (searches come back short, even empty). Rebuild from the live vectors before that happens.
        Called with the write lock held: writes wait, searches go on against the old graph until the swap."""
        live = len(self._graph)
        if self._removed_since_compaction < max(COMPACT_MIN_REMOVALS, COMPACT_SHARE * live):
            return
        with self._graph_lock:
            keys = np.asarray(self._graph.keys, dtype=np.uint64)
            vectors = self._graph.get(keys) if len(keys) else np.empty((0, self.manifest.dims), np.float32)
        fresh = self._new_graph()
        if len(keys):
            _add(fresh, keys, np.asarray(vectors, dtype=np.float32))
        with self._graph_lock:
            self._graph = fresh
        log.info("%s: compacted the graph after %d removals (%d live)", self.directory,
                 self._removed_since_compaction, live)
        self._removed_since_compaction = 0

    def require_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition("this recall server opened its index read-only; send writes to the shard's writer")

    def get(self, doc_ids: list[str]) -> dict[str, Document]:
        return self.store.get(doc_ids)

    def apply(self, writes: list[Write], request_id: str = "", answer=None) -> Applied:
        """Store versioned writes (each applied only when newer than what is held; see ``DocStore.apply``),
        durable on return, then update the graph. Ids are unique within one call."""
        self.require_writable()
        for write in writes:
            if write.vector is not None and np.shape(write.vector) != (self.manifest.dims,):
                raise InvalidArgument(f"document {write.doc.id!r}: its vector has shape {np.shape(write.vector)}; "
                                      f"this index holds {self.manifest.dims}-dimension vectors")
        with self._write_lock:
            self._catch_up_if_behind()
            applied = self.store.apply(writes, request_id, answer)  # durable from here on
            if applied.keys:
                self._update_graph(applied)
            self._unsaved_writes += len(applied.keys)
            save_due = self._unsaved_writes >= self.save_every_writes
        if save_due:
            self._save_logged()
        return applied

    def _update_graph(self, applied: Applied) -> None:
        try:
            with self._graph_lock:
                for key in applied.keys:
                    self._remove_key(key)
                if applied.added:
                    _add(self._graph, np.asarray([key for key, _ in applied.added], dtype=np.uint64),
                         np.stack([vector for _, vector in applied.added]))
        except Exception:
            # Committed in the store: the graph replays it from there (before the next write, or on open).
            log.exception("%s: updating the graph failed; catching it up from the store", self.directory)
            self.graph_behind = True
            return
        if not self.graph_behind:
            self._graph_seq = applied.last_seq
        self._compact_if_worn()

    def _catch_up_if_behind(self) -> None:
        if self.graph_behind:
            try:
                self._catch_up(self._graph_seq)
            except Exception:
                log.exception("%s: catching the graph up from the store failed; retried on the next write",
                              self.directory)

    def upsert(self, docs: list[Document], vectors: np.ndarray, version: Version | None = None) -> Applied:
        """Store documents at one version (a new one from this index's clock when none is given)."""
        version = version or self.clock.now()
        return self.apply([Write(doc, vector, version) for doc, vector in zip(docs, vectors)])

    def delete(self, doc_ids: list[str], version: Version | None = None) -> int:
        """Tombstone ids at one version; returns how many were live."""
        version = version or self.clock.now()
        return self.apply([Write(Document(doc_id, "", ""), None, version) for doc_id in doc_ids]).deleted

    def purge(self, horizon: Version, requests_older_than_s: float) -> int:
        """Drop tombstones older than ``horizon`` that the saved graph has already seen (``DocStore.purge``)."""
        self.require_writable()
        return self.store.purge(horizon, requests_older_than_s, saved_seq=self.manifest.applied_seq)

    def copy_writes(self, source: "DocumentIndex", since_seq: int = 0) -> int:
        """Apply every write ``source`` holds after ``since_seq``, with its version and stored vector (no
        re-embedding): merging parts of a shard, or carrying writes over to a newer snapshot. Returns how
        many rows were read."""
        copied = 0
        # Batches large enough that the graph adds them on every thread.
        for batch in source.store.writes_since(since_seq, batch_rows=PARALLEL_ADD_MIN_VECTORS):
            self.apply(batch)
            copied += len(batch)
        return copied

    def search(self, vector: np.ndarray, k: int, filter_: Filter | None = None) -> list[tuple[Document, float]]:
        """The k nearest live documents that pass the filter, with their cosine similarity, best first."""
        hits = self.nearest(vector, k, filter_)
        docs = self.store.fetch([key for key, _ in hits])
        return [(docs[key], score) for key, score in hits if key in docs]

    def nearest(self, vector: np.ndarray, k: int, filter_: Filter | None = None,
                deadline: float | None = None) -> list[tuple[int, float]]:
        """(key, cosine) of the k nearest live documents that pass the filter, best first. A filtered search
        raises DeadlineExceeded once ``deadline`` (time.monotonic()) passes: it runs in a thread no one can stop."""
        vector = np.asarray(vector, dtype=np.float32)
        if filter_ is not None:
            return self._filtered_search(vector, k, filter_, deadline)
        with self._graph_lock:
            if len(self._graph) == 0:
                return []
            wanted = min(k, len(self._graph))
            matches = self._graph.search(vector, wanted)
            keys, distances = matches.keys.tolist(), matches.distances.tolist()
            if len(keys) < wanted:
                # A worn graph came back short: answer exactly from its vectors rather than return too few.
                return self._exact_search(vector, np.asarray(self._graph.keys, dtype=np.uint64), wanted)
        return [(key, 1.0 - dist) for key, dist in zip(keys, distances)]

    def _filtered_search(self, vector: np.ndarray, k: int, filter_: Filter,
                         deadline: float | None = None) -> list[tuple[int, float]]:
        """Only documents that pass, and k of them when k pass: when few pass, score exactly those; when many
        do, search the graph with over-fetch (the more fail, the more is fetched, up to filter_max_fetch) and
        keep those that pass, as near to brute force as the graph is without a filter. When the cap finds
        fewer than k, score every passing document exactly, a chunk at a time."""
        allowed = self.store.matching_keys(filter_, limit=self.filter_exact_max_docs + 1)
        if len(allowed) <= self.filter_exact_max_docs:
            with self._graph_lock:
                return self._exact_search(vector, np.asarray(allowed, dtype=np.uint64), k)
        cap = max(self.filter_max_fetch, k)
        fetch = min(4 * k, cap)
        while True:
            _check_deadline(deadline)
            with self._graph_lock:
                size = len(self._graph)
                matches = self._graph.search(vector, min(fetch, size))
            keys, distances = matches.keys.tolist(), matches.distances.tolist()
            passing = self.store.passing(filter_, keys)
            hits = [(key, 1.0 - dist) for key, dist in zip(keys, distances) if key in passing][:k]
            if len(hits) >= k or len(keys) >= size or fetch >= cap:
                break
            fetch = min(4 * fetch, cap)
        if len(hits) < k:  # the cap, or a worn graph that came back short: answer exactly
            return self._chunked_exact_search(vector, np.asarray(self.store.matching_keys(filter_), np.uint64), k,
                                              deadline)
        return hits

    def _chunked_exact_search(self, vector: np.ndarray, keys: np.ndarray, k: int,
                              deadline: float | None) -> list[tuple[int, float]]:
        """_exact_search over many keys: the graph lock is taken per chunk, so writes and other searches go on
        between chunks, and the deadline is checked between them."""
        best: list[tuple[int, float]] = []
        for start in range(0, len(keys), EXACT_CHUNK_KEYS):
            _check_deadline(deadline)
            with self._graph_lock:
                found = self._exact_search(vector, keys[start:start + EXACT_CHUNK_KEYS], k)
            # Earlier chunks first and a stable sort: ties keep key order, as one pass over every key would.
            best = sorted(best + found, key=lambda pair: -pair[1])[:k]
        return best

    def dense_scores(self, vector: np.ndarray, keys: list[int]) -> dict[int, float]:
        """Cosine of the query with these documents' vectors (live ones only)."""
        with self._graph_lock:
            present = np.asarray([key for key in keys if self._graph.contains(key)], dtype=np.uint64)
            return dict(self._exact_search(np.asarray(vector, np.float32), present, len(present)))

    def vectors(self, keys: list[int]) -> dict[int, np.ndarray]:
        """The stored vectors of these live documents, in the order given (pseudo-relevance feedback reads its
        hits' vectors here; a key removed meanwhile is left out)."""
        with self._graph_lock:
            present = [key for key in keys if self._graph.contains(key)]
            if not present:
                return {}
            found = np.asarray(self._graph.get(np.asarray(present, dtype=np.uint64)), dtype=np.float32)
        return dict(zip(present, found.reshape(len(present), -1)))

    def _exact_search(self, vector: np.ndarray, keys: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(key, cosine) of the k best of these keys by brute force; called with the graph lock held."""
        if len(keys) == 0 or k <= 0:
            return []
        vectors = np.asarray(self._graph.get(keys), dtype=np.float32).reshape(len(keys), -1)
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(vector)), 1e-12)
        similarity = vectors @ vector / np.maximum(norms, 1e-12)
        best = np.argsort(-similarity, kind="stable")[:k]
        return list(zip(keys[best].tolist(), similarity[best].tolist()))

    def calibration_sample(self) -> CalibrationSample | None:
        """Documents to fit the score calibration from; None when the index holds too few."""
        with self._graph_lock:
            keys = np.asarray(self._graph.keys, dtype=np.uint64)
        if len(keys) < calibration.MIN_DOCS:
            return None
        sampled = calibration.sample_keys(keys)
        docs = self.store.fetch(sampled.tolist())
        sampled = np.asarray([key for key in sampled.tolist() if key in docs], dtype=np.uint64)
        return CalibrationSample(sampled, calibration.irrelevant_partners(sampled, keys),
                                 [docs[key] for key in sampled.tolist()])

    def calibration_fit(self, sample: CalibrationSample, queries: list[str],
                        vectors: np.ndarray) -> calibration.FittedCalibration | None:
        """Fit from the sample's pseudo-queries (``queries``, embedded as ``vectors``): cosines and BM25 against
        their own documents and against the random others. Blocks (graph reads, SQLite)."""
        sampled, partners = sample.keys, sample.partners
        dims = self.manifest.dims
        with self._graph_lock:
            # A document removed since the sample was drawn has no vector: its pairs are left out.
            live = np.asarray([self._graph.contains(key) for key in sampled.tolist()], dtype=bool)
            other_live = np.asarray([[self._graph.contains(key) for key in row] for row in partners.tolist()],
                                    dtype=bool).reshape(partners.shape) & live[:, None]
            own_vectors = np.asarray(self._graph.get(sampled[live]), dtype=np.float32).reshape(-1, dims)
            other_vectors = np.asarray(self._graph.get(partners[other_live]), dtype=np.float32).reshape(-1, dims)
        if not other_live.any():
            return None
        vectors = np.asarray(vectors, dtype=np.float32)
        own_cosine = np.einsum("ij,ij->i", vectors[live], own_vectors)
        other_cosine = np.einsum("ij,ij->i", np.repeat(vectors, other_live.sum(axis=1), axis=0), other_vectors)
        own_bm25, other_bm25 = np.zeros(0), np.zeros(0)
        if self.store.has_lexical:
            own, other = [], []
            for query, key, others, kept in zip(queries, sampled.tolist(), partners.tolist(), other_live.tolist()):
                scores = self.store.lexical_scores(query, [key, *others])
                own.append(scores.get(key, 0.0))
                other.extend(scores.get(o, 0.0) for o, keep in zip(others, kept) if keep)
            own_bm25, other_bm25 = np.asarray(own)[live], np.asarray(other)
        return calibration.fit(own_cosine, other_cosine, own_bm25, other_bm25, self.store.count())

    def fetch(self, keys: list[int]) -> dict[int, Document]:
        return self.store.fetch(keys)

    def _save_logged(self) -> None:
        try:
            self.save()
        except OSError as error:
            # The writes are committed in the store; a later save (or a replay on start) covers them.
            log.error("%s: saving the graph failed (%s); writes go on, the next save retries", self.directory, error)

    def save(self) -> None:
        """Persist the graph and the store sequence it reflects, without holding searches back."""
        with self._save_lock:
            with self._write_lock:  # the copy and the sequence must match: no write in between
                applied_seq = self._graph_seq
                with self._graph_lock:
                    snapshot = self._graph.copy()
                self._unsaved_writes = 0
            tmp = self.directory / (GRAPH + ".tmp")
            try:
                snapshot.save(str(tmp))
                fsync_file(tmp)
                os.replace(tmp, self.directory / GRAPH)
                fsync_directory(self.directory)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self.manifest = IndexManifest(**{**asdict(self.manifest), "applied_seq": applied_seq,
                                             "metadata_schema": dict(sorted(self.store.schema().items()))})
            write_atomically(self.directory / MANIFEST, json.dumps(asdict(self.manifest), indent=2).encode())

    def close(self) -> None:
        try:
            if not self.read_only:
                self.save()
            self.store.close()
        finally:
            self._lock.release()


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the deadline passed during a filtered search")


def repair_index(directory: Path) -> int:
    """Rebuild a writable index's graph from its store (``twostage index repair``); returns the documents."""
    manifest = IndexManifest.read(directory)
    index = DocumentIndex.open(directory, manifest.model, manifest.dims)
    try:
        return index.rebuild_graph()
    finally:
        index.close()
