"""Recall, then rerank, within the caller's budget.

The effective budget is the smallest of the request's ``budget_ms``, the
client's deadline and the configured maximum. Recall must answer (without
candidates there is nothing to return); rerank gets what is left minus a
return margin. The rerank pool's live cost model, which prices each pair by
its length, decides how many of the top candidates fit in that time; the rest
keep their recall order after the reranked ones. Whatever is cut is said in
``degraded_reason``; the answer never turns into an error or a hang while
recall has answered.

Traced, a search is a span with recall and rerank as children and each rerank
round (the first, then each top-up) as a child of rerank; it carries recall_k,
the budget and the share of it used, the candidates reranked and the
degradation codes.
"""

import asyncio
import dataclasses
import itertools
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from gateway.clients import RecallCandidate, RecallReply
from gateway.config import GatewaySettings
from gateway.degradation import Degradable, Degradation, DegradationCode
from gateway.metrics import observe_degradations, observe_search
from gateway.recall_tier import RecallShard
from gateway.rerank_pool import RerankOutcome, RerankPool, is_callers_mistake
from twostage import errors, feedback, tracing
from twostage.corpus import MetadataValue, titled_text
from twostage.feedback import Feedback
from twostage.filters import Filter
from twostage.recall_mode import RecallMode
from twostage.scoring import (
    DEFAULT_CALIBRATION,
    HYBRID_DENSE_WEIGHT,
    Calibration,
    Fusion,
    HybridFusion,
    fuse_recall,
    mean_calibration,
    rank_final,
    relevance,
)

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def is_request_id(text: str) -> bool:
    """Whether ``text`` is a request id as requests may carry one (1-128 of letters, digits and ._:/-)."""
    return _REQUEST_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class SearchQuery:
    query: str
    top_k: int = 0
    recall_k: int = 0
    budget_ms: int = 0
    request_id: str = ""
    deadline_s: float | None = None  # client deadline, time.monotonic() clock
    fusion: Fusion | None = None  # None: the server default
    fusion_alpha: float | None = None
    skip_rerank: bool = False
    score_threshold: float | None = None
    recall_mode: RecallMode | None = None  # None: the recall servers' default
    filter: Filter | None = None
    prf_depth: int | None = None  # None: the recall servers' setting
    prf_weight: float | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float
    rerank_score: float | None
    recall_rank: int
    recall_score: float
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    relevance: float | None = None
    dense_score: float = 0.0
    lexical_score: float = 0.0


@dataclass
class SearchResult(Degradable):
    hits: list[Hit]
    request_id: str
    degradations: list[Degradation] = field(default_factory=list)
    candidates: int = 0
    reranked: int = 0
    rerank_cached: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    budget_ms: float = 0.0  # the time it was given: the budget or the client's deadline, whichever is shorter
    recall_mode: RecallMode | None = None  # the mode the recall shards answered in
    calibration: Calibration | None = None  # the answering shards' fitted score calibration (None: none fitted)


@dataclass(frozen=True)
class RerankTextsQuery:
    """The caller's own documents to score against a query (Gateway.Rerank)."""

    query: str
    documents: list[str]
    top_n: int = 0
    budget_ms: int = 0
    request_id: str = ""
    deadline_s: float | None = None  # client deadline, time.monotonic() clock
    model: str = ""
    # Every document scored, or an error: never a partial answer. For clients that cannot tell one (the HTTP
    # face's TEI and Cohere routes): a request the budget cannot cover is refused before any work.
    whole: bool = False
    refuse_truncation: bool = False  # TooLong rather than cut the query or a document to the model's window


@dataclass(frozen=True)
class RankedText:
    index: int  # position in the request
    score: float | None  # the cross-encoder's logit; None: the budget left it unscored
    relevance: float | None


@dataclass
class RerankTextsResult(Degradable):
    results: list[RankedText]
    request_id: str
    model: str
    degradations: list[Degradation] = field(default_factory=list)
    scored: int = 0
    cached: int = 0
    tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    budget_ms: float = 0.0  # the time it was given: the budget or the client's deadline, whichever is shorter


@dataclass
class StageLimits:
    """What the stages accept, from their Info; the gateway checks requests against it so that a
    caller's mistake is refused at the edge and never reaches (or is blamed on) a replica."""

    recall_max_query_chars: int | None = None
    recall_max_k: int | None = None
    recall_max_upsert_docs: int | None = None
    recall_max_doc_chars: int | None = None
    recall_max_id_chars: int | None = None
    rerank_max_query_chars: int | None = None
    rerank_max_documents: int | None = None
    rerank_max_document_chars: int | None = None
    recall_max_embed_texts: int | None = None
    # How the shards fuse hybrid lists (None: not known yet); the gateway fuses their union alike.
    recall_hybrid_fusion: HybridFusion | None = None
    recall_hybrid_dense_weight: float = HYBRID_DENSE_WEIGHT
    recall_prf_depth: int | None = None  # the recall servers' pseudo-relevance feedback settings
    recall_prf_weight: float | None = None

    def recall_feedback(self) -> Feedback:
        """Feedback for a search that does not say: the recall servers' settings, their defaults until known."""
        return Feedback(feedback.DEFAULT.depth if self.recall_prf_depth is None else self.recall_prf_depth,
                        feedback.DEFAULT.weight if self.recall_prf_weight is None else self.recall_prf_weight)
    # What the stages serve, for Rerank and Embed replies and the HTTP face's /info.
    rerank_model: str | None = None
    rerank_max_length: int | None = None
    embed_model: str | None = None
    embed_dims: int | None = None

    def update(self, **limits: int | str) -> None:
        for name, value in limits.items():
            if value:
                setattr(self, name, value)


class RequestBudget(NamedTuple):
    """What every read request has, checked and defaults filled."""

    budget_s: float  # the budget, or the default, capped at max_budget_ms
    request_id: str  # the request's, or a new one


class ResolvedSearch(NamedTuple):
    """A Search request's sizes and budget, checked and defaults filled."""

    top_k: int
    recall_k: int
    budget_s: float
    request_id: str


def resolve_budget(settings: GatewaySettings, budget_ms: int, request_id: str) -> RequestBudget:
    errors.check_limit("budget_ms", budget_ms, 0, 2**31 - 1)
    if request_id and not is_request_id(request_id):
        raise errors.InvalidArgument("request_id must be 1-128 characters of letters, digits and ._:/-")
    return RequestBudget(min(budget_ms or settings.default_budget_ms, settings.max_budget_ms) / 1000,
                         request_id or uuid.uuid4().hex)


class SearchPipeline:
    def __init__(self, settings: GatewaySettings, recall: list[RecallShard], rerank: RerankPool,
                 limits: StageLimits | None = None):
        self.settings = settings
        self.recall = recall
        self.rerank = rerank
        self.limits = limits or StageLimits()
        # What calibrated fusion used last: the shards' fit with the settings' overrides (Info reports it).
        self.calibration_in_use: Calibration = settings.calibration(None)

    async def close(self) -> None:
        await asyncio.gather(*(shard.close() for shard in self.recall), self.rerank.close())

    def max_query_chars(self) -> int:
        return min(v for v in (self.settings.max_query_chars, self.limits.recall_max_query_chars,
                               self.limits.rerank_max_query_chars) if v)

    def max_recall_k(self) -> int:
        return min(v for v in (self.settings.max_recall_k, self.limits.recall_max_k) if v)

    def resolve(self, q: SearchQuery) -> ResolvedSearch:
        """Validate and fill defaults."""
        s = self.settings
        errors.check_text("query", q.query, self.max_query_chars())
        # A field left at 0 takes its default, bounded by the field that was given.
        recall_k = q.recall_k or max(s.default_recall_k, q.top_k)
        top_k = q.top_k or min(s.default_top_k, recall_k)
        errors.check_limit("top_k", top_k, 1, s.max_top_k)
        errors.check_limit("recall_k", recall_k, 1, self.max_recall_k())
        if top_k > recall_k:
            raise errors.InvalidArgument(f"top_k ({top_k}) must not exceed recall_k ({recall_k})")
        budget_s, request_id = resolve_budget(self.settings, q.budget_ms, q.request_id)
        if q.fusion is not None and q.fusion not in tuple(Fusion):
            raise errors.InvalidArgument(f"fusion must be one of {', '.join(Fusion)}, got {q.fusion!r}")
        if q.fusion_alpha is not None and not 0 <= q.fusion_alpha <= 1:
            raise errors.InvalidArgument(f"fusion_alpha must be between 0 and 1, got {q.fusion_alpha}")
        if q.score_threshold is not None and not math.isfinite(q.score_threshold):
            raise errors.InvalidArgument("score_threshold must be a finite number")
        return ResolvedSearch(top_k, recall_k, budget_s, request_id)

    def max_rerank_documents(self) -> int:
        return min(v for v in (self.settings.max_recall_k, self.limits.rerank_max_documents) if v)

    def resolve_rerank(self, q: RerankTextsQuery) -> RequestBudget:
        """Validate a Rerank request as the rerank tier would, before any replica sees it."""
        errors.check_text("query", q.query, min(v for v in (self.settings.max_query_chars,
                                                            self.limits.rerank_max_query_chars) if v))
        most = self.max_rerank_documents()
        errors.check_limit("documents (count)", len(q.documents), 1, most)
        max_chars = self.limits.rerank_max_document_chars or 100_000
        for i, document in enumerate(q.documents):
            if len(document) > max_chars:
                raise errors.InvalidArgument(f"documents[{i}] is {len(document)} characters; the limit is {max_chars}")
        errors.check_limit("top_n", q.top_n, 0, most)
        served = self.limits.rerank_model
        if q.model and served and q.model != served:
            raise errors.InvalidArgument(f"unknown model {q.model!r}; the rerank tier serves {served!r}")
        return resolve_budget(self.settings, q.budget_ms, q.request_id)

    async def rerank_texts(self, q: RerankTextsQuery) -> RerankTextsResult:
        """Score the caller's documents within the budget: as many as it affords (more as time frees up), the
        rest left unscored after them (a partial answer, degraded). With none scored it is the tier's error."""
        with tracing.span("rerank texts") as span:
            result = await self._rerank_texts(q)
            if span.is_recording():
                total_ms = result.timings_ms.get("total_ms", 0.0)
                span.set_attributes({
                    "twostage.request_id": result.request_id, "twostage.documents": len(q.documents),
                    "twostage.top_n": q.top_n, "twostage.scored": result.scored, "twostage.cached": result.cached,
                    "twostage.tokens": result.tokens, "twostage.budget_ms": round(result.budget_ms, 1),
                    "twostage.total_ms": round(total_ms, 2),
                    "twostage.budget_used": round(total_ms / result.budget_ms, 4) if result.budget_ms > 0 else 1.0})
                _annotate_degradations(span, result)
            return result

    async def _rerank_texts(self, q: RerankTextsQuery) -> RerankTextsResult:
        budget_s, request_id = self.resolve_rerank(q)
        s = self.settings
        start = time.monotonic()
        deadline = start + budget_s if q.deadline_s is None else min(start + budget_s, q.deadline_s)
        rerank_deadline = deadline - s.return_margin_ms / 1000
        left_ms = 1000 * (rerank_deadline - start)
        if not self.rerank.available():
            raise errors.Unavailable("no rerank replica is available; retry later")
        if q.whole:
            self._admit_whole(q.query, q.documents, left_ms, 1000 * (deadline - start))
            depth = len(q.documents)
        else:
            depth = self._affordable_depth(left_ms, q.query, q.documents)
        if depth == 0:
            raise errors.DeadlineExceeded(f"{1000 * (deadline - start):.0f} ms affords no pair on the rerank tier "
                                          "now; allow more budget_ms (or a longer deadline)")
        outcome = await self._rerank_with_top_ups(q.query, q.documents, depth, rerank_deadline, request_id,
                                                  q.refuse_truncation)
        result = RerankTextsResult([], request_id, self.limits.rerank_model or "", budget_ms=1000 * (deadline - start))
        if q.whole and len(outcome.scores) < len(q.documents):
            self._refuse_part(outcome, len(q.documents), 1000 * (deadline - start), request_id)
        if outcome.error is not None and not outcome.scores:
            if is_callers_mistake(outcome.error):
                raise outcome.error
            log.warning("request %s: rerank failed: %s", request_id, outcome.error)
            # Worded here: the pool's own messages may name replicas' addresses, which are for the log.
            raise {
                errors.DeadlineExceeded: errors.DeadlineExceeded(
                    f"no document was scored within {1000 * (deadline - start):.0f} ms; allow more budget_ms "
                    "(or a longer deadline)"),
                errors.Overloaded: errors.Overloaded("every rerank replica shed the load; retry later"),
            }.get(type(outcome.error), errors.Unavailable("no rerank replica could score the documents"))
        if outcome.query_truncated:
            result.degrade(DegradationCode.QUERY_TRUNCATED, "rerank read the start of the query")
        if len(outcome.scores) < len(q.documents):
            result.degrade(DegradationCode.RERANK_PARTIAL, f"{len(outcome.scores)} of {len(q.documents)} scored")
        ranked = sorted(outcome.scores.items(), key=lambda pair: -pair[1])
        result.results = [RankedText(i, score, relevance(score)) for i, score in ranked] + [
            RankedText(i, None, None) for i in range(len(q.documents)) if i not in outcome.scores]
        if q.top_n:
            result.results = result.results[:q.top_n]
        result.scored, result.cached = len(outcome.scores), min(outcome.cached, len(outcome.scores))
        result.tokens = outcome.tokens
        result.timings_ms = {**{f"rerank.{name}": ms for name, ms in outcome.timings_ms.items()},
                             "rerank_ms": 1000 * (time.monotonic() - start)}
        result.timings_ms["total_ms"] = result.timings_ms["rerank_ms"]
        observe_degradations(result.degradations)
        return result

    async def search(self, q: SearchQuery) -> SearchResult:
        with tracing.span("search") as span:
            result = await self._search(q)
            if span.is_recording():
                _annotate(span, result)
            return result

    async def _search(self, q: SearchQuery) -> SearchResult:
        top_k, recall_k, budget_s, request_id = self.resolve(q)
        prf = feedback.check(q.prf_depth, q.prf_weight, self.limits.recall_feedback(), ("recall_k", recall_k))
        if (span := tracing.current_span()).is_recording():
            span.set_attributes({"twostage.top_k": top_k, "twostage.recall_k": recall_k,
                                 "twostage.request_id": request_id})
        start = time.monotonic()
        deadline = start + budget_s if q.deadline_s is None else min(start + budget_s, q.deadline_s)
        result = SearchResult(hits=[], request_id=request_id)
        s = self.settings
        left_ms = result.budget_ms = 1000 * (deadline - start)
        if q.skip_rerank or left_ms < 2 * (s.min_rerank_ms + s.return_margin_ms):
            # Rerank will not run: recall may use all the time there is, so a tiny budget still gets an answer.
            recall_deadline = deadline
        else:
            # Recall's share of the time actually left (a short client deadline included), not of the nominal budget.
            recall_deadline = start + (deadline - start) * s.recall_budget_share
        try:
            with tracing.span("recall") as span:
                candidates = await self._recall(q, recall_k, recall_deadline, request_id, result, prf)
                if span.is_recording():
                    span.set_attributes({"twostage.recall_k": recall_k, "twostage.shards": len(self.recall),
                                         "twostage.candidates": len(candidates),
                                         "twostage.recall_mode": result.recall_mode or ""})
        except errors.DeadlineExceeded:
            raise errors.DeadlineExceeded(
                f"no answer within {left_ms:.0f} ms: recall did not answer in time; allow more budget_ms "
                "(or a longer deadline)"
            ) from None
        recall_done = time.monotonic()
        result.timings_ms["recall_ms"] = 1000 * (recall_done - start)
        result.candidates = len(candidates)
        fusion = q.fusion or s.fusion
        alpha = s.fusion_alpha if q.fusion_alpha is None else q.fusion_alpha
        lexical = result.recall_mode in (RecallMode.LEXICAL, RecallMode.HYBRID)

        calibration = s.calibration(result.calibration)
        if result.calibration is not None:
            self.calibration_in_use = calibration

        def rank(scores: dict[int, float]) -> list[Hit]:
            return self._rank(candidates, scores, fusion, alpha, calibration, lexical)

        scores = {}
        if candidates and not q.skip_rerank:
            with tracing.span("rerank") as span:
                scores = await self._rerank(q.query, candidates, deadline, request_id, result, top_k, rank)
                if span.is_recording():
                    span.set_attributes({"twostage.candidates": len(candidates), "twostage.reranked": len(scores),
                                         "twostage.rerank_cached": result.rerank_cached if scores else 0})
        result.timings_ms["rerank_ms"] = 1000 * (time.monotonic() - recall_done)
        result.reranked = len(scores)
        hits = rank(scores)[:top_k]
        if q.score_threshold is not None:
            hits = [h for h in hits if h.score >= q.score_threshold]  # scores descend: this cuts a tail
        result.hits = hits
        result.timings_ms["total_ms"] = 1000 * (time.monotonic() - start)
        observe_search(result)
        return result

    async def _recall(
        self, q: SearchQuery, k: int, deadline: float, request_id: str, result: SearchResult, prf: Feedback
    ) -> list[RecallCandidate]:
        """Query every shard in parallel; merge. Fails only if every shard fails. Pseudo-relevance feedback: one
        shard runs it itself; over several, the gateway forms it from the global first pass (``_feedback_round``)."""
        asked = q.prf_depth is not None or q.prf_weight is not None
        # The mode the request names decides now whether feedback can run (the servers' default mode: after the
        # first round), so a lexical or an unasked dense search over several shards asks for no vectors.
        across = feedback.for_mode(prf, q.recall_mode, asked).active and len(self.recall) > 1
        started = time.monotonic()
        # One shard applies its own settings unless the request says: the same as a direct search of it (a default
        # depth above k reads every hit there too). Several are told exactly (off in their first round), so none
        # runs feedback from its own top hits alone.
        own = Feedback(min(prf.depth, k), prf.weight) if asked else None
        answered, failures = await self._ask(q, k, deadline, request_id, self.recall,
                                             prf=feedback.OFF if len(self.recall) > 1 else own,
                                             return_vectors=k if across else 0)
        if failures:
            result.degrade(DegradationCode.RECALL_PARTIAL,
                           f"{len(answered)} of {len(answered) + len(failures)} shards answered")
        replies = [reply for _, reply in answered]
        result.recall_mode = replies[0].mode
        result.calibration = mean_calibration([r.calibration for r in replies if r.calibration is not None])
        _add_timings(result, "recall", replies)
        candidates = self._merge(replies, k)
        if across:
            return await self._feedback_round(q, k, deadline, request_id, result,
                                              feedback.for_mode(prf, result.recall_mode, asked), candidates, answered,
                                              time.monotonic() - started)
        if skipped := next((r.prf_skipped for r in replies if r.prf_skipped), ""):
            result.degrade(DegradationCode.PRF_SKIPPED, skipped)
        if prf_ms := [r.timings_ms["prf_ms"] for r in replies if "prf_ms" in r.timings_ms]:
            result.timings_ms["prf_ms"] = max(prf_ms)
        return candidates

    async def _ask(self, q: SearchQuery, k: int, deadline: float, request_id: str, shards: list[RecallShard],
                   replicas: dict[RecallShard, str] | None = None,
                   **feedback_fields) -> tuple[list[tuple[RecallShard, RecallReply]], list[BaseException]]:
        """One round: these shards at once (each on the replica ``replicas`` names for it, when it can);
        ((shard, reply) for each that answered, the failures). Raises when every shard failed."""
        calls = [shard.search(q.query, k, deadline, request_id, q.recall_mode, q.filter,
                              replica=(replicas or {}).get(shard), **feedback_fields)
                 for shard in shards]
        if len(calls) == 1:  # awaited as it is: a task for it would cost a turn of the event loop
            try:
                replies = [await calls[0]]
            except Exception as error:  # noqa: BLE001 - judged below, as gather's would be
                replies = [error]
        else:
            replies = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in replies if isinstance(r, BaseException)]
        if len(failures) == len(replies):
            raise _worst(failures)
        for failure in failures:  # e.g. a filter of the wrong type for a key one shard has typed: not an outage
            if isinstance(failure, errors.InvalidArgument):
                raise failure
        for failure in failures:
            log.warning("request %s: recall shard failed: %s", request_id, failure)
        return [(shard, reply) for shard, reply in zip(shards, replies) if not isinstance(reply, BaseException)], \
            failures

    def _merge(self, answered: list[RecallReply], k: int, refined: bool = False) -> list[RecallCandidate]:
        """The shards' candidates as one list. ``refined``: a feedback round, whose hybrid order fused each
        candidate's cosine with the refined vector."""
        merged: dict[str, RecallCandidate] = {}
        for reply in answered:
            for candidate in reply.candidates:
                if candidate.id not in merged or merged[candidate.id].score < candidate.score:
                    merged[candidate.id] = candidate
        hybrid = self.limits.recall_hybrid_fusion
        if len(answered) > 1 and hybrid and any(reply.mode == RecallMode.HYBRID for reply in answered):
            # Fused scores are relative to each shard's lists: fuse the union again, as one index would.
            pool = list(merged.values())
            dense = [c.prf_dense_score if refined else c.dense_score for c in pool]
            fused = fuse_recall(range(len(pool)), dense, [c.lexical_score for c in pool], hybrid,
                                self.limits.recall_hybrid_dense_weight)
            return [dataclasses.replace(pool[i], score=score) for i, score in fused[:k]]
        return sorted(merged.values(), key=lambda c: -c.score)[:k]

    async def _feedback_round(self, q: SearchQuery, k: int, deadline: float, request_id: str, result: SearchResult,
                              prf: Feedback, first: list[RecallCandidate],
                              answered: list[tuple[RecallShard, RecallReply]], first_s: float) -> list[RecallCandidate]:
        """Feedback across shards: the refined vector from the top hits of the global first pass (which may sit on
        any shard), as one index forms it from its own; then the shards that answered the first round searched
        with it, each on the replica that answered it (which kept the query's BM25 matches for it). The first
        round's candidates stand, marked prf_skipped, when too little time is left or a shard fails the second."""
        top = [c.vector for c in first[:prf.depth] if c.vector is not None]
        query_vector = next((r.query_vector for _, r in answered if r.query_vector is not None), None)
        if not prf.active or not top or query_vector is None:
            return first
        left_s = deadline - time.monotonic()
        if left_s < first_s:  # the second round costs about what the first did (less: no embedding)
            result.degrade(DegradationCode.PRF_SKIPPED, f"{1000 * left_s:.0f} ms of recall's share left, the "
                           f"second round needs about {1000 * first_s:.0f} ms")
            return first
        refined = feedback.refine(query_vector, np.stack(top), prf.weight)
        shards = [shard for shard, _ in answered]
        started = time.monotonic()
        try:
            replies, failures = await self._ask(q, k, deadline, request_id, shards,
                                                {shard: reply.replica for shard, reply in answered},
                                                prf=feedback.OFF, query_vector=query_vector, feedback_vector=refined)
        except errors.TwostageError as error:  # every shard failed it
            replies, failures = [], [error]
        result.timings_ms["prf_ms"] = 1000 * (time.monotonic() - started)
        if failures:  # a shard's first-round candidates beside the others' second-round ones would rank as neither
            result.degrade(DegradationCode.PRF_SKIPPED, f"{len(replies)} of {len(shards)} shards answered the "
                           f"second round ({failures[0]})")
            return first
        _add_timings(result, "prf", [reply for _, reply in replies])
        return self._merge([reply for _, reply in replies], k, refined=True)

    async def _rerank(
        self, query: str, candidates: list[RecallCandidate], deadline: float, request_id: str, result: SearchResult,
        top_k: int = 0, rank=None,
    ) -> dict[int, float]:
        """Rerank the top candidates that fit in the time left; returns position -> rerank score. With
        ``rerank_round_pairs`` set, in rounds: the first hits a frontend shows (``rerank_round_top_k``, at most
        top_k), then more while the last round still placed a candidate among them (``rank`` orders
        candidates by the scores so far)."""
        s = self.settings
        rerank_deadline = deadline - s.return_margin_ms / 1000
        # Index limits and rerank limits are set apart: cut a document rather than have it refused.
        max_chars = self.limits.rerank_max_document_chars
        documents = [titled_text(c.title, c.text)[:max_chars] for c in candidates]
        remaining_ms = 1000 * (rerank_deadline - time.monotonic())
        if not self.rerank.available():
            result.degrade(DegradationCode.RERANK_UNAVAILABLE, "no healthy replica")
            return {}
        depth = 0 if remaining_ms < s.min_rerank_ms else self._affordable_depth(remaining_ms, query, documents)
        if (span := tracing.current_span()).is_recording():
            span.set_attributes({"twostage.rerank.affordable": depth,
                                 "twostage.rerank.time_left_ms": round(remaining_ms, 1)})
        if depth == 0:
            result.degrade(DegradationCode.RERANK_SKIPPED, f"{remaining_ms:.0f} ms left affords no pair")
            return {}
        watched = min(top_k or depth, s.rerank_round_top_k)
        if s.rerank_round_pairs and rank is not None and watched < depth:
            outcome, by_evidence = await self._rerank_in_rounds(query, documents[:depth], rerank_deadline,
                                                                request_id, watched, rank)
        else:
            outcome, by_evidence = await self._rerank_with_top_ups(query, documents, depth, rerank_deadline,
                                                                   request_id), False
        for name, ms in outcome.timings_ms.items():
            result.timings_ms[f"rerank.{name}"] = ms
        if outcome.query_truncated:
            result.degrade(DegradationCode.QUERY_TRUNCATED, "rerank read the start of the query")
        if outcome.error is not None and not outcome.scores:
            code = {
                errors.DeadlineExceeded: DegradationCode.RERANK_TIMEOUT,
                errors.Overloaded: DegradationCode.RERANK_OVERLOADED,
            }.get(type(outcome.error), DegradationCode.RERANK_UNAVAILABLE)
            result.degrade(code, str(outcome.error))
            log.warning("request %s: %s: %s", request_id, code.value, outcome.error)
            return {}
        result.rerank_cached = min(outcome.cached, len(outcome.scores))
        if len(outcome.scores) < len(candidates) and not by_evidence:
            result.degrade(DegradationCode.RERANK_PARTIAL, f"{len(outcome.scores)} of {len(candidates)} reranked")
        return outcome.scores

    def max_whole_documents(self, budget_ms: int) -> int:
        """The most documents a request that takes all or nothing can bring with ``budget_ms`` (0: the default
        budget): what the rerank tier, idle, scores within it at its measured cost, within the documents limit."""
        budget_s = resolve_budget(self.settings, budget_ms, "").budget_s
        left_ms = 1000 * budget_s - self.settings.return_margin_ms
        idle = self.rerank.affordable_pairs(left_ms, self.settings.rerank_cost_headroom, idle=True)
        return min(idle, self.max_rerank_documents())

    def _admit_whole(self, query: str, documents: list[str], left_ms: float, budget_ms: float) -> None:
        """Refuse at once a request for all of ``documents`` that the budget cannot cover: TooLarge when
        the request alone is too much (the message says how many fit), Overloaded when it is the load."""
        headroom = self.settings.rerank_cost_headroom
        count = len(documents)
        if count <= self.rerank.affordable_pairs(left_ms, headroom, query, documents):
            return
        idle = self.rerank.affordable_pairs(left_ms, headroom, query, documents, idle=True)
        if idle == 0:
            raise errors.DeadlineExceeded(f"{budget_ms:.0f} ms affords no document on the rerank tier, even idle; "
                                          "allow more budget_ms")
        if count > idle:
            raise errors.TooLarge(
                f"{count} documents take longer than the budget ({budget_ms:.0f} ms) even on an idle rerank tier, "
                f"which scores about {idle} in it; send at most {idle} at once, or allow more budget_ms")
        wait_s = self.rerank.backlog_s()
        raise errors.Overloaded(
            f"the rerank tier is busy: {count} documents would not all be scored within {budget_ms:.0f} ms now; "
            f"retry in about {max(1, math.ceil(wait_s))} s", retry_after_s=max(1, math.ceil(wait_s)))

    @staticmethod
    def _refuse_part(outcome: RerankOutcome, count: int, budget_ms: float, request_id: str) -> None:
        """The error for a request that takes all or nothing when only part of it was scored."""
        error = outcome.error
        if error is not None and is_callers_mistake(error):
            raise error
        if isinstance(error, errors.Overloaded):
            raise errors.Overloaded("every rerank replica shed the load; retry later")
        if error is None or isinstance(error, errors.DeadlineExceeded):
            raise errors.DeadlineExceeded(
                f"{len(outcome.scores)} of {count} documents were scored within {budget_ms:.0f} ms, and this "
                "request takes all or nothing; send fewer, or allow more budget_ms")
        log.warning("request %s: rerank failed: %s", request_id, error)
        raise errors.Unavailable("no rerank replica could score the documents")

    def _affordable_depth(self, remaining_ms: float, query: str, documents: list[str], top_up: bool = False) -> int:
        """How many of the first ``documents`` the time left affords, each pair priced by its length.

        Never stuck: when that is none (and this is not a ``top_up``, after pairs already scored), one pair
        still goes while it fits by the model's bare prediction (no headroom, no per-request overhead), or
        now and then while no replica's cost has been confirmed by live traffic yet (see RerankPool.probe).
        The answer is partial at worst (a late pair costs the replica some model time and the gateway
        nothing: the deadline stands), and its outcome corrects the cost model, which would never learn from
        pairs it never sends. The first pair, not the cheapest: a reranked candidate ranks above every one
        that is not, so a lower one reranked alone would be put above the recall's best."""
        if not documents:
            return 0
        depth = min(self.rerank.affordable_pairs(remaining_ms, self.settings.rerank_cost_headroom, query, documents),
                    self.limits.rerank_max_documents or len(documents))
        if depth == 0 and not top_up and (remaining_ms >= self.rerank.single_pair_ms(query, documents[0])
                                          or self.rerank.probe()):
            return 1
        return depth

    async def _rerank_with_top_ups(self, query: str, documents: list[str], depth: int, deadline: float,
                                   request_id: str, refuse_truncation: bool = False) -> RerankOutcome:
        """Score the first ``depth`` documents; then, while time is left and the tier has room again
        (the queue ahead drained faster than predicted, or arrivals paused), score the next ones the cost
        model affords. Depth chosen once at arrival would leave the tier idle in the gaps of the load while
        answers in flight still had budget for more candidates.

        When those pairs would take more than half the time left (the budget binds, or nearly), the first call
        takes half of them and the top-ups the rest: a replica scores one call's short pairs in one batch, all
        or nothing by the deadline, so a plan that fills the time would lose every pair to a modest overrun;
        split, an overrun costs the second call's pairs at most."""
        merged = RerankOutcome()
        start, end = 0, depth
        if self.settings.rerank_top_up and depth > 1:
            half_ms = 500 * (deadline - time.monotonic())
            if self._affordable_depth(half_ms, query, documents[:depth], top_up=True) < depth:
                end = (depth + 1) // 2
        for round_ in itertools.count():
            with tracing.span("rerank round") as span:
                if span.is_recording():
                    span.set_attributes({"twostage.round": round_, "twostage.top_up": round_ > 0,
                                         "twostage.pairs": end - start})
                outcome = await self.rerank.rerank(query, documents[start:end], deadline, request_id,
                                                   **({"refuse_truncation": True} if refuse_truncation else {}))
            _merge(merged, outcome, start)
            if outcome.error is not None or not self.settings.rerank_top_up or end >= len(documents):
                return merged
            more = self._affordable_depth(1000 * (deadline - time.monotonic()), query, documents[end:], top_up=True)
            if more == 0:
                return merged
            start, end = end, end + more

    async def _rerank_in_rounds(self, query: str, documents: list[str], deadline: float, request_id: str,
                                top_k: int, rank) -> tuple[RerankOutcome, bool]:
        """(the merged outcome, whether the rounds stopped because the last one changed nothing in the top_k).
        The documents are the prefix the budget affords, so the budget still caps the rounds."""
        merged = RerankOutcome()
        end = min(top_k, len(documents))
        start = 0
        for round_ in itertools.count():
            with tracing.span("rerank round") as span:
                if span.is_recording():
                    span.set_attributes({"twostage.round": round_, "twostage.top_up": round_ > 0,
                                         "twostage.pairs": end - start})
                outcome = await self.rerank.rerank(query, documents[start:end], deadline, request_id)
            _merge(merged, outcome, start)
            if outcome.error is not None or end >= len(documents):
                return merged, False
            if start >= top_k:  # after the first round: go on only while the last one reached the top_k
                top = {hit.recall_rank - 1 for hit in rank(merged.scores)[:top_k]}
                if not top & set(range(start, end)):
                    return merged, True
            start, end = end, min(end + self.settings.rerank_round_pairs, len(documents))

    @staticmethod
    def _rank(candidates: list[RecallCandidate], scores: dict[int, float], fusion: Fusion, alpha: float,
              calibration: Calibration = DEFAULT_CALIBRATION, lexical: bool = False) -> list[Hit]:
        """The final order as hits (scoring.rank_final); ``scores``: rerank's, by position in recall order."""
        hits = []
        for i, score in rank_final(candidates, scores, fusion, alpha, calibration, lexical):
            c = candidates[i]
            rerank_score = scores.get(i)
            hits.append(Hit(c.id, c.title, c.text, score, rerank_score, i + 1, c.score, c.metadata,
                            None if rerank_score is None else relevance(rerank_score), c.dense_score,
                            c.lexical_score))
        return hits


def _add_timings(result: SearchResult, prefix: str, replies: list[RecallReply]) -> None:
    """The shards' timings, the slowest shard's for each step."""
    for reply in replies:
        for name, ms in reply.timings_ms.items():
            result.timings_ms[f"{prefix}.{name}"] = max(ms, result.timings_ms.get(f"{prefix}.{name}", 0.0))


def _annotate(span, result: SearchResult) -> None:
    """What a search's span says of its answer: the share of the budget used, what was reranked, what was cut."""
    total_ms = result.timings_ms.get("total_ms", 0.0)
    span.set_attributes({
        "twostage.budget_ms": round(result.budget_ms, 1), "twostage.total_ms": round(total_ms, 2),
        "twostage.budget_used": round(total_ms / result.budget_ms, 4) if result.budget_ms > 0 else 1.0,
        "twostage.candidates": result.candidates, "twostage.reranked": result.reranked,
        "twostage.rerank_cached": result.rerank_cached, "twostage.hits": len(result.hits),
    })
    _annotate_degradations(span, result)


def _annotate_degradations(span, result) -> None:
    """The codes a span's answer was degraded by, and an event for each with its detail (counts and causes
    worded here, never the caller's text)."""
    span.set_attribute("twostage.degradations", [d.code.value for d in result.degradations])
    for degradation in result.degradations:
        span.add_event("degraded", {"twostage.degradation": degradation.code.value,
                                    "twostage.detail": degradation.detail})


def _merge(merged: RerankOutcome, outcome: RerankOutcome, offset: int) -> None:
    """Add one call's outcome (its positions counted from ``offset``) to the request's."""
    merged.scores.update({offset + i: score for i, score in outcome.scores.items()})
    for name, ms in outcome.timings_ms.items():  # times add up over calls
        merged.timings_ms[name] = merged.timings_ms.get(name, 0.0) + ms
    merged.query_truncated |= outcome.query_truncated
    merged.cached += outcome.cached
    merged.tokens += outcome.tokens
    merged.failed_slices += outcome.failed_slices
    merged.error = outcome.error or merged.error


def _worst(failures: list[BaseException]) -> BaseException:
    """The error to report when no shard answered: a deadline beats unavailability."""
    for failure in failures:
        if isinstance(failure, (errors.DeadlineExceeded, errors.InvalidArgument)):
            return failure
    if all(isinstance(f, errors.TwostageError) for f in failures):
        return errors.Unavailable(f"no recall shard answered: {failures[0]}")
    return failures[0]
