"""OpenAI's embeddings route: POST /v1/embeddings.

``input`` is a string or a list of strings; token-id arrays are refused (the recall tier tokenizes).
``encoding_format`` base64 (what the official SDK asks for by default) is each vector's float32
little-endian bytes. ``dimensions`` keeps the first dimensions, scaled back to unit length. ``model`` is
accepted whatever it names; the answer names the model that embedded. Texts embed as documents.
"""

import base64
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from gateway.embedding import EmbedTextsQuery
from gateway.http.app import Body, budget_ms, request_id
from gateway.http.face import Dialect, calls, dialect_route
from gateway.http.tei import texts_of

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": None}}


OPENAI = Dialect("openai", _error)


class OpenAIEmbeddings(Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(OPENAI), tags=["OpenAI"])
    lifecycle = face.lifecycle

    @routes.post("/v1/embeddings", openapi_extra=calls("Gateway/Embed"), summary="Embed texts (OpenAI)")
    async def embeddings(body: OpenAIEmbeddings, request: Request):
        result = await lifecycle.ready_embedder().embed(EmbedTextsQuery(
            texts=texts_of(body.input, "input"), dimensions=body.dimensions or 0, budget_ms=budget_ms(request),
            request_id=request_id(request)))
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in result.vectors]
        else:
            vectors = result.vectors.tolist()
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": result.model,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        })

    return routes
