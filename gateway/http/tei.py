"""Hugging Face Text Embeddings Inference's routes: POST /rerank and /embed, GET /info, /health and /metrics.

Shapes follow TEI's OpenAPI document. What differs, and why:
- texts are always cut to the model's window, at the end (``truncate`` is accepted either way;
  ``truncation_direction: left`` is refused, since the tiers cut at the end);
- a budget that affords only some texts answers those (best first) and names the rest in the
  ``X-Twostage-Degraded`` header, as Search's partial answers do; with none scored it is a 504;
- /info describes the reranker (the headline of this face) and adds a ``twostage`` object.
"""

import asyncio
from typing import Literal

import prometheus_client as prom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.embedding import EmbedTextsQuery
from gateway.http.app import Body, budget_ms, request_id
from gateway.http.face import Dialect, calls, dialect_route
from gateway.pipeline import RerankTextsQuery
from twostage import __version__, errors

_ERROR_TYPES = {413: "validation", 422: "validation", 429: "overloaded", 503: "unhealthy"}


def _error(status: int, message: str) -> dict:
    return {"error": message, "error_type": _ERROR_TYPES.get(status, "backend")}


TEI = Dialect("tei", _error)
Direction = Literal["right", "left", "Right", "Left"]


class TeiRerank(Body):
    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False
    return_text: bool = False


class TeiEmbed(Body):
    inputs: str | list[str] | list[int] | list[list[int]]
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None
    dimensions: int | None = None


def texts_of(given, field: str) -> list[str]:
    """A string or a list of strings; token ids are refused (the tiers tokenize themselves)."""
    if isinstance(given, str):
        return [given]
    if any(not isinstance(item, str) for item in given):
        raise errors.InvalidArgument(f"{field}: text is required (a string or a list of strings); token ids are "
                                     "not accepted")
    return given


def right_only(direction: str) -> None:
    if direction.lower() != "right":
        raise errors.InvalidArgument("truncation_direction: only right is supported (texts are cut at the end)")


def degraded_headers(result) -> dict[str, str]:
    return {"X-Twostage-Degraded": result.degraded_reason} if result.degraded else {}


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(TEI), tags=["TEI"])
    lifecycle = face.lifecycle

    @routes.post("/rerank", openapi_extra=calls("Gateway/Rerank"),
                 summary="Rank texts against a query, best first (TEI)")
    async def rerank(body: TeiRerank, request: Request):
        right_only(body.truncation_direction)
        result = await lifecycle.ready_pipeline().rerank_texts(RerankTextsQuery(
            query=body.query, documents=body.texts, budget_ms=budget_ms(request), request_id=request_id(request)))
        ranks = []
        for r in result.results:
            if r.score is None:
                continue  # unscored (a partial answer): named in the header
            rank = {"index": r.index, "score": r.score if body.raw_scores else r.relevance}
            if body.return_text:
                rank["text"] = body.texts[r.index]
            ranks.append(rank)
        return JSONResponse(ranks, headers=degraded_headers(result))

    @routes.post("/embed", openapi_extra=calls("Gateway/Embed"), summary="Embed texts (TEI)")
    async def embed(body: TeiEmbed, request: Request):
        right_only(body.truncation_direction)
        if body.prompt_name not in (None, "query", "document", "passage"):
            raise errors.InvalidArgument("prompt_name: query (the model's query prefix), document or passage")
        if body.dimensions is not None and body.dimensions < 1:
            raise errors.InvalidArgument(f"dimensions must be at least 1, got {body.dimensions}")
        result = await lifecycle.ready_embedder().embed(EmbedTextsQuery(
            texts=texts_of(body.inputs, "inputs"), is_query=body.prompt_name == "query",
            dimensions=body.dimensions or 0, normalize=body.normalize, budget_ms=budget_ms(request),
            request_id=request_id(request)))
        return JSONResponse(result.vectors.tolist())

    @routes.get("/info", openapi_extra=calls("Gateway/Info"), summary="What is served (TEI)")
    async def info():
        pipeline = lifecycle.ready_pipeline()
        limits, s = pipeline.limits, face.settings
        return JSONResponse({
            "model_id": limits.rerank_model or "",
            "model_sha": None,
            "model_dtype": "onnx",
            "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
            "max_concurrent_requests": s.max_concurrent_rpcs,
            "max_input_length": limits.rerank_max_length or 0,
            "max_batch_tokens": 0,  # the rerank replicas' own, not known here
            "max_batch_requests": None,
            "max_client_batch_size": pipeline.max_rerank_documents(),
            "auto_truncate": True,
            "tokenization_workers": 0,
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "twostage": {"embed_model": limits.embed_model or "", "embed_dims": limits.embed_dims or 0,
                         "max_embed_texts": s.max_embed_texts, "default_budget_ms": s.default_budget_ms},
        })

    @routes.get("/health", summary="200 when ready; 503 while starting or draining (TEI; open)")
    async def health():
        if face.ready:
            return Response(status_code=200)
        return JSONResponse(_error(503, "unhealthy"), 503)

    @routes.get("/metrics", openapi_extra=calls("Gateway/Info"), summary="Prometheus metrics (TEI)")
    async def metrics():
        text = await asyncio.to_thread(prom.generate_latest)  # every family is collected: off the loop
        return Response(text, media_type=prom.CONTENT_TYPE_LATEST)

    return routes
