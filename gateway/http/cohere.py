"""Cohere's rerank routes (and Infinity's, which copy them): POST /v1/rerank and /v2/rerank.

Every optional field takes null. ``model`` is accepted whatever it names (clients must send one) and the
answer's ``meta`` names the model that scored; ``max_tokens_per_doc`` and ``priority`` are accepted, and
documents are cut at the model's window whatever they say; ``relevant_spans`` is accepted with mode
``disabled`` (what the SDK sends; spans are not computed). Documents may be strings or ``{"text": ...}``
objects with fields of the caller's own; with ``return_documents`` an object comes back whole, a string as
``{"text": ...}``. An answer ranks every document or is an error, never some of them (see the TEI routes);
``X-Twostage-Allow-Partial: true`` takes what the budget scored, the rest named in ``X-Twostage-Degraded``.
"""

import time
from typing import Annotated, ClassVar, Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from gateway.http.app import Body, allow_partial, bounded_list, compat_budget_ms, request_id, token_ids_in
from gateway.http.face import OFF_LOOP_BYTES, Dialect, calls, dialect_route, json_answer
from gateway.http.tei import MAX_TEXTS, degraded_headers
from gateway.pipeline import RerankTextsQuery
from twostage import errors


def _error(status: int, message: str, code: str | None = None) -> dict:
    return {"message": message}


COHERE = Dialect("cohere", _error)


class CohereDocument(Body):
    """A document object: its text, and any fields of the caller's own (echoed with return_documents)."""

    model_config = ConfigDict(extra="allow", strict=True)
    text: str


class RelevantSpans(Body):
    """Accepted so that the SDK's request passes; spans are not computed, so only ``disabled`` is."""

    mode: Literal["disabled"]
    threshold: float | None = None
    max_spans: int | None = None


# A string or an object, tried in that order; a bad item stops the list's check (one error, not one per item).
Document = Annotated[str | CohereDocument, Field(union_mode="left_to_right")]


class CohereRerank(Body):
    token_ids: ClassVar = token_ids_in("documents")
    model: str | None = None
    query: str
    documents: bounded_list(Document, MAX_TEXTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None
    max_tokens_per_doc: int | None = Field(None, ge=1)
    # v1's: ranking on other fields than text is not supported; chunking is the model window's.
    rank_fields: bounded_list(str, 16) | None = None
    max_chunks_per_doc: int | None = Field(None, ge=1)
    priority: int | None = None
    relevant_spans: RelevantSpans | None = None


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(COHERE), tags=["Cohere"])
    lifecycle, s = face.lifecycle, face.settings

    async def rerank(body: CohereRerank, request: Request, version: str):
        if body.rank_fields not in (None, ["text"]):
            raise errors.InvalidArgument("rank_fields: only text is ranked")
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        result = await lifecycle.ready_pipeline().rerank_texts(RerankTextsQuery(
            query=body.query, documents=texts, top_n=body.top_n or 0, budget_ms=compat_budget_ms(request, s),
            request_id=request_id(request), whole=not allow_partial(request)))
        results = []
        for r in result.results:
            if r.score is None:
                continue
            item = {"index": r.index, "relevance_score": r.relevance}
            if body.return_documents:
                given = body.documents[r.index]
                item["document"] = {"text": given} if isinstance(given, str) else given.model_dump()
            results.append(item)
        return await json_answer({
            "id": result.request_id, "results": results,
            "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1},
                     "model": result.model},
            # What Infinity's clients read besides Cohere's fields.
            "object": "rerank", "model": result.model, "created": int(time.time()),
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        }, degraded_headers(result), face.body_limit,
            large=bool(body.return_documents) and len(request._body) > OFF_LOOP_BYTES)

    @routes.post("/v1/rerank", openapi_extra=calls("Gateway/Rerank"), summary="Rank documents (Cohere v1)")
    async def rerank_v1(body: CohereRerank, request: Request):
        return await rerank(body, request, "1")

    @routes.post("/v2/rerank", openapi_extra=calls("Gateway/Rerank"), summary="Rank documents (Cohere v2)")
    async def rerank_v2(body: CohereRerank, request: Request):
        return await rerank(body, request, "2")

    return routes
