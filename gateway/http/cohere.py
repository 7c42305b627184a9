"""Cohere's rerank routes (and Infinity's, which copy them): POST /v1/rerank and /v2/rerank.

Every optional field takes null. ``model`` is accepted whatever it names (clients must send one) and the
answer's ``meta`` names the model that scored; ``max_tokens_per_doc`` and ``priority`` are accepted, and
documents are cut at the model's window whatever they say. v1 documents may be strings or ``{"text": ...}``
objects; ``document`` comes back as ``{"text": ...}`` when ``return_documents`` is true. A partial answer
(the budget scored only some documents) lists those and names the rest in ``X-Twostage-Degraded``.
"""

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from gateway.http.app import Body, budget_ms, request_id
from gateway.http.face import Dialect, calls, dialect_route
from gateway.http.tei import degraded_headers
from gateway.pipeline import RerankTextsQuery
from twostage import errors


def _error(status: int, message: str) -> dict:
    return {"message": message}


COHERE = Dialect("cohere", _error)


class CohereDocument(Body):
    """A v1 document object: its text, and any fields of the caller's own."""

    model_config = ConfigDict(extra="allow", strict=True)
    text: str


class CohereRerank(Body):
    model: str | None = None
    query: str
    documents: list[str | CohereDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None
    max_tokens_per_doc: int | None = Field(None, ge=1)
    # v1's: ranking on other fields than text is not supported; chunking is the model window's.
    rank_fields: list[str] | None = None
    max_chunks_per_doc: int | None = Field(None, ge=1)
    priority: int | None = None
    relevant_spans: None = None


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(COHERE), tags=["Cohere"])
    lifecycle = face.lifecycle

    async def rerank(body: CohereRerank, request: Request, version: str) -> JSONResponse:
        if body.rank_fields not in (None, ["text"]):
            raise errors.InvalidArgument("rank_fields: only text is ranked")
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        result = await lifecycle.ready_pipeline().rerank_texts(RerankTextsQuery(
            query=body.query, documents=texts, top_n=body.top_n or 0, budget_ms=budget_ms(request),
            request_id=request_id(request)))
        results = []
        for r in result.results:
            if r.score is None:
                continue
            item = {"index": r.index, "relevance_score": r.relevance}
            if body.return_documents:
                item["document"] = {"text": texts[r.index]}
            results.append(item)
        return JSONResponse({
            "id": result.request_id, "results": results,
            "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1},
                     "model": result.model},
            # What Infinity's clients read besides Cohere's fields.
            "object": "rerank", "model": result.model, "created": int(time.time()),
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        }, headers=degraded_headers(result))

    @routes.post("/v1/rerank", openapi_extra=calls("Gateway/Rerank"), summary="Rank documents (Cohere v1)")
    async def rerank_v1(body: CohereRerank, request: Request):
        return await rerank(body, request, "1")

    @routes.post("/v2/rerank", openapi_extra=calls("Gateway/Rerank"), summary="Rank documents (Cohere v2)")
    async def rerank_v2(body: CohereRerank, request: Request):
        return await rerank(body, request, "2")

    return routes
