"""The rerank service logic: validate, tokenize off the event loop, batch, sort."""

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from rerank_server.config import RerankSettings
from rerank_server.cross_encoder import CrossEncoder
from rerank_server.score_cache import PairScoreCache
from twostage import errors, tracing
from twostage.batching import BatchPolicy, Cost, DynamicBatcher, PairCost, Submission
from twostage.metrics import watch_batcher, watch_score_cache
from twostage.model_store import resolve_model, sha256_of
from twostage.runtime import choose_providers

RATIO_MEMORY = 0.8  # in cost_ratio, each batch weighs this much less than the one after it


@dataclass(frozen=True)
class RerankQuery:
    query: str
    documents: list[str]
    top_n: int = 0
    model: str = ""
    deadline_s: float | None = None
    bypass_cache: bool = False
    allow_partial: bool = False  # answer with what was scored in time rather than DeadlineExceeded
    refuse_truncation: bool = False  # TooLong rather than cut a query or document to the window


@dataclass(frozen=True)
class RerankAnswer:
    ranked: list[tuple[int, float]]  # (document index, score), best first
    tokens: int
    queue_items: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    query_truncated: bool = False
    cached: int = 0  # pairs answered from the cache or from an identical pair in flight
    unscored: int = 0  # with allow_partial: documents the deadline left unscored (absent from ranked)
    cost_ratio: float = 0.0  # live batches' model time over the published cost model's prediction (0: none yet)
    cost: Cost = field(default_factory=Cost)  # what it cost the model, with the replica's current model time per pair


class Computed(NamedTuple):
    """What the model gave for some pairs: a score each, in their order (None: the deadline left it unscored),
    and the tokens of the pairs it scored."""

    values: list[float | None]
    tokens: int


class RerankService:
    def __init__(self, settings: RerankSettings, model: CrossEncoder | None = None):
        self.settings = settings
        self.model = model
        self._owns_model = model is None  # a model handed in is its owner's to close (it may serve others)
        self.batcher: DynamicBatcher | None = None
        self.cache: PairScoreCache | None = None
        # Computations of shared pairs, held here: their caller may go away, and the loop keeps tasks weakly.
        self._computing: set[asyncio.Task] = set()
        self.cost: PairCost | None = None  # fitted at load (measure_cost)
        self.cost_ratio = 0.0  # live batches' model time over what ``cost`` predicted (0: none yet)
        self._ratio_sums = (0.0, 0.0)  # their model time and its prediction, recent batches weighted most
        self._characters = (0.0, 0.0)  # characters and tokens of pairs read whole, recent ones weighted most
        self._specials = 0  # tokens a pair takes besides its texts' own

    async def start(self) -> None:
        if self.model is None:
            self.model = await asyncio.to_thread(
                CrossEncoder, resolve_model(self.settings.model), self.settings, self.settings.max_length
            )
        if self.settings.score_cache_mb > 0:
            identity = await asyncio.to_thread(self._model_identity)
            self.cache = PairScoreCache(int(self.settings.score_cache_mb * 2**20), identity)
            watch_score_cache(self.cache)
        self._specials = (await asyncio.to_thread(self.model.encode_pairs, "", [""]))[0].length
        plan = getattr(self.model, "plan", None)  # a stand-in model (tests' fakes) has none: it batches as given
        policy = BatchPolicy.from_settings(self.settings)
        self.batcher = DynamicBatcher("rerank", self.model.score, plan.policy(policy) if plan else policy)
        watch_batcher(self.batcher)
        self.batcher.start()
        # Warm up: the first run allocates and optimizes; keep that off the first request.
        await self.rerank(RerankQuery("warm up", ["a short document", "another, slightly longer document"]))
        # The warm-up's cost is no guide (it allocates): learned from it, the model time per pair callers budget
        # with would start far off, and pairs that fit would be refused as predicted late.
        self.batcher.reset_costs()
        # What a pair costs here by its length, published in Info: gateways budget with it from their first
        # request instead of a guess. Timed on the model directly, never through the batcher, whose running
        # estimate (ms_per_item in every answer's cost) is of live traffic only.
        self.cost = await asyncio.to_thread(self.measure_cost)
        self._characters = (0.0, 0.0)  # nor are the warm-up's texts anyone's corpus
        self.batcher.add_observer(self._observe_batch)

    def measure_cost(self, most_repeats: int = 3, allowance_s: float = 1.0) -> PairCost:
        """Fit the cost per pair (``PairCost``) from batches of short pairs (about 32 tokens, as product
        descriptions or passages make) and of pairs the model reads in full (``max_length``; documents are cut
        there), timed alternately: the median of up to ``most_repeats`` repeats at each length, as many as
        fit in about ``allowance_s`` (at least one), so that a moment's contention at startup moves the
        estimate little while a slow model does not hold startup up."""
        model = self.model
        parallel = model.plan.parallelism if getattr(model, "plan", None) else 1
        query = "how much does a pair cost"
        longest = model.max_length
        lengths = sorted({min(32, longest), longest})
        timed: dict[int, list[float]] = {}
        batches = []
        for target in lengths:
            # Pairs of about ``target`` tokens (one word a token, the query's and the specials aside), or cut there.
            words = target if target == longest else max(1, target - 12)
            # At least one pair for each item the plan computes at once (its sessions), or a pair costs too much.
            count = max(1, min(max(4 if target < longest else 2, parallel), self.batcher.policy.max_batch_size,
                               self.batcher.policy.max_batch_tokens // target))
            pairs = model.encode_pairs(query, [f"{i} " + " ".join(["cost"] * words) for i in range(count)])
            batches.append((max(p.length for p in pairs), pairs))
        started = time.perf_counter()
        for repeat in range(most_repeats):
            if repeat and time.perf_counter() - started > allowance_s:
                break
            for tokens, pairs in batches:
                began = time.perf_counter()
                model.score(pairs)
                timed.setdefault(tokens, []).append(1000 * (time.perf_counter() - began) / len(pairs))
        return PairCost.fit([(tokens, statistics.median(ms)) for tokens, ms in timed.items()], longest)

    def _observe_batch(self, size: int, real_tokens: int, padded_tokens: int, waits: list, compute_s: float) -> None:
        """Live batches against the load-time model: cost_ratio is their model time over the model's prediction
        for them, summed over recent batches (each older one weighs RATIO_MEMORY times less), so a batch weighs
        by its work and a batch of one tiny pair barely moves it. Predicted from the pairs' own lengths, as
        callers price them (they cannot know the padding): the padding of batches as they come is in the ratio."""
        predicted = self.cost.batch_ms(size, real_tokens) if self.cost else 0.0
        if predicted <= 0:
            return
        taken, expected = self._ratio_sums
        self._ratio_sums = (RATIO_MEMORY * taken + 1000 * compute_s, RATIO_MEMORY * expected + predicted)
        self.cost_ratio = self._ratio_sums[0] / self._ratio_sums[1]

    def _count_characters(self, query: str, documents: list[str], pairs: list) -> None:
        """Characters per token of the pairs read whole (a pair cut at max_length says nothing), recent
        requests weighted most: callers estimate a pair's tokens from its text with it."""
        read_whole = [(len(query) + len(d), p.length - self._specials)
                      for d, p in zip(documents, pairs) if p.length < self.model.max_length]
        if read_whole:
            chars, tokens = self._characters
            self._characters = (0.99 * chars + sum(c for c, _ in read_whole),
                                0.99 * tokens + sum(t for _, t in read_whole))

    @property
    def chars_per_token(self) -> float:
        chars, tokens = self._characters
        return chars / tokens if tokens > 0 else 0.0

    @property
    def ms_per_pair(self) -> float:
        """One pair of max_length tokens by the cost model, corrected by live batches once there are some."""
        return self.cost.pair_ms(self.cost.max_length) * (self.cost_ratio or 1.0) if self.cost else 0.0

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close(drain=True)
        if self._owns_model and self.model is not None:
            await asyncio.to_thread(self.model.close)  # after the drain: no batch runs on its sessions

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

    def _model_identity(self) -> str:
        """What a score depends on besides the text: the model file, how much of a pair it reads, the graph
        (plans of one graph give the same scores)."""
        model_file = getattr(self.model, "model_file", None)
        manifest = getattr(self.model, "manifest", None)
        recorded = manifest.sha256.get(manifest.onnx_file) if manifest else None  # checked when fetched
        digest = recorded or (sha256_of(model_file) if model_file else self.model.name)
        plan = getattr(self.model, "plan", None)
        graph = f"{plan.graph}:{plan.invariant}" if plan else str(self.settings.batch_invariant)
        return f"{digest}:{self.model.max_length}:{self.model.max_query_tokens}:{graph}"

    async def _compute(self, query: str, documents: list[str], deadline_s: float | None, timings: dict,
                       spent: list[Submission], partial: bool = False, answered_elsewhere: bool = False) -> Computed:
        """Scores from the model; with ``partial`` None for a document its deadline left
        unscored (at least one is scored, or it is DeadlineExceeded, unless ``answered_elsewhere``: other
        scores already make the partial answer, and these may all be None). The batcher's submission, which
        says what it cost, is added to ``spent``."""
        started = time.perf_counter()
        with tracing.span("tokenize") as span:
            pairs = await asyncio.to_thread(self.model.encode_pairs, query, documents)  # the query is already fitted
            if span.is_recording():
                span.set_attributes({"twostage.pairs": len(pairs), "twostage.tokens": sum(p.length for p in pairs)})
        self._count_characters(query, documents, pairs)
        timings["tokenize_ms"] = timings.get("tokenize_ms", 0.0) + 1000 * (time.perf_counter() - started)
        try:
            done = await self.batcher.submit(pairs, [p.length for p in pairs], deadline_s, partial=partial)
        except errors.DeadlineExceeded:
            if not (partial and answered_elsewhere):
                raise
            return Computed([None] * len(documents), 0)
        spent.append(done)
        values = [None if v is None else float(v) for v in done.values]
        return Computed(values, sum(p.length for p, v in zip(pairs, values) if v is not None))

    async def rerank(self, request: RerankQuery) -> RerankAnswer:
        if self.batcher is None:
            raise errors.NotReady("rerank server is still loading its model")
        started = time.perf_counter()
        self.validate(request)
        if request.refuse_truncation:
            await asyncio.to_thread(self.model.check_fits, request.query, request.documents)
        timings = {"tokenize_ms": 0.0}
        spent: list[Submission] = []  # the batcher's submissions for this request's pairs (none: all cached)
        with tracing.span("tokenize query"):
            query, query_truncated = await asyncio.to_thread(self.model.fit_query, request.query)
        timings["tokenize_ms"] = 1000 * (time.perf_counter() - started)
        documents = request.documents
        if self.cache is None or request.bypass_cache:
            values, tokens = await self._compute(query, documents, request.deadline_s, timings, spent,
                                                 request.allow_partial)
            scores = {i: v for i, v in enumerate(values) if v is not None}
            cached = 0
        else:
            scores, tokens, claimed = await self._cached_scores(query, documents, request.deadline_s, timings,
                                                                 spent, request.allow_partial)
            cached = len(documents) - claimed
        if (span := tracing.current_span()).is_recording():
            span.set_attributes({"twostage.documents": len(documents), "twostage.cached": cached,
                                 "twostage.unscored": len(documents) - len(scores), "twostage.tokens": tokens,
                                 "twostage.query_truncated": query_truncated})
        ranked = sorted(scores.items(), key=lambda pair: -pair[1])
        if request.top_n:
            ranked = ranked[: request.top_n]
        # The one place a request's cost is formed: its queue wait and model time, and what one pair of live
        # traffic costs the model now (on average over its lengths). Its timings repeat the first two.
        cost = Cost.of(spent, self.batcher.ms_per_item)
        return RerankAnswer(
            ranked=ranked,
            tokens=tokens,
            queue_items=self.batcher.queued_items,
            timings_ms={
                **timings,
                "queue_ms": cost.queue_ms,
                "compute_ms": cost.service_ms,
                "total_ms": 1000 * (time.perf_counter() - started),
            },
            query_truncated=query_truncated,
            cached=cached,
            unscored=len(documents) - len(scores),
            cost_ratio=self.cost_ratio,
            cost=cost,
        )

    async def _cached_scores(self, query: str, documents: list[str], deadline_s: float | None, timings: dict,
                             spent: list[Submission], partial: bool = False):
        """Scores from the cache, from identical pairs in flight, and from the model for the rest:
        (position -> score, tokens computed, pairs this request took on to compute: its cache misses). With
        ``partial``, a position the deadline left unscored is absent."""
        cache = self.cache
        keys = [cache.key(query, document) for document in documents]
        scores: dict[int, float] = {}
        tokens = claimed = 0
        positions = list(range(len(documents)))
        # A second round for pairs whose computation failed for its own caller's reasons (its deadline):
        # computed here then, or awaited from whoever took them on meanwhile.
        for _ in range(2):
            cached, awaited, mine = cache.split([keys[p] for p in positions])
            scores.update((positions[i], score) for i, score in cached.items())
            awaited = {positions[i]: future for i, future in awaited.items()}
            mine = [positions[i] for i in mine]
            if mine:
                values, more = await self._compute_shared(
                    [keys[p] for p in mine], query, [documents[p] for p in mine], deadline_s, timings, spent,
                    partial, answered_elsewhere=bool(scores or awaited))
                scores.update((p, v) for p, v in zip(mine, values) if v is not None)
                tokens, claimed = tokens + more, claimed + len(mine)
            positions = await self._await_shared(awaited, scores)
            if not positions:
                break
        if len(scores) < len(documents) and not (partial and scores):
            raise errors.DeadlineExceeded("rerank: the deadline passed before the pairs were scored")
        return scores, tokens, claimed

    async def _compute_shared(self, keys: list[bytes], query: str, documents: list[str], deadline_s: float | None,
                              timings: dict, spent: list[Submission], partial: bool,
                              answered_elsewhere: bool) -> Computed:
        """_compute for pairs registered in flight, which other requests may await: it runs in a task of its
        own, so this caller going away neither cancels it nor leaves the others to compute the pairs again;
        its scores are stored and each of its futures resolved however it ends."""
        cache = self.cache

        async def compute() -> Computed:
            try:
                computed = await self._compute(query, documents, deadline_s, timings, spent, partial,
                                               answered_elsewhere)
            except BaseException as error:
                cache.finish(keys, None, error)
                raise
            cache.finish(keys, computed.values,
                         errors.DeadlineExceeded("the deadline passed before this pair was scored"))
            return computed

        task = asyncio.get_running_loop().create_task(compute())
        self._computing.add(task)
        task.add_done_callback(self._computation_ended)
        return await asyncio.shield(task)

    def _computation_ended(self, task: asyncio.Task) -> None:
        self._computing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone; the others had the outcome through the cache

    @staticmethod
    async def _await_shared(awaited: dict, scores: dict) -> list[int]:
        """Wait for pairs other requests compute, filling ``scores``; the positions whose computation failed
        for its caller's own reasons. asyncio.wait, not gather: a caller going away must not cancel futures
        that other requests await."""
        if not awaited:
            return []
        await asyncio.wait(set(awaited.values()))
        failed = []
        for position, future in awaited.items():
            error = asyncio.CancelledError() if future.cancelled() else future.exception()
            if isinstance(error, errors.ModelFailure):
                raise error  # the model failed on this very pair
            if error is None:
                scores[position] = future.result()
            else:
                failed.append(position)
        return failed

    def info(self) -> dict:
        s = self.settings
        return {
            "ms_per_pair": self.ms_per_pair,
            "pair_fixed_ms": self.cost.fixed_ms if self.cost else 0.0,
            "pair_ms_per_token": self.cost.ms_per_token if self.cost else 0.0,
            "cost_ratio": self.cost_ratio,
            "chars_per_token": self.chars_per_token,
            "model": self.model.name if self.model else s.model,
            "max_length": s.max_length,
            "execution_provider": self.model.plan.provider if self.model else choose_providers(s.provider)[0],
            "execution_plan": self.model.plan.summary if self.model else "",
            "limits": {
                "max_documents": s.max_documents,
                "max_document_chars": s.max_document_chars,
                "max_query_chars": s.max_query_chars,
                "max_query_tokens": self.model.max_query_tokens if self.model else s.max_length // 2,
                "max_queue_items": s.max_queue_items,
            },
        }
