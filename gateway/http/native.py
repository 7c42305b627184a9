"""twostage's own HTTP routes: /v1/search with every Search field, /v1/documents for writes and reads by id.
Bodies and answers are the protos' fields under the same names; errors are
``{"error": {"status": <gRPC code name>, "message": ...}}``."""

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field

from gateway.http.app import Body, UInt32, bounded_list
from gateway.http.face import Dialect, calls, dialect_route, json_answer
from gateway.pipeline import SearchQuery
from gateway.servicer import info_fields
from gateway.writes import WriteResult
from twostage import errors
from twostage.corpus import Document
from twostage.filters import FilterClause, NumberRange, check_filter
from twostage.recall_mode import RecallMode
from twostage.scoring import Fusion

# For answers no error stands for: no such route is gRPC's unknown method; no such path, not found.
_CODE_BY_HTTP = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


def _error(status: int, message: str, code: str | None = None) -> dict:
    """``code``: the gRPC code of the error answered, as gRPC would say it."""
    return {"error": {"status": code or _CODE_BY_HTTP.get(status, "INTERNAL"), "message": message}}


NATIVE = Dialect("twostage", _error)

MAX_ITEMS = 100_000  # what a body may list at all; the limits that apply (smaller) are checked after
Scalar = str | bool | int | float
MetadataValue = Scalar | bounded_list(str, MAX_ITEMS)


class Range(Body):
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


class Clause(Body):
    """One test on one metadata key: set exactly one of equals, any_of, range."""

    key: str
    equals: Scalar | None = None
    any_of: bounded_list(Scalar, MAX_ITEMS) | None = None
    range: Range | None = None


class SearchFilter(Body):
    """A document passes when every clause holds (as the proto's Filter)."""

    clauses: bounded_list(Clause, MAX_ITEMS) = Field(default_factory=list)


class SearchBody(Body):
    query: str
    top_k: UInt32 = 0
    recall_k: UInt32 = 0
    budget_ms: UInt32 = 0
    request_id: str = ""
    fusion: Annotated[Fusion | None, Field(strict=False)] = None  # by name: strict takes only the enum itself
    fusion_alpha: float | None = None
    skip_rerank: bool = False
    score_threshold: float | None = None
    recall_mode: Annotated[RecallMode | None, Field(strict=False)] = None  # strict takes no string for an enum
    filter: SearchFilter | None = None
    prf_depth: UInt32 | None = None
    prf_weight: float | None = None


class DocumentBody(Body):
    id: str
    title: str = ""
    text: str = ""
    metadata: Annotated[dict[str, MetadataValue], Field(max_length=MAX_ITEMS, fail_fast=True)] = Field(
        default_factory=dict)


class UpsertBody(Body):
    documents: bounded_list(DocumentBody, MAX_ITEMS)
    request_id: str = ""


def filter_of(body: SearchFilter | None):
    """The filter, checked by the code that checks gRPC's (twostage.filters)."""
    if body is None:
        return None
    return check_filter([FilterClause(c.key, equals=c.equals,
                                      any_of=None if c.any_of is None else tuple(c.any_of),
                                      range=None if c.range is None else NumberRange(**c.range.model_dump()))
                         for c in body.clauses])


def _write(result: WriteResult) -> dict:
    return {
        "doc_count": result.doc_count, "timings_ms": result.timings_ms,
        "version": {"clock": result.version.clock, "writer": result.version.writer},
        "shards": [{"shard": a.shard, "documents": a.documents, "acknowledged": a.acknowledged,
                    "replicas": a.replicas} for a in result.shards],
        "request_id": result.request_id, "superseded": result.superseded,
        "newest_version": None if result.newest is None else {"clock": result.newest.clock,
                                                              "writer": result.newest.writer},
    }


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(NATIVE), tags=["twostage"])
    lifecycle = face.lifecycle

    @routes.post("/v1/search", openapi_extra=calls("Gateway/Search"),
                 summary="Recall, then rerank, within the budget (Gateway.Search)")
    async def search(body: SearchBody):
        result = await lifecycle.ready_pipeline().search(SearchQuery(
            query=body.query, top_k=body.top_k, recall_k=body.recall_k, budget_ms=body.budget_ms,
            request_id=body.request_id, fusion=body.fusion, fusion_alpha=body.fusion_alpha,
            skip_rerank=body.skip_rerank, score_threshold=body.score_threshold, recall_mode=body.recall_mode,
            filter=filter_of(body.filter), prf_depth=body.prf_depth, prf_weight=body.prf_weight))
        return await json_answer({
            "hits": [{"id": h.id, "title": h.title, "text": h.text, "score": h.score, "rerank_score": h.rerank_score,
                      "recall_rank": h.recall_rank, "recall_score": h.recall_score, "metadata": h.metadata,
                      "relevance": h.relevance, "dense_score": h.dense_score, "lexical_score": h.lexical_score}
                     for h in result.hits],
            "degraded": result.degraded, "degraded_reason": result.degraded_reason,
            "degradations": [{"code": d.code.value, "detail": d.detail} for d in result.degradations],
            "timings_ms": result.timings_ms, "candidates": result.candidates, "reranked": result.reranked,
            "rerank_cached": result.rerank_cached if result.reranked else 0, "request_id": result.request_id,
        }, limit=face.body_limit, large=len(result.hits) > 100)

    def write_timeout_s() -> float:
        return face.settings.write_timeout_s

    @routes.post("/v1/documents", openapi_extra=calls("Gateway/Upsert"),
                 summary="Write documents, acknowledged once durable on a quorum (Gateway.Upsert; admin)")
    async def upsert(body: UpsertBody):
        docs = [Document(d.id, d.title, d.text, dict(d.metadata)) for d in body.documents]
        result = await lifecycle.ready_router().upsert(docs, write_timeout_s(), body.request_id)
        return JSONResponse({"upserted": result.count, **_write(result)})

    @routes.delete("/v1/documents/{doc_id:path}", openapi_extra=calls("Gateway/Delete"),
                   summary="Delete a document (Gateway.Delete; admin)")
    async def delete(doc_id: str, request_id: str = ""):
        result = await lifecycle.ready_router().delete([doc_id], write_timeout_s(), request_id)
        return JSONResponse({"deleted": result.count, **_write(result)})

    @routes.get("/v1/documents/{doc_id:path}", openapi_extra=calls("Gateway/Get"),
                summary="A stored document by id (Gateway.Get)")
    async def get(doc_id: str):
        found = (await lifecycle.ready_router().get([doc_id], write_timeout_s())).found
        if not found:
            raise errors.NotFound(f"no document with id {doc_id[:128]!r}")
        d = found[0]
        return JSONResponse({"id": d.id, "title": d.title, "text": d.text, "metadata": d.metadata})

    @routes.get("/v1/info", openapi_extra=calls("Gateway/Info"), summary="Defaults and limits (Gateway.Info)")
    async def info():
        fields = info_fields(lifecycle)
        return JSONResponse({**fields, "calibration": asdict(fields["calibration"])})

    return routes
