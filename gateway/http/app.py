"""The FastAPI application of the HTTP face: one router per dialect, the OpenAPI document at /openapi.json and
its page at /docs."""

from typing import Annotated

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from twostage import __version__, errors

# Field types as the protos have them, so that HTTP accepts what gRPC can carry and nothing else.
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
BUDGET_HEADER = "x-twostage-budget-ms"


class Body(BaseModel):
    """A request body: unknown fields are refused (a misspelt option must not pass silently), types are strict
    (a number is not a string, a string not a boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def budget_ms(request: Request) -> int:
    """The ``X-Twostage-Budget-Ms`` header of routes whose dialect has no budget field (0: the default)."""
    given = request.headers.get(BUDGET_HEADER)
    if given is None:
        return 0
    if not given.isdigit():
        raise errors.InvalidArgument(f"the X-Twostage-Budget-Ms header must be a whole number of ms, got {given[:20]!r}")
    return int(given)


def request_id(request: Request) -> str:
    """The ``X-Request-Id`` header, passed on as the request_id (checked like one)."""
    return request.headers.get("x-request-id", "")


def build_app(face) -> FastAPI:
    from gateway.http import cohere, native, openai, tei

    app = FastAPI(
        title="twostage gateway",
        version=__version__,
        description="Two-stage retrieval over HTTP/JSON: twostage's own routes, and the rerank and embedding "
        "routes of Hugging Face TEI, Cohere (and Infinity) and OpenAI, served by the same pipeline as gRPC. "
        "With auth on, send `Authorization: Bearer <token>` (health and these docs are open).",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.face = face
    for module in (native, tei, cohere, openai):
        app.include_router(module.router(face))
    return app
