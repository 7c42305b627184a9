"""OpenAI's embeddings route: POST /v1/embeddings.

``input`` is a string or a list of strings; token-id arrays are refused (the recall tier tokenizes).
``encoding_format`` base64 (what the official SDK asks for by default) is each vector's float32
little-endian bytes. ``dimensions`` keeps the first dimensions, scaled back to unit length. ``model`` is
accepted whatever it names; the answer names the model that embedded. Texts embed as documents.
"""

import base64
import json
from typing import ClassVar, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from gateway.embedding import EmbedTextsQuery
from gateway.http.app import Body, bounded_list, compat_budget_ms, request_id, token_ids_in
from gateway.http.face import Dialect, calls, dialect_route, raw_json, vector_rows
from gateway.http.tei import MAX_TEXTS, no_token_ids

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def _error(status: int, message: str, code: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


OPENAI = Dialect("openai", _error)


class OpenAIEmbeddings(Body):
    token_ids: ClassVar = token_ids_in("input")
    input: str | bounded_list(str, MAX_TEXTS)
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    _no_token_ids = no_token_ids("input")


def router(face) -> APIRouter:
    routes = APIRouter(route_class=dialect_route(OPENAI), tags=["OpenAI"])
    lifecycle, s = face.lifecycle, face.settings

    @routes.post("/v1/embeddings", openapi_extra=calls("Gateway/Embed"), summary="Embed texts (OpenAI)")
    async def embeddings(body: OpenAIEmbeddings, request: Request):
        result = await lifecycle.ready_embedder().embed(EmbedTextsQuery(
            texts=[body.input] if isinstance(body.input, str) else body.input, dimensions=body.dimensions or 0,
            normalize=True, budget_ms=compat_budget_ms(request, s), request_id=request_id(request)))
        if body.encoding_format == "base64":
            vectors = [json.dumps(base64.b64encode(v.astype("<f4").tobytes()).decode()).encode()
                       for v in result.vectors]
        else:
            vectors = await vector_rows(result.vectors, face.body_limit)
        items = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, v) for i, v in enumerate(vectors))
        tail = json.dumps({"model": result.model, "usage": {"prompt_tokens": result.tokens,
                                                             "total_tokens": result.tokens}},
                          separators=(",", ":")).encode()
        return raw_json(b'{"object":"list","data":[' + items + b"]," + tail[1:], limit=face.body_limit)

    return routes
