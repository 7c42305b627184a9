"""Hugging Face Text Embeddings Inference's routes: POST /rerank and /embed, GET /info, /health and /metrics.

Shapes and error statuses follow TEI's router: an empty batch is a 400 (``empty``), a batch over
``max_client_batch_size`` or a text over the model's window with ``truncate: false`` a 413 (``validation``),
a body that is not the schema a 422 (``validation``), overload a 429 (``overloaded``), not ready a 503
(``unhealthy``). What differs, and why:
- ``truncation_direction: left`` is refused (the tiers cut at the end);
- an answer holds every text, or is an error, never some of them (TEI's clients would take a short list for the
  whole): texts the budget (``compat_budget_ms``, or ``X-Twostage-Budget-Ms``) cannot cover are refused before
  any work, 413 saying how many fit, or 429 with Retry-After when it is the load. With
  ``X-Twostage-Allow-Partial: true`` the answer holds the texts the budget scored, the rest named in
  ``X-Twostage-Degraded``;
- /info describes the reranker (the headline of this face) and adds a ``twostage`` object.
"""

import asyncio
from typing import ClassVar, Literal

import prometheus_client as prom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from gateway.embedding import EmbedTextsQuery
from gateway.http.app import Body, allow_partial, bounded_list, compat_budget_ms, request_id, token_ids_in
from gateway.http.face import OFF_LOOP_BYTES, Dialect, calls, dialect_route, json_answer, raw_json, vector_rows
from gateway.pipeline import RerankTextsQuery
from twostage import __version__, errors

MAX_TEXTS = 100_000  # what a body may list at all; the limits that apply (smaller) are checked after


class Empty(errors.InvalidArgument):
    """TEI's empty batch: a 400 with error_type ``empty``."""


def _error_type(status: int) -> str:
    return {400: "empty", 429: "overloaded", 503: "unhealthy"}.get(status,
                                                                   "validation" if status < 500 else "backend")


def _error(status: int, message: str, code: str | None = None) -> dict:
    return {"error": message, "error_type": _error_type(status)}


def _status(error: BaseException, status: int) -> int:
    return 400 if isinstance(error, Empty) else status


TEI = Dialect("tei", _error, _status)
Direction = Literal["right", "left", "Right", "Left"]


def no_token_ids(field: str):
    """A model check that refuses a list of numbers or of lists (token ids) in ``field`` at its first item."""

    @model_validator(mode="before")
    @classmethod
    def check(cls, data):
        given = data.get(field) if isinstance(data, dict) else None
        if isinstance(given, list) and given and not isinstance(given[0], str):
            raise PydanticCustomError("text_required", "text is required (a string or a list of strings); token "
                                      "ids are not accepted")
        return data

    return check


class TeiRerank(Body):
    token_ids: ClassVar = token_ids_in("texts")
    query: str
    texts: bounded_list(str, MAX_TEXTS)
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False
    return_text: bool = False


class TeiEmbed(Body):
    token_ids: ClassVar = token_ids_in("inputs")
    inputs: str | bounded_list(str, MAX_TEXTS)
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None
    dimensions: int | None = None

    _no_token_ids = no_token_ids("inputs")


def right_only(direction: str) -> None:
    if direction.lower() != "right":
        raise errors.InvalidArgument("truncation_direction: only right is supported (texts are cut at the end)")


def degraded_headers(result) -> dict[str, str]:
    return {"X-Twostage-Degraded": result.degraded_reason} if result.degraded else {}


def at_most(count: int, most: int) -> None:
    """TEI's batch size check: more texts than the route takes is a 413."""
    if count > most:
        raise errors.TooLarge(f"batch size {count} > maximum allowed batch size {most}")


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(TEI), tags=["TEI"])
    lifecycle, s = face.lifecycle, face.settings

    @routes.post("/rerank", openapi_extra=calls("Gateway/Rerank"),
                 summary="Rank texts against a query, best first (TEI)")
    async def rerank(body: TeiRerank, request: Request):
        right_only(body.truncation_direction)
        if not body.texts:
            raise Empty("`texts` cannot be empty")
        pipeline = lifecycle.ready_pipeline()
        at_most(len(body.texts), pipeline.max_rerank_documents())
        result = await pipeline.rerank_texts(RerankTextsQuery(
            query=body.query, documents=body.texts, budget_ms=compat_budget_ms(request, s),
            request_id=request_id(request), whole=not allow_partial(request), refuse_truncation=body.truncate is False))
        ranks = []
        for r in result.results:
            if r.score is None:
                continue  # unscored (a partial answer, asked for): named in the header
            rank = {"index": r.index, "score": r.score if body.raw_scores else r.relevance}
            if body.return_text:
                rank["text"] = body.texts[r.index]
            ranks.append(rank)
        return await json_answer(ranks, degraded_headers(result), face.body_limit,
                                 large=body.return_text and len(request._body) > OFF_LOOP_BYTES)

    @routes.post("/embed", openapi_extra=calls("Gateway/Embed"), summary="Embed texts (TEI)")
    async def embed(body: TeiEmbed, request: Request):
        right_only(body.truncation_direction)
        if body.prompt_name not in (None, "query", "document", "passage"):
            raise errors.InvalidArgument("prompt_name: query (the model's query prefix), document or passage")
        if body.dimensions is not None and body.dimensions < 1:
            raise errors.InvalidArgument(f"dimensions must be at least 1, got {body.dimensions}")
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts:
            raise Empty("`inputs` cannot be empty")
        at_most(len(texts), s.max_embed_texts)
        result = await lifecycle.ready_embedder().embed(EmbedTextsQuery(
            texts=texts, is_query=body.prompt_name == "query", dimensions=body.dimensions or 0,
            normalize=body.normalize, budget_ms=compat_budget_ms(request, s), request_id=request_id(request),
            refuse_truncation=body.truncate is False))
        rows = await vector_rows(result.vectors, face.body_limit)
        return raw_json(b"[" + b",".join(rows) + b"]")

    @routes.get("/info", openapi_extra=calls("Gateway/Info"), summary="What is served (TEI)")
    async def info():
        pipeline = lifecycle.ready_pipeline()
        limits = pipeline.limits
        return JSONResponse({
            "model_id": limits.rerank_model or "",
            "model_sha": None,
            "model_dtype": "onnx",
            "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
            "max_concurrent_requests": s.max_concurrent_rpcs,
            "max_input_length": limits.rerank_max_length or 0,
            "max_batch_tokens": 0,  # the rerank replicas' own, not known here
            "max_batch_requests": None,
            # The most texts one /rerank scores in full within compat_budget_ms on an idle tier (more are a 413).
            "max_client_batch_size": pipeline.max_whole_documents(s.compat_budget_ms),
            "auto_truncate": True,
            "tokenization_workers": 0,
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "twostage": {"embed_model": limits.embed_model or "", "embed_dims": limits.embed_dims or 0,
                         "max_embed_texts": s.max_embed_texts, "default_budget_ms": s.compat_budget_ms,
                         "max_rerank_texts": pipeline.max_rerank_documents()},
        })

    @routes.get("/health", summary="200 when ready; 503 while starting or draining (TEI; open)")
    async def health():
        if face.ready:
            return Response(status_code=200)
        return JSONResponse(_error(503, "unhealthy"), 503)

    @routes.get("/metrics", openapi_extra=calls("Gateway/Info", light=True), summary="Prometheus metrics (TEI)")
    async def metrics():
        text = await asyncio.to_thread(prom.generate_latest)  # every family is collected: off the loop
        return Response(text, media_type=prom.CONTENT_TYPE_LATEST)

    return routes
