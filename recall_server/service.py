"""The recall service logic: validate, embed through the batcher, search the index."""

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from recall_server import calibration
from recall_server.config import RecallSettings
from recall_server.docstore import BUCKETS, Write
from recall_server.embedder import Embedder
from recall_server.index import DocumentIndex
from recall_server.replication import (
    MAX_BUCKETS_PER_CALL,
    PAGE,
    ChangesPage,
    Digests,
    PeerSync,
    ReconcilePlan,
    bounded_page,
    plan_reconcile,
    tombstone_horizon,
)
from recall_server.snapshot_follower import IndexLeases, SnapshotFollower
from twostage import errors, feedback, tracing
from twostage.batching import BatchPolicy, Cost, DynamicBatcher, Submission
from twostage.corpus import Document, document_text
from twostage.documents import check_documents, check_ids, check_request_id
from twostage.filters import Filter
from twostage.metrics import RECALL_SEARCH_SECONDS as SEARCH_SECONDS
from twostage.metrics import watch_batcher, watch_recall
from twostage.model_store import resolve_model
from twostage.recall_mode import RecallMode
from twostage.schema import check_filter_types, conform
from twostage.scoring import fuse_recall
from twostage.sharding import shard_of
from twostage.tracing import exemplar
from twostage.versions import HybridClock, Version, clock_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteReply:
    count: int  # documents upserted, or live documents deleted
    version: Version
    doc_count: int
    superseded: int = 0  # documents held at a newer version: this write lost to them
    newest: Version | None = None  # the newest version held for the write's ids afterwards


async def finish_even_if_cancelled(work):
    """Await ``work`` (a coroutine); if the caller is cancelled meanwhile, still wait for it to end before
    the cancellation goes on, so locks held around it are released only once a thread stops writing."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])  # never raises the task's own error
        raise


@dataclass(frozen=True)
class Candidate:
    document: Document
    score: float  # the order's score: cosine (dense), BM25 (lexical) or fused (hybrid)
    dense_score: float = 0.0
    lexical_score: float = 0.0
    vector: np.ndarray | None = None  # the stored vector, when asked for
    prf_dense_score: float = 0.0  # after feedback: the cosine with the refined vector, which the order fused


@dataclass
class RecallAnswer:
    candidates: list[Candidate]
    timings: dict[str, float]
    mode: RecallMode  # the mode that answered
    vector: np.ndarray  # the query's embedding (computed, or given)
    prf_hits: int = 0  # the hits pseudo-relevance feedback was formed from (0: it did not run)
    prf_skipped: str = ""  # why feedback that was asked for did not run (too little time left)
    cost: Cost = field(default_factory=Cost)  # what embedding the query cost the model (nothing: vector given)


class KeptMatches:
    """The BM25 matches a first round of feedback across shards read (it asks for vectors), kept for the gateway's
    second round of the same query, which then reads BM25 no more than one server's own feedback does. Bounded;
    a write or an index switch makes what is kept unusable."""

    def __init__(self, size: int = 64):
        self.size = size
        self._kept: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # searches run in threads
        self._generation = 0

    def key(self, index: DocumentIndex, query: str, filter_: Filter | None, k: int, mode: RecallMode) -> tuple:
        return id(index), self._generation, query, repr(filter_), k, mode

    def keep(self, key: tuple, matches: list) -> None:
        with self._lock:
            self._kept[key] = matches
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

    def take(self, key: tuple) -> list | None:
        with self._lock:
            return self._kept.pop(key, None)

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._kept.clear()


@dataclass(frozen=True)
class _Pass:
    ranked: list[tuple[int, float]]
    dense: dict[int, float]
    lexical: dict[int, float]
    matches: list | None  # the BM25 matches read, which a second pass of the same query reuses
    seconds: float
    timings: dict[str, float]


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)


class RecallService:
    def __init__(self, settings: RecallSettings):
        self.settings = settings
        self.embedder: Embedder | None = None
        self.index: DocumentIndex | None = None
        self.batcher: DynamicBatcher | None = None
        self.snapshots: SnapshotFollower | None = None
        self.replica_id = uuid.uuid4().hex  # this process, as its peers see it
        self.clock = HybridClock(f"recall-{self.replica_id[:12]}")  # versions for writes sent here directly
        # Replication sees this service only as its LocalReplica (replication.py states the contract).
        self.peers: PeerSync | None = PeerSync(settings, self) if settings.peers else None
        # Writes and an index switch take turns, so no write lands on an index being replaced.
        self._write_gate = asyncio.Lock()
        self._leases = IndexLeases()
        self._purging: asyncio.Task | None = None
        # The score calibration fitted from the served index (None: not yet, or too few documents).
        self.calibration: calibration.FittedCalibration | None = None
        self._writes_since_fit = 0
        self._fitting: asyncio.Task | None = None
        self._last_fit = float("-inf")
        self._refit_later: asyncio.TimerHandle | None = None
        self._kept_matches = KeptMatches()
        self._refit_after = False  # a new index came while a fit ran: fit again once it ends

    async def start(self) -> None:
        s = self.settings
        if s.snapshot_dir is not None and s.read_only:
            raise errors.ConfigError("snapshot_dir and read_only exclude each other: a server following snapshots "
                                     "serves its own writable copy")
        if s.peers and s.snapshot_dir is None:
            raise errors.ConfigError("peers needs snapshot_dir: replicas catch up on the writes made since the "
                                     "snapshot they share")
        self.embedder = await asyncio.to_thread(Embedder, resolve_model(s.model), s, s.max_length)
        self.batcher = DynamicBatcher("embed", self.embedder.embed, self.embedder.plan.policy(BatchPolicy.from_settings(s)))
        watch_batcher(self.batcher)
        watch_recall(self)
        self.batcher.start()
        if s.snapshot_dir is not None:
            self.snapshots = SnapshotFollower(s, self.embedder.name, self._switch_index, self._open_index)
            await self.snapshots.start()  # returns once an index is served; NOT_SERVING until then
            if self.peers is not None:
                await self.peers.sync_once()  # writes missed while away, before serving
                self.peers.start()
        else:
            self.index = await asyncio.to_thread(self._open_index, s.index_dir)
        if self.peers is None and not s.read_only:
            self._purging = asyncio.get_running_loop().create_task(self._purge_periodically())
        await self.answer("warm up", 1, mode=RecallMode.DENSE)
        # Its first run allocates: predicted from it, the next queries would be refused as late.
        self.batcher.reset_costs()
        self._refit_soon()  # in snapshot mode the first switch has started one already: wait for that one
        await self._fitting

    def _open_index(self, directory) -> DocumentIndex:
        s = self.settings
        index = DocumentIndex.open(directory, self.embedder.name, self.embedder.dims,
                                   save_every_writes=s.save_every_writes, read_only=s.read_only,
                                   filter_exact_max_docs=s.filter_exact_max_docs,
                                   filter_max_fetch=s.filter_max_fetch)
        if not index.store.has_lexical:
            log.warning("%s has no lexical part: lexical and hybrid searches are refused until it is opened for "
                        "writing once (or 'twostage index repair')", directory)
        if (built_by := index.manifest.embedding_graph or "not recorded") != self.embedder.graph:
            log.warning("%s was embedded by the %s graph of %s, and this server embeds queries and writes with the "
                        "%s graph (execution plan %s): their vectors differ slightly (cosine about 0.999), so "
                        "dense scores shift a little; rebuild the index, or set execution_plan to a plan of its "
                        "graph (stock: single or sessions; per-row: rows)", directory, built_by, self.embedder.name,
                        self.embedder.graph, self.embedder.plan.label)
        return index

    async def _switch_index(self, fresh: DocumentIndex, prepare, served=lambda: None) -> None:
        """Serve ``fresh`` from now on. ``prepare(old, fresh)`` runs first, in a thread, with writes held (it
        carries the old index's own writes over); searches never wait. ``served()`` runs in the same step as the
        swap (the follower records the snapshot then). The old index closes once its last in-flight call ends."""
        async with self._write_gate:
            old = self.index
            prepared = asyncio.ensure_future(asyncio.to_thread(prepare, old, fresh))
            try:
                await finish_even_if_cancelled(prepared)
            except asyncio.CancelledError:
                if not prepared.cancelled() and prepared.exception() is None:
                    self.index = fresh  # on disk the switch is made: serve what a restart would open
                    served()
                raise
            # One step, no await between: whoever reads the served snapshot reads the index that goes with it.
            self.index = fresh
            served()
            self._kept_matches.invalidate()
        self._refit_soon(after_running=True)
        if old is not None:
            await self._leases.wait_idle(old)
            try:
                await asyncio.to_thread(old.close)
            except Exception:  # the new index serves already; the old one's last save is replayed from its store
                log.exception("closing the replaced index failed")

    async def refit_calibration(self) -> calibration.FittedCalibration | None:
        """Fit the score calibration from the served index: its pseudo-queries are embedded as bulk work (queries
        go first), the rest runs in threads. Kept, and returned; the last fit stays when this one cannot fit."""
        self._writes_since_fit = 0
        self._last_fit = time.monotonic()
        with self._leases.hold(self.index) as index:
            sample = await asyncio.to_thread(index.calibration_sample)
            if sample is None:
                return self.calibration
            queries = [calibration.pseudo_query(doc) for doc in sample.documents]
            encoded = await asyncio.to_thread(self.embedder.encode, queries, True)
            done = await self.batcher.submit(encoded, [e.length for e in encoded], None, bulk=True)
            fitted = await asyncio.to_thread(index.calibration_fit, sample, queries, np.stack(done.values))
        if index is not self.index:  # a snapshot switch came during the fit: these are the old index's constants
            return self.calibration
        if fitted is not None:
            self.calibration = fitted
            log.info("score calibration fitted on %d documents: cosine %.1f x (c - %.3f), BM25 %.2f x (b - %.2f)",
                     fitted.doc_count, fitted.scale, fitted.center, fitted.lexical_scale, fitted.lexical_center)
        return self.calibration

    def _refit_soon(self, after_running: bool = False) -> None:
        """Refit in the background. A fit running already sees these writes (or the next trigger will); with
        ``after_running`` (a new index is served) another fit follows it, since it measures the old index."""
        if self._fitting is not None and not self._fitting.done():
            self._refit_after |= after_running
            return
        with tracing.detached():  # started by a write, it is not that write's work (nor in its trace)
            self._fitting = asyncio.get_running_loop().create_task(self._refit_logged())

    async def _refit_logged(self) -> None:
        while True:
            self._refit_after = False
            try:
                await self.refit_calibration()
            except asyncio.CancelledError:
                raise
            except Exception:  # the last fit keeps serving; the next writes try again
                log.exception("fitting the score calibration failed")
            if not self._refit_after:
                return

    def _count_writes(self, count: int) -> None:
        every = self.settings.calibration_refit_writes
        if not every or not count:
            return
        self._writes_since_fit += count
        fitted_on = self.calibration.doc_count if self.calibration else 0
        if self._writes_since_fit >= min(every, max(calibration.MIN_DOCS, fitted_on // 10)):
            wait_s = self._last_fit + self.settings.calibration_refit_min_interval_s - time.monotonic()
            if wait_s <= 0:
                self._refit_soon()
            elif self._refit_later is None:  # due, but the last fit is recent: fit once the interval has passed
                with tracing.detached():
                    self._refit_later = asyncio.get_running_loop().call_later(wait_s, self._refit_when_due)

    def _refit_when_due(self) -> None:
        self._refit_later = None
        self._refit_soon()

    async def close(self) -> None:
        if self._refit_later is not None:
            self._refit_later.cancel()
        if self._fitting is not None:
            self._fitting.cancel()
            await asyncio.gather(self._fitting, return_exceptions=True)
        if self._purging is not None:
            self._purging.cancel()
            await asyncio.gather(self._purging, return_exceptions=True)
        if self.peers is not None:
            await self.peers.close()
        if self.snapshots is not None:
            await self.snapshots.close()
        if self.batcher is not None:
            await self.batcher.close(drain=True)
        if self.embedder is not None:
            await asyncio.to_thread(self.embedder.close)  # after the drain: no batch runs on its sessions
        async with self._write_gate:
            if self.index is not None:
                await self._leases.wait_idle(self.index)
                await asyncio.to_thread(self.index.close)

    def _require_ready(self) -> None:
        if self.batcher is None or self.index is None:
            if self.snapshots is not None and self.batcher is not None:
                raise errors.NotReady(self.snapshots.waiting_reason())
            raise errors.NotReady("recall server is still loading its model and index")

    async def _embed(self, texts: list[str], is_query: bool, deadline_s: float | None) -> np.ndarray:
        return (await self._embed_counted(texts, is_query, deadline_s))[0]

    async def _embed_counted(self, texts: list[str], is_query: bool,
                             deadline_s: float | None) -> tuple[np.ndarray, int, Submission]:
        """The embeddings, the tokens the model read, and the batcher's submission (what they cost)."""
        encoded = await asyncio.to_thread(self.embedder.encode, texts, is_query)
        # Documents (writes) yield to queries in the batcher: a bulk upsert never holds searches back.
        done = await self.batcher.submit(encoded, [e.length for e in encoded], deadline_s, bulk=not is_query)
        vectors = np.stack(done.values) if done.values else np.empty((0, self.embedder.dims), np.float32)
        return vectors, sum(e.length for e in encoded), done

    async def answer(self, query: str, k: int, deadline_s: float | None = None, mode: RecallMode | None = None,
                     filter_: Filter | None = None, prf_depth: int | None = None, prf_weight: float | None = None,
                     vector: np.ndarray | None = None, feedback_vector: np.ndarray | None = None,
                     return_vectors: int = 0) -> "RecallAnswer":
        """A search. ``vector``: the query's embedding, given (BM25 still reads the query). Pseudo-relevance feedback
        per ``prf_depth`` and ``prf_weight`` (None: the settings, for hybrid searches), or, with ``feedback_vector``
        (formed elsewhere from a first pass over several shards), only its second pass. The stored vectors of the
        first ``return_vectors`` candidates come back with them."""
        self._require_ready()
        s = self.settings
        errors.check_text("query", query, s.max_query_chars)
        errors.check_limit("k", k, 1, s.max_k)
        errors.check_limit("return_vectors", return_vectors, 0, k)
        prf = feedback.check(prf_depth, prf_weight, feedback.Feedback(s.prf_depth, s.prf_weight), ("k", k))
        mode = RecallMode(mode or s.recall_mode)
        prf = feedback.for_mode(prf, mode, asked=prf_depth is not None or prf_weight is not None)
        check_filter_types(filter_, self.index.store.schema())
        vector = None if vector is None else self._given_vector(vector, "query_vector")
        feedback_vector = None if feedback_vector is None else self._given_vector(feedback_vector, "feedback_vector")
        start = time.perf_counter()
        cost = Cost()  # the query's vector given: the model computed nothing for this search
        if vector is None:
            # Every mode reports the cosine (the gateway's calibrated fusion reads it), so the query is embedded.
            with tracing.span("embed"):
                (vector,), _, done = await self._embed_counted([query], True, deadline_s)
            cost = Cost.of([done], self.batcher.ms_per_item)
        embedded = time.perf_counter()
        with self._leases.hold(self.index) as index:
            answer = await asyncio.to_thread(self._find, index, query, vector, k, mode, filter_, deadline_s, prf,
                                             return_vectors, feedback_vector)
            if (span := tracing.current_span()).is_recording():
                span.set_attributes({"twostage.shard": index.manifest.shard, "twostage.shards": index.manifest.shards,
                                     "twostage.recall_mode": mode, "twostage.k": k,
                                     "twostage.candidates": len(answer.candidates),
                                     "twostage.prf_hits": answer.prf_hits})
        SEARCH_SECONDS.labels(mode).observe(time.perf_counter() - start, exemplar())
        answer.mode, answer.cost = mode, cost
        answer.timings = {"embed_ms": 1000 * (embedded - start), **answer.timings, "total_ms": _ms_since(start)}
        return answer

    def _given_vector(self, vector: np.ndarray, field: str) -> np.ndarray:
        dims = self.embedder.dims
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (dims,):
            raise errors.InvalidArgument(f"{field} has {vector.size} values; this index holds {dims}-dimension "
                                         "vectors")
        # Its length in float32, as the index computes cosines: one that overflows or vanishes has no direction.
        length = np.linalg.norm(vector)
        if not np.isfinite(vector).all() or not np.isfinite(length) or length == 0:
            raise errors.InvalidArgument(f"{field} must be finite and not all zero, with a length float32 can hold "
                                         f"(got {length:g})")
        return vector

    def _find(self, index: DocumentIndex, query: str, vector: np.ndarray, k: int, mode: RecallMode,
              filter_: Filter | None, deadline_s: float | None = None, prf: feedback.Feedback = feedback.OFF,
              return_vectors: int = 0, feedback_vector: np.ndarray | None = None) -> "RecallAnswer":
        """Runs off the event loop: the index and SQLite block. A filtered dense search stops at ``deadline_s``
        (time.monotonic()): cancelling the call cannot stop this thread."""
        # Before BM25 is read: a write that lands meanwhile makes what is kept under this key unusable.
        matches_key = self._kept_matches.key(index, query, filter_, k, mode)
        if feedback_vector is not None:
            second = self._pass(index, query, feedback_vector, k, mode, filter_, deadline_s,
                                self._kept_matches.take(matches_key))
            return self._answer(index, vector, second, return_vectors, refined=True)
        first = self._pass(index, query, vector, k, mode, filter_, deadline_s)
        if not prf.active or not first.ranked:
            if return_vectors and mode == RecallMode.HYBRID:  # a gateway's first round: its second reads the same BM25
                self._kept_matches.keep(matches_key, first.matches)
            return self._answer(index, vector, first, return_vectors)
        started = time.perf_counter()
        # The second pass costs about what the first did (less: BM25 is read once), so it needs that much time.
        if deadline_s is not None and time.monotonic() + first.seconds > deadline_s:
            skipped = (f"{1000 * (deadline_s - time.monotonic()):.0f} ms left, a second pass needs about "
                       f"{1000 * first.seconds:.0f} ms")
            return self._answer(index, vector, first, return_vectors, skipped=skipped)  # prf_ms: only when it ran
        hits = list(index.vectors([key for key, _ in first.ranked[:prf.depth]]).values())
        refined = feedback.refine(vector, np.asarray(hits, dtype=np.float32), prf.weight)
        try:
            second = self._pass(index, query, refined, k, mode, filter_, deadline_s, first.matches)
        except errors.DeadlineExceeded:
            return self._answer(index, vector, first, return_vectors, prf_ms=_ms_since(started),
                                skipped="the deadline passed during the second pass")
        # search_ms and lexical_ms are the first pass's; prf_ms is the feedback and the second pass.
        second = dataclasses.replace(second, timings=first.timings)
        return self._answer(index, vector, second, return_vectors, refined=True, prf_ms=_ms_since(started),
                            prf_hits=len(hits))

    def _answer(self, index: DocumentIndex, vector: np.ndarray, final: "_Pass", return_vectors: int,
                refined: bool = False, prf_ms: float | None = None, prf_hits: int = 0,
                skipped: str = "") -> "RecallAnswer":
        """The pass's documents as candidates. After feedback (``refined``) the order is the refined vector's, and
        each candidate's dense_score is still its cosine with the query itself: that is what the gateway's
        calibrated fusion is fitted for (measured on SciFact, fusing the refined cosine ranked worse)."""
        timings = dict(final.timings)
        if prf_ms is not None:
            timings["prf_ms"] = prf_ms
        fetched = time.perf_counter()
        docs = index.fetch([key for key, _ in final.ranked])
        timings["fetch_ms"] = _ms_since(fetched)
        kept = [(key, score) for key, score in final.ranked if key in docs]
        own = index.dense_scores(vector, [key for key, _ in kept]) if refined else final.dense
        vectors = {}
        if return_vectors:
            wanted = [key for key, _ in kept[:return_vectors]]
            vectors = index.vectors(wanted)
        candidates = [Candidate(docs[key], score, own.get(key, 0.0), final.lexical.get(key, 0.0), vectors.get(key),
                                final.dense.get(key, 0.0) if refined else 0.0)
                      for key, score in kept]
        return RecallAnswer(candidates, timings, "", vector, prf_hits, skipped)

    def _pass(self, index: DocumentIndex, query: str, vector: np.ndarray, k: int, mode: RecallMode,
              filter_: Filter | None, deadline_s: float | None = None, matches: list | None = None) -> "_Pass":
        """One search: the ranked keys with their parts. ``matches``: the BM25 matches a first pass read, reused."""
        s = self.settings
        start = time.perf_counter()
        dense: dict[int, float] = {}
        if mode != RecallMode.LEXICAL:
            with tracing.span("dense search") as span:
                dense = dict(index.nearest(vector, k, filter_, deadline_s))
                if span.is_recording():
                    span.set_attributes({"twostage.k": k, "twostage.found": len(dense),
                                         "twostage.filtered": filter_ is not None})
        searched = time.perf_counter()
        lexical: dict[int, float] = {}
        keys = list(dense)
        if mode != RecallMode.DENSE:
            with tracing.span("lexical search") as span:
                # Hybrid reads deeper than k, to give the dense candidates their BM25 from the same query; one
                # beyond that depth gets the last score read (an upper bound), and 0 when every match was read.
                depth = max(k, s.lexical_depth) if mode == RecallMode.HYBRID else k
                if matches is None:
                    matches = index.store.lexical_search(query, depth, filter_)
                lexical = dict(matches[:k])
                keys = list(lexical) if mode == RecallMode.LEXICAL else list(dense | lexical)
                if mode == RecallMode.HYBRID:
                    every, floor = dict(matches), (matches[-1][1] if len(matches) == depth else 0.0)
                    lexical.update({key: every.get(key, floor) for key in dense if key not in lexical})
                if missing := [key for key in lexical if key not in dense]:
                    dense.update(index.dense_scores(vector, missing))
                if span.is_recording():
                    span.set_attributes({"twostage.depth": depth, "twostage.matches": len(matches),
                                         "twostage.filtered": filter_ is not None})
        if mode == RecallMode.HYBRID:
            with tracing.span("fusion") as span:
                ranked = fuse_recall(keys, [dense.get(key, 0.0) for key in keys],
                                     [lexical.get(key, 0.0) for key in keys], s.hybrid_fusion, s.hybrid_dense_weight)[:k]
                if span.is_recording():
                    span.set_attributes({"twostage.fusion": s.hybrid_fusion, "twostage.fused": len(keys)})
        else:
            source = dense if mode == RecallMode.DENSE else lexical
            ranked = sorted(((key, source[key]) for key in keys), key=lambda pair: -pair[1])[:k]
        ranked_at = time.perf_counter()
        # search_ms: the graph; lexical_ms: BM25, the missing halves of the scores and the fusion.
        timings = {"search_ms": 1000 * (searched - start), "lexical_ms": 1000 * (ranked_at - searched)}
        return _Pass(ranked, dense, lexical, matches, ranked_at - start, timings)

    async def embed(self, texts: list[str], is_query: bool, model: str,
                    deadline_s: float | None, refuse_truncation: bool = False) -> tuple[np.ndarray, int]:
        """The embeddings of ``texts``, and the tokens the model read; with ``refuse_truncation``, TooLong for a
        text the model would cut."""
        self._require_ready()
        errors.check_limit("texts (count)", len(texts), 1, self.settings.max_embed_texts)
        for i, text in enumerate(texts):
            errors.check_text(f"texts[{i}]", text, self.settings.max_doc_chars)
        if model and model != self.embedder.name:
            raise errors.InvalidArgument(f"unknown model {model!r}; this server serves {self.embedder.name!r}")
        if refuse_truncation:
            await asyncio.to_thread(self.embedder.check_fits, texts, is_query)
        vectors, tokens, _ = await self._embed_counted(texts, is_query, deadline_s)
        return vectors, tokens

    def _check_owned(self, ids: list[str]) -> None:
        """A sharded index holds only its ids: a write for another shard would leave a second copy."""
        manifest = self.index.manifest
        if manifest.shards > 1:
            for i, doc_id in enumerate(ids):
                if (owner := shard_of(doc_id, manifest.shards)) != manifest.shard:
                    raise errors.InvalidArgument(
                        f"ids[{i}]: id {doc_id!r} belongs to shard {owner} of {manifest.shards}, and this server "
                        f"holds shard {manifest.shard}; write through the gateway (or 'twostage docs'), which "
                        "routes each id to its shard"
                    )

    async def _exclusive_write(self, write, snapshot_version: str = ""):
        """``write(index)`` in a thread, with writes and index switches held off until it ends, also when the
        caller is cancelled meanwhile; with ``snapshot_version``, only if that snapshot is still the one served."""
        async with self._write_gate:
            if snapshot_version:
                self._served_snapshot(snapshot_version)
            with self._leases.hold(self.index) as index:
                try:
                    return await finish_even_if_cancelled(asyncio.to_thread(write, index))
                finally:
                    self._kept_matches.invalidate()

    async def _replayed(self, request_id: str) -> WriteReply | None:
        check_request_id(request_id)
        if request_id and (known := await asyncio.to_thread(self.index.store.request, request_id)):
            return WriteReply(known.count, known.version, self.doc_count())
        return None

    def _version(self, given: Version | None) -> Version:
        if given is None:
            return self.clock.now()
        self.clock.observe(given.clock)
        return given

    async def upsert(self, docs: list[Document], deadline_s: float | None = None, request_id: str = "",
                     version: Version | None = None) -> WriteReply:
        """Embed and store at one version; returns once the documents are durable and searchable. A request id
        seen before is answered as the first time, and not applied again."""
        self._require_ready()
        check_documents(docs, self.settings.document_limits())
        self._check_owned([d.id for d in docs])
        self.index.require_writable()  # before the embedding, which is the expensive part
        if replayed := await self._replayed(request_id):
            return replayed
        coerce = self.settings.metadata_coerce
        conform(docs, self.index.store.schema(), coerce)  # before the embedding: a refusal costs nothing
        vectors = await self._embed([document_text(d) for d in docs], False, deadline_s)
        version = self._version(version)

        def write(index: DocumentIndex):
            # Again behind the write gate: a write that came meanwhile may have typed a key first.
            conformed, _ = conform(docs, index.store.schema(), coerce)
            return index.apply([Write(doc, vector, version) for doc, vector in zip(conformed, vectors)], request_id)

        applied = await self._exclusive_write(write)
        return self._reply(applied, version)

    async def delete(self, ids: list[str], request_id: str = "", version: Version | None = None) -> WriteReply:
        """Tombstone ids at one version; the count is of those that were live."""
        self._require_ready()
        check_ids(ids, self.settings.document_limits())
        self._check_owned(ids)
        if replayed := await self._replayed(request_id):
            return replayed
        version = self._version(version)
        writes = [Write(Document(doc_id, "", ""), None, version) for doc_id in ids]
        applied = await self._exclusive_write(
            lambda index: index.apply(writes, request_id, answer=lambda outcome: outcome.deleted))
        return self._reply(applied, version)

    def _reply(self, applied, version: Version) -> WriteReply:
        self._count_writes(applied.count)
        if applied.newest is not None:
            self.clock.observe(applied.newest.clock)
        return WriteReply(applied.count, applied.version or version, self.doc_count(), applied.superseded,
                          applied.newest)

    async def get(self, ids: list[str]) -> list[Document]:
        """Stored documents among ``ids``, in request order."""
        self._require_ready()
        check_ids(ids, self.settings.document_limits())
        with self._leases.hold(self.index) as index:
            found = await asyncio.to_thread(index.get, ids)
        return [found[i] for i in ids if i in found]

    def served_snapshot_version(self) -> str | None:
        """The snapshot this replica serves now (None: it follows none, or none is served yet)."""
        return self.snapshots.current.version if self.snapshots and self.snapshots.current else None

    def _served_snapshot(self, snapshot_version: str) -> str:
        """The snapshot this replica serves, which must be the caller's (empty: any)."""
        self._require_ready()
        served = self.served_snapshot_version()
        if served is None:
            raise errors.FailedPrecondition("this recall server does not follow snapshots (--snapshot-dir)")
        if snapshot_version and snapshot_version != served:
            raise errors.FailedPrecondition(f"this replica serves snapshot {served!r}, not {snapshot_version!r}")
        return served

    async def changes(self, snapshot_version: str, after_seq: int, limit: int, ids: list[str] = (),
                      after_key: int = 0) -> ChangesPage:
        """Rows written since this replica adopted its snapshot, after ``(after_seq, after_key)``
        (``Recall.Changes``), or the rows of the ids asked for (in the order asked); this process's id; and whether
        the reply was cut short (more rows follow the last one, or ids after the last one answered are still to
        fetch)."""
        self._served_snapshot(snapshot_version)
        with self._leases.hold(self.index) as index:  # the index of the snapshot just checked: no await between
            if ids:
                # Only the count: ids a peer stores were valid when written, whatever the limits are now.
                errors.check_limit("ids (count)", len(ids), 1, PAGE)
                found = {w.doc.id: w for w in await asyncio.to_thread(index.store.rows, list(ids))}
                rows = [found[i] for i in ids if i in found]
            else:
                limit = min(limit or PAGE, PAGE)
                base = self.snapshots.base_seq
                cursor = (after_seq, after_key) if after_seq >= base else (base, 0)
                rows = await asyncio.to_thread(
                    lambda: next(index.store.writes_since(cursor[0], limit, after_key=cursor[1]), []))
        kept, cut = bounded_page(rows)
        return ChangesPage(kept, self.replica_id, cut or (not ids and len(rows) >= limit))

    def tombstones_purgeable(self) -> Version:
        """Tombstones older than this may be purged now: past ``tombstone_ttl_s``, and older than the served
        snapshot's build (whose corpus then postdates the delete)."""
        horizon = tombstone_horizon(self.settings.tombstone_ttl_s)
        if self.snapshots is not None and self.snapshots.current is not None:
            horizon = min(horizon, Version(clock_at(self.snapshots.current.created_at), ""))
        return horizon

    async def digests(self, snapshot_version: str = "", below_clock: int = 0) -> Digests:
        """Per bucket (rows, hash sum), the served snapshot, and the purge horizon's clock (0: none)."""
        served = self._served_snapshot(snapshot_version)
        with self._leases.hold(self.index) as index:
            def read():
                horizon = index.store.purge_horizon()
                digests = index.store.digests(tombstone_horizon(self.settings.tombstone_ttl_s), below_clock)
                return Digests(digests, served, 0 if horizon is None else horizon.clock)
            return await asyncio.to_thread(read)

    async def versions(self, snapshot_version: str, buckets: list[int]) -> tuple[list, str]:
        served = self._served_snapshot(snapshot_version)
        buckets = sorted(set(buckets))
        if any(not 0 <= b < BUCKETS for b in buckets):
            raise errors.InvalidArgument(f"buckets are 0-{BUCKETS - 1}")
        errors.check_limit("buckets (count)", len(buckets), 1, MAX_BUCKETS_PER_CALL)
        with self._leases.hold(self.index) as index:
            return await asyncio.to_thread(index.store.versions, buckets), served

    async def reconcile_plan(self, snapshot_version: str, listed: list[tuple[str, Version]], buckets: list[int],
                             peer_horizon: int) -> ReconcilePlan:
        """Against a peer's versions in these buckets (of the same snapshot): what to pull and what to tombstone
        (``replication.plan_reconcile``)."""
        self._served_snapshot(snapshot_version)
        with self._leases.hold(self.index) as index:  # the index of the snapshot just checked: no await between
            def plan():
                held = {doc_id: (version, deleted) for doc_id, version, deleted in index.store.versions(buckets)}
                return plan_reconcile(held, index.store.purge_horizon(), listed, peer_horizon)
            return await asyncio.to_thread(plan)

    async def apply_peer_writes(self, writes: list[Write], snapshot_version: str = "") -> int:
        """Apply writes copied from a peer serving ``snapshot_version`` (each only if newer; nothing if this replica
        serves another snapshot by then); returns how many were newer."""
        if not writes:
            return 0
        self.clock.observe(max(w.version.clock for w in writes))
        applied = await self._exclusive_write(lambda index: index.apply(writes), snapshot_version)
        self._count_writes(len(applied.keys))
        return len(applied.keys)

    async def purge_tombstones(self, horizon: Version | None = None) -> int:
        """Drop tombstones older than ``horizon`` (default: ``tombstones_purgeable()``). With peers, the sync loop
        calls it only once every peer agrees on every row below the horizon: a replica that may lack writes must
        not take absence as deletion."""
        horizon, ttl = horizon or self.tombstones_purgeable(), self.settings.tombstone_ttl_s
        dropped = await self._exclusive_write(lambda index: index.purge(horizon, ttl))
        if dropped:
            log.info("purged %d tombstones older than %.0f s", dropped, ttl)
        return dropped

    async def _purge_periodically(self) -> None:
        """For a server without peers (with peers, the sync loop purges after an agreeing round)."""
        period = min(3600.0, self.settings.tombstone_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self.purge_tombstones()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("purging tombstones failed; retrying in %.0f s", period)

    def doc_count(self) -> int:
        return self.index.store.count() if self.index else 0

    def info(self) -> dict:
        s = self.settings
        return {
            "model": self.embedder.name if self.embedder else s.model,
            "dims": self.embedder.dims if self.embedder else 0,
            "doc_count": self.doc_count(),
            "execution_provider": self.embedder.plan.provider if self.embedder else "",
            "execution_plan": self.embedder.plan.summary if self.embedder else "",
            "embedding_graph": self.embedder.graph if self.embedder else "",
            "index_embedding_graph": self.index.manifest.embedding_graph if self.index else "",
            "shard": self.index.manifest.shard if self.index else 0,
            "shards": self.index.manifest.shards if self.index else 1,
            "read_only": s.read_only,
            "default_mode": s.recall_mode,
            "hybrid_fusion": s.hybrid_fusion,
            "hybrid_dense_weight": s.hybrid_dense_weight,
            "prf_depth": s.prf_depth,
            "prf_weight": s.prf_weight,
            "lexical": self.index.store.has_lexical if self.index else False,
            "calibration": self.calibration,
            "snapshot": self.snapshots.state() if self.snapshots else None,
            "limits": {
                "max_k": s.max_k,
                "max_query_chars": s.max_query_chars,
                "max_embed_texts": s.max_embed_texts,
                "max_upsert_docs": s.max_upsert_docs,
                "max_doc_chars": s.max_doc_chars,
                "max_id_chars": s.max_id_chars,
            },
        }
