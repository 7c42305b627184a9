"""The FastAPI application of the HTTP face: one router per dialect, the OpenAPI document at /openapi.json and
its page at /docs; and what every route shares: the request body's model and its decoding, the headers that
stand for fields the dialects lack."""

import itertools
import json
import math
import re
from typing import Annotated

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.pipeline import is_request_id
from twostage import __version__, errors

# Field types as the protos have them, so that HTTP accepts what gRPC can carry and nothing else.
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
BUDGET_HEADER = "x-twostage-budget-ms"
PARTIAL_HEADER = "x-twostage-allow-partial"
_WHOLE_NUMBER = re.compile(r"[0-9]{1,10}")


def bounded_list(item, most: int, least: int = 0):
    """A list of at most ``most`` items whose validation stops at the first bad one: a huge list of wrong
    items costs one error, never one per item (pydantic checks the length before the items)."""
    return Annotated[list[item], Field(min_length=least, max_length=most, fail_fast=True)]


class Body(BaseModel):
    """A request body: unknown fields are refused (a misspelt option must not pass silently), types are strict
    (a number is not a string, a string not a boolean). Unknown fields are found before anything else and refused
    as one error, however many there are."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data):
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            fields = cls.model_fields
            unknown = list(itertools.islice((key for key in data if key not in fields), 3))
            if unknown:
                count = sum(1 for key in data if key not in fields)
                names = ", ".join(repr(key[:40]) for key in unknown) + (f" and {count - 3} more" if count > 3 else "")
                raise PydanticCustomError("extra_forbidden", "unknown field{s} {names}",
                                          {"s": "s" if count > 1 else "", "names": names})
        return data


def budget_ms(request: Request) -> int:
    """The ``X-Twostage-Budget-Ms`` header of routes whose dialect has no budget field (0: not given)."""
    given = request.headers.get(BUDGET_HEADER)
    if given is None:
        return 0
    if _WHOLE_NUMBER.fullmatch(given) is None:
        raise errors.InvalidArgument("the X-Twostage-Budget-Ms header must be a whole number of ms (at most 10 "
                                     "digits)")
    return int(given)


def compat_budget_ms(request: Request, settings) -> int:
    """The budget of a route whose clients send none: the header's, else ``compat_budget_ms``."""
    return budget_ms(request) or settings.compat_budget_ms


def allow_partial(request: Request) -> bool:
    """``X-Twostage-Allow-Partial: true``: the caller takes the texts the budget affords (named in
    ``X-Twostage-Degraded``) rather than all of them or an error."""
    given = request.headers.get(PARTIAL_HEADER)
    if given is None:
        return False
    if given.lower() not in ("true", "false", "1", "0"):
        raise errors.InvalidArgument("the X-Twostage-Allow-Partial header must be true or false")
    return given.lower() in ("true", "1")


def request_id(request: Request) -> str:
    """The ``X-Request-Id`` header, passed on as the request_id (checked like one)."""
    return request.headers.get("x-request-id", "")


def logged_request_id(request: Request) -> str:
    """The ``X-Request-Id`` header for the access log, only when it is a well-formed request id: whoever calls,
    token or not, must not be able to write what they like into the log."""
    given = request.headers.get("x-request-id", "")
    return given if is_request_id(given) else ""


# --- Decoding a body: JSON, then its model, with bounded work whatever the input --------------------------

def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {duplicate[:40]!r} appears twice in one object")
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def describe(problems: list[dict], count: int | None = None) -> str:
    """pydantic's complaints as one line naming the fields (never echoing the input)."""
    parts = []
    for item in problems[:5]:
        loc = [str(p) for p in item["loc"]]
        if loc[:1] == ["body"]:  # FastAPI's; the body's own fields are named from its top
            loc = loc[1:]
        where = ".".join(loc) or "the body"
        parts.append(f"{where}: {item['msg']}")
    more = (len(problems) if count is None else count) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def decode_body(body: bytes, model: type[BaseModel], token_ids: re.Pattern | None = None) -> BaseModel:
    """``body`` as an instance of ``model``, or InvalidArgument. Duplicate keys, NaN, Infinity and numbers out of
    a double's range are refused. ``token_ids``: a pattern that finds, in the raw bytes, a text field holding
    numbers (token ids), refused before the body is parsed."""
    if not body.strip():
        raise errors.InvalidArgument("the body is empty; send a JSON object")
    if token_ids is not None and (found := token_ids.search(body)) is not None:
        field = found.group(1).decode()
        raise errors.InvalidArgument(f"{field}: text is required (a string or a list of strings); token ids are "
                                     "not accepted")
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise errors.InvalidArgument("the body is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, a bad encoding, and the hooks' refusals
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)[:200]
        raise errors.InvalidArgument(f"the body is not valid JSON ({reason})") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        count = error.error_count()
        problems = error.errors(include_url=False, include_input=False, include_context=False) if count <= 100 \
            else [{"loc": (), "msg": "the body does not match the schema (see /openapi.json)"}]
        raise errors.InvalidArgument(describe(problems, count)) from None


def token_ids_in(*fields: str) -> re.Pattern:
    """The pattern for ``decode_body`` that finds any of ``fields`` holding a list that starts with a number or
    a list. A key is the only place where ``"name":`` can stand in JSON (quotes inside strings are escaped)."""
    names = b"|".join(re.escape(f.encode()) for f in fields)
    return re.compile(rb'"(' + names + rb')"\s*:\s*\[\s*[-0-9\[]')


def build_app(face) -> FastAPI:
    from gateway.http import cohere, native, openai, tei
    from gateway.http.face import dialect_for, error_answer

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

    async def no_such_route(request: Request, error: StarletteHTTPException):
        """404 (no such path) and 405 (not with this method), in the shape of the dialect the path belongs to."""
        message = {404: f"no route {request.url.path[:100]!r}; see /openapi.json",
                   405: f"{request.method[:10]} is not allowed on {request.url.path[:100]!r}"}.get(
            error.status_code, str(error.detail)[:200])
        return error_answer(dialect_for(request.url.path), error.status_code, message, error.headers)

    app.add_exception_handler(StarletteHTTPException, no_such_route)
    return app
