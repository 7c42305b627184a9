"""The gateway's HTTP/JSON face and Gateway.Rerank / Gateway.Embed, over real recall and rerank servers: the
official OpenAI and Cohere SDKs unmodified, TEI's schema field by field, scores that agree across HTTP, gRPC
and the rerank tier, bad input on every route, and tokens and TLS as gRPC has them."""

import asyncio
import gc
import json
import logging
import ssl
import threading
import time

import cohere
import grpc
import httpx
import numpy as np
import openai
import pytest
from prometheus_client import REGISTRY

from gateway.config import GatewaySettings
from gateway.servicer import build_server
from twostage.auth import add_token
from twostage.dev_certs import write_dev_certs
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rerank_pb2, rerank_pb2_grpc

QUERY = "vitamin D deficiency and bone health"
TEXTS = ["Vitamin D deficiency weakens bones in older adults.", "The stock market fell on Tuesday.",
         "Calcium and vitamin D supplements reduce fractures.", "A recipe for lemon cake."]
MAX_EMBED_TEXTS = 64
MAX_MESSAGE_MB = 1


@pytest.fixture(scope="module")
async def face(recall_target, rerank_target):
    """One gateway with its HTTP face for the module: (http base URL, gRPC target)."""
    server = build_server(GatewaySettings(port=0, http_port=0, recall_targets=recall_target,
                                          rerank_targets=rerank_target, max_embed_texts=MAX_EMBED_TEXTS,
                                          max_message_mb=MAX_MESSAGE_MB))
    port = await server.start()
    yield f"http://127.0.0.1:{server.listeners[0].port}", f"127.0.0.1:{port}", server.listeners[0], server
    await server.stop(grace_s=1)


@pytest.fixture(scope="module")
async def guarded():
    """A gateway whose stages are down (no model needed) with small limits, for the connection's own bounds:
    (base URL, gRPC target, HTTP face, server). Two slots; a second to send headers or a body."""
    server = build_server(GatewaySettings(port=0, http_port=0, recall_targets="127.0.0.1:1",
                                          rerank_targets="127.0.0.1:1", startup_wait_s=0, max_concurrent_rpcs=2,
                                          message_timeout_s=1, max_message_mb=1))
    port = await server.start()
    yield f"http://127.0.0.1:{server.listeners[0].port}", f"127.0.0.1:{port}", server.listeners[0], server
    await server.stop(grace_s=0)


@pytest.fixture(scope="module")
async def http(face):
    async with httpx.AsyncClient(base_url=face[0], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def gateway_stub(face, channel_to):
    return gateway_pb2_grpc.GatewayStub(channel_to(face[1]))


# --- The official SDKs, unmodified, pointed at the face by base URL ---------------------------------------

async def test_openai_sdk_embeddings_base64_and_float(face):
    client = openai.OpenAI(base_url=f"{face[0]}/v1", api_key="unused", max_retries=0)
    default = await asyncio.to_thread(client.embeddings.create, model="any", input=["first text", "second"])
    floats = await asyncio.to_thread(client.embeddings.create, model="any", input="first text",
                                     encoding_format="float")
    assert default.object == "list" and [d.index for d in default.data] == [0, 1]
    assert default.model == "bge-small-en" and default.usage.prompt_tokens > 0
    dims = len(default.data[0].embedding)
    assert dims == 384 and np.linalg.norm(default.data[0].embedding) == pytest.approx(1, abs=1e-5)
    # The SDK decoded base64 float32: the same vector as the float answer.
    np.testing.assert_allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    short = await asyncio.to_thread(client.embeddings.create, model="any", input="first text", dimensions=64)
    assert len(short.data[0].embedding) == 64 and np.linalg.norm(short.data[0].embedding) == pytest.approx(1, 1e-5)


async def test_openai_sdk_errors_are_its_exceptions(face):
    client = openai.OpenAI(base_url=f"{face[0]}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await asyncio.to_thread(client.embeddings.create, model="any", input=[[1, 2, 3]])
    assert "text is required" in caught.value.body["message"]


async def test_cohere_sdk_v2_and_v1_rerank(face, rerank_target, channel_to):
    tier = await rerank_pb2_grpc.RerankStub(channel_to(rerank_target)).Rerank(
        rerank_pb2.RerankRequest(query=QUERY, documents=TEXTS, bypass_cache=True))
    best_first = [r.index for r in tier.results]  # the tier sorts, best first
    v2 = cohere.ClientV2(base_url=face[0], api_key="unused")
    ranked = await asyncio.to_thread(v2.rerank, model="rerank-v3.5", query=QUERY, documents=TEXTS, top_n=2,
                                     relevant_spans=cohere.RerankRelevantSpans(mode="disabled"))
    assert [r.index for r in ranked.results] == best_first[:2]
    scores = [r.relevance_score for r in ranked.results]
    assert scores == sorted(scores, reverse=True) and all(0 <= score <= 1 for score in scores)
    v1 = cohere.Client(base_url=face[0], api_key="unused")
    ranked = await asyncio.to_thread(v1.rerank, model="rerank-english-v3.0", query=QUERY,
                                     documents=[TEXTS[0], {"text": TEXTS[1]}], return_documents=True)
    assert [r.index for r in ranked.results] == [0, 1]
    assert ranked.results[0].document.text == TEXTS[0] and ranked.results[1].document.text == TEXTS[1]
    assert ranked.id and ranked.results[0].relevance_score > ranked.results[1].relevance_score


async def test_cohere_documents_come_back_whole_and_spans_are_only_off(http):
    documents = [{"text": TEXTS[0], "title": "Bones", "year": 2021}, TEXTS[3]]
    answer = await http.post("/v1/rerank", json={"model": "m", "query": QUERY, "documents": documents,
                                                 "return_documents": True})
    assert answer.status_code == 200, answer.text
    by_index = {r["index"]: r["document"] for r in answer.json()["results"]}
    assert by_index == {0: documents[0], 1: {"text": TEXTS[3]}}
    enabled = await http.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": TEXTS,
                                                  "relevant_spans": {"mode": "enabled"}})
    assert_error(enabled, "/v2/rerank", 422)


# --- TEI's schema, field by field --------------------------------------------------------------------------

# What each dialect says for each status: written out here, not read from the code under test.
TEI_TYPES = {400: "empty", 401: "validation", 403: "validation", 404: "validation", 405: "validation",
             408: "validation", 413: "validation", 422: "validation", 429: "overloaded", 503: "unhealthy",
             504: "backend", 500: "backend"}
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "server_error",
                500: "server_error"}
GRPC_CODES = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
              408: "DEADLINE_EXCEEDED",
              413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED", 500: "INTERNAL"}
DIALECT_OF = {"/v1/search": "twostage", "/v1/documents": "twostage", "/v1/info": "twostage", "/rerank": "tei",
              "/embed": "tei", "/info": "tei", "/metrics": "tei", "/v1/rerank": "cohere", "/v2/rerank": "cohere",
              "/v1/embeddings": "openai"}


def assert_error(response: httpx.Response, path: str, status: int) -> str:
    """``response`` is ``status`` with a JSON body in the dialect of ``path``; returns its message."""
    assert response.status_code == status, (path, response.text[:300])
    body = response.json()
    dialect = DIALECT_OF.get(path, "twostage" if path.startswith("/v1/documents") else None)
    if dialect == "tei":
        assert set(body) == {"error", "error_type"} and body["error_type"] == TEI_TYPES[status], body
        message = body["error"]
    elif dialect == "cohere":
        assert set(body) == {"message"}, body
        message = body["message"]
    elif dialect == "openai":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == OPENAI_TYPES[status], body
        message = body["error"]["message"]
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"status", "message"}, body
        assert body["error"]["status"] == GRPC_CODES[status], body
        message = body["error"]["message"]
    assert isinstance(message, str) and message, body
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    return message


def assert_tei_error(response: httpx.Response, status: int) -> None:
    assert_error(response, "/rerank", status)


def counted(method: str, code: str = "OK") -> float:
    return REGISTRY.get_sample_value("twostage_rpc_requests_total",
                                     {"method": method, "code": code, "protocol": "http"}) or 0.0


async def test_tei_rerank_embed_info_health_metrics(http):
    ranks = (await http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True})).json()
    assert [set(r) for r in ranks] == [{"index", "score", "text"}] * len(TEXTS)
    assert sorted(r["index"] for r in ranks) == [0, 1, 2, 3]
    assert all(isinstance(r["index"], int) and isinstance(r["score"], float) and 0 <= r["score"] <= 1 for r in ranks)
    assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    assert all(r["text"] == TEXTS[r["index"]] for r in ranks)
    raw = (await http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True,
                                            "truncate": True, "truncation_direction": "Right"})).json()
    assert [set(r) for r in raw] == [{"index", "score"}] * len(TEXTS)
    by_index = {r["index"]: r["score"] for r in ranks}
    assert all(by_index[r["index"]] == pytest.approx(1 / (1 + np.exp(-r["score"])), rel=1e-5) for r in raw)

    one = (await http.post("/embed", json={"inputs": "a text"})).json()
    many = (await http.post("/embed", json={"inputs": ["a text", "another"], "normalize": True, "truncate": False,
                                            "prompt_name": None})).json()
    assert len(one) == 1 and len(many) == 2 and all(isinstance(x, float) for x in one[0])
    np.testing.assert_allclose(one[0], many[0], atol=1e-6)

    info_calls = counted("Gateway/Info")
    info = (await http.get("/info")).json()
    assert counted("Gateway/Info") == info_calls + 1
    required = {"model_id": str, "model_dtype": str, "model_type": dict, "max_concurrent_requests": int,
                "max_input_length": int, "max_batch_tokens": int, "max_client_batch_size": int,
                "auto_truncate": bool, "tokenization_workers": int, "version": str}
    assert all(isinstance(info[name], kind) for name, kind in required.items())
    assert info["model_id"] == "ms-marco-minilm-l12" and set(info["model_type"]["reranker"]) == {"id2label",
                                                                                                 "label2id"}
    assert (await http.get("/health")).status_code == 200
    metrics = (await http.get("/metrics")).text
    assert 'twostage_rpc_requests_total{code="OK",method="Gateway/Rerank",protocol="http"}' in metrics
    assert counted("Gateway/Info") == info_calls + 1  # a scrape is not a call of Info
    # TEI's statuses: an empty batch is a 400 ("empty"), one over max_client_batch_size a 413 ("validation").
    assert_tei_error(await http.post("/rerank", json={"query": QUERY, "texts": []}), 400)
    assert_tei_error(await http.post("/embed", json={"inputs": []}), 400)
    assert_tei_error(await http.post("/embed", json={"inputs": ["t"] * (MAX_EMBED_TEXTS + 1)}), 413)
    assert_tei_error(await http.post("/rerank", json={"query": QUERY, "texts": ["t"] * 1001}), 413)


async def test_tei_truncate_false_refuses_a_text_over_the_window(http):
    """TEI's truncate: false: a text the model would cut is a 413 ("validation"), as TEI answers; the tiers,
    which tokenize, tell. Left to the default, it is cut and scored."""
    long = "bone density " * 600
    for path, body, count in (("/rerank", {"query": QUERY, "texts": [TEXTS[0], long]}, 2),
                              ("/embed", {"inputs": ["short", long]}, 2),
                              ("/rerank", {"query": "vitamin d " * 200, "texts": [TEXTS[0]]}, 1)):
        refused = await http.post(path, json={**body, "truncate": False})
        assert "window" in assert_error(refused, path, 413)
        assert len((await http.post(path, json=body)).json()) == count


async def test_tei_embed_respects_normalize_with_dimensions(http):
    full = (await http.post("/embed", json={"inputs": "a text", "normalize": False})).json()[0]
    cut = (await http.post("/embed", json={"inputs": "a text", "normalize": False, "dimensions": 64})).json()[0]
    unit = (await http.post("/embed", json={"inputs": "a text", "dimensions": 64})).json()[0]
    np.testing.assert_allclose(cut, full[:64], atol=1e-6)  # the first dimensions, as the model gave them
    assert np.linalg.norm(cut) < 0.99 and np.linalg.norm(unit) == pytest.approx(1, abs=1e-5)


async def test_openapi_and_docs(http):
    spec = (await http.get("/openapi.json")).json()
    assert {"/v1/search", "/v1/documents", "/rerank", "/embed", "/v1/rerank", "/v2/rerank", "/v1/embeddings",
            "/info", "/health", "/metrics"} <= set(spec["paths"])
    assert spec["paths"]["/rerank"]["post"]["x-twostage-rpc"] == "Gateway/Rerank"
    assert "swagger" in (await http.get("/docs")).text.lower()


# --- Native routes ------------------------------------------------------------------------------------------

async def test_native_search_with_a_filter_and_documents(http, gateway_stub):
    doc = {"id": "http-face-1", "title": "Vitamin D", "text": "Vitamin D status and bone density in adults.",
           "metadata": {"year": 2021, "tags": ["bone"], "open": True}}
    written = await http.post("/v1/documents", json={"documents": [doc], "request_id": "http-face-write"})
    assert written.status_code == 200 and written.json()["upserted"] == 1
    assert (await http.get("/v1/documents/http-face-1")).json() == doc
    body = {"query": "vitamin D bone density", "top_k": 3, "recall_k": 10, "fusion": "calibrated",
            "fusion_alpha": 0.5, "recall_mode": "dense", "request_id": "http-1",
            "filter": {"clauses": [{"key": "year", "range": {"gte": 2020}}, {"key": "tags", "any_of": ["bone"]}]}}
    answer = (await http.post("/v1/search", json=body)).json()
    assert [h["id"] for h in answer["hits"]] == ["http-face-1"] and answer["request_id"] == "http-1"
    assert answer["hits"][0]["metadata"] == doc["metadata"] and answer["hits"][0]["relevance"] is not None
    # The same search over gRPC finds the same hit with the same score.
    reply = await gateway_stub.Search(gateway_pb2.SearchRequest(
        query=body["query"], top_k=3, recall_k=10, fusion=gateway_pb2.FUSION_CALIBRATED, fusion_alpha=0.5,
        recall_mode=common_pb2.RECALL_MODE_DENSE,  # as the HTTP body asks (hybrid would fuse another recall score)
        filter={"clauses": [{"key": "year", "range": {"gte": 2020}}, {"key": "tags", "any_of": {"values": [
            {"string_value": "bone"}]}}]}))
    assert [h.id for h in reply.hits] == ["http-face-1"]
    assert reply.hits[0].score == pytest.approx(answer["hits"][0]["score"], abs=1e-5)
    deleted = await http.delete("/v1/documents/http-face-1", params={"request_id": "http-face-delete"})
    assert deleted.json()["deleted"] == 1
    assert_error(await http.get("/v1/documents/http-face-1"), "/v1/documents", 404)


async def test_native_search_takes_feedback_fields_checked_as_grpc_checks_them(http, gateway_stub):
    """prf_depth and prf_weight on /v1/search: the same answer as over gRPC, and the same refusals."""
    body = {"query": "vitamin D bone density", "top_k": 5, "recall_k": 10, "skip_rerank": True,
            "recall_mode": "hybrid"}
    on, off = [(await http.post("/v1/search", json={**body, **fields})).json()
               for fields in ({"prf_depth": 3, "prf_weight": 0.5}, {"prf_depth": 0})]
    assert on["timings_ms"]["prf_ms"] > 0 and "prf_ms" not in off["timings_ms"]
    reply = await gateway_stub.Search(gateway_pb2.SearchRequest(
        query=body["query"], top_k=5, recall_k=10, skip_rerank=True, recall_mode=common_pb2.RECALL_MODE_HYBRID,
        prf_depth=3, prf_weight=0.5))
    assert [h["id"] for h in on["hits"]] == [h.id for h in reply.hits]
    for fields, message in (({"prf_weight": 1.5}, "prf_weight must be between 0 and 1, got 1.5"),
                            ({"prf_depth": 101}, "prf_depth must be between 0 and 100, got 101"),
                            ({"prf_depth": 11}, "prf_depth (11) must not exceed recall_k (10)")):
        answer = await http.post("/v1/search", json={**body, **fields})
        assert message in assert_error(answer, "/v1/search", 422)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway_stub.Search(gateway_pb2.SearchRequest(query=body["query"], top_k=5, recall_k=10,
                                                                **fields))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    for fields in ({"prf_depth": -1}, {"prf_weight": "0.5"}, {"prf_depth": 2.5}):  # not the field's type
        assert_error(await http.post("/v1/search", json={**body, **fields}), "/v1/search", 422)


async def test_documents_by_id_refuse_bad_ids(http):
    for bad in ("x" * 300, "%00nul", "%20padded", "tab%09inside%0a", "a" * 5000):
        for method in ("GET", "DELETE"):
            answer = await http.request(method, f"/v1/documents/{bad}")
            assert_error(answer, "/v1/documents", 422)
    assert_error(await http.delete("/v1/documents/x", params={"request_id": "r" * 129}), "/v1/documents", 422)


# --- gRPC: Gateway.Rerank and Gateway.Embed; one score whichever face --------------------------------------

async def test_scores_agree_across_http_grpc_and_the_rerank_tier(http, gateway_stub, rerank_target, channel_to):
    """Each face scores pairs no one has scored before (the tier's cache cannot answer for it), against the
    tier's own scores computed with the cache bypassed."""
    stamp = time.time_ns()
    for_http = [f"{t} (agreement over HTTP {stamp})" for t in TEXTS]
    for_grpc = [f"{t} (agreement over gRPC {stamp})" for t in TEXTS]
    tier = rerank_pb2_grpc.RerankStub(channel_to(rerank_target))
    direct = {}
    for texts in (for_http, for_grpc):
        reply = await tier.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=texts, bypass_cache=True))
        direct[texts[0]] = {r.index: r.score for r in reply.results}
    raw = await http.post("/rerank", json={"query": QUERY, "texts": for_http, "raw_scores": True})
    http_scores = {r["index"]: r["score"] for r in raw.json()}
    reply = await gateway_stub.Rerank(gateway_pb2.RerankTextsRequest(query=QUERY, documents=for_grpc,
                                                                     request_id="agree-1"))
    assert not reply.degraded and reply.scored == len(for_grpc) and reply.request_id == "agree-1"
    assert reply.cached == 0 and reply.model == "ms-marco-minilm-l12"
    grpc_scores = {r.index: r.score for r in reply.results}
    assert [r.index for r in reply.results] == sorted(grpc_scores, key=lambda i: -grpc_scores[i])
    assert all(r.relevance == pytest.approx(1 / (1 + np.exp(-r.score)), rel=1e-5) for r in reply.results)
    for i in range(len(TEXTS)):
        assert http_scores[i] == pytest.approx(direct[for_http[0]][i], abs=1e-4)
        assert grpc_scores[i] == pytest.approx(direct[for_grpc[0]][i], abs=1e-4)
    top = await gateway_stub.Rerank(gateway_pb2.RerankTextsRequest(query=QUERY, documents=for_grpc, top_n=1))
    best = direct[for_grpc[0]]
    assert [r.index for r in top.results] == [max(best, key=best.get)]


async def test_grpc_embed_matches_http(http, gateway_stub):
    reply = await gateway_stub.Embed(gateway_pb2.EmbedTextsRequest(texts=["a text", "another"], dimensions=0))
    assert reply.dims == 384 and len(reply.embeddings) == 2 and reply.model == "bge-small-en" and reply.tokens > 0
    over_http = (await http.post("/embed", json={"inputs": ["a text", "another"]})).json()
    np.testing.assert_allclose([list(e.values) for e in reply.embeddings], over_http, atol=1e-6)
    query = await gateway_stub.Embed(gateway_pb2.EmbedTextsRequest(texts=["a text"], is_query=True))
    assert len(query.embeddings[0].values) == 384


async def test_a_budget_that_affords_no_pair_is_504(http, gateway_stub):
    import grpc

    answer = await http.post("/rerank", json={"query": QUERY, "texts": TEXTS}, headers={"X-Twostage-Budget-Ms": "1"})
    assert_tei_error(answer, 504)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway_stub.Rerank(gateway_pb2.RerankTextsRequest(query=QUERY, documents=TEXTS, budget_ms=1))
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


# --- Bad input on every route: the right status, a JSON body, never a 500 -----------------------------------

BIG = "x" * (MAX_MESSAGE_MB * 2**20 + 1)
ROUTES = {
    "/v1/search": {"query": "q", "top_k": 2, "recall_k": 4},
    "/v1/documents": {"documents": [{"id": "d", "text": "t"}]},
    "/rerank": {"query": "q", "texts": ["t"]},
    "/embed": {"inputs": ["t"]},
    "/v1/rerank": {"model": "m", "query": "q", "documents": ["t"]},
    "/v2/rerank": {"model": "m", "query": "q", "documents": ["t"]},
    "/v1/embeddings": {"model": "m", "input": ["t"]},
}
LISTS = {"/v1/search": None, "/v1/documents": "documents", "/rerank": "texts", "/embed": "inputs",
         "/v1/rerank": "documents", "/v2/rerank": "documents", "/v1/embeddings": "input"}
STRING_FIELD = {"/v1/search": "query", "/v1/documents": "request_id", "/rerank": "query", "/embed": "inputs",
                "/v1/rerank": "query", "/v2/rerank": "query", "/v1/embeddings": "input"}
# Where each route takes a number (TEI's /rerank takes none: a text then).
NUMBER_FIELD = {"/v1/search": lambda n: {"fusion_alpha": n},
                "/v1/documents": lambda n: {"documents": [{"id": "d", "text": "t", "metadata": {"x": n}}]},
                "/rerank": lambda n: {"texts": ["t", n]}, "/embed": lambda n: {"dimensions": n},
                "/v1/rerank": lambda n: {"top_n": n}, "/v2/rerank": lambda n: {"top_n": n},
                "/v1/embeddings": lambda n: {"dimensions": n}}
# Statuses that differ by dialect: TEI's empty batch is a 400, its batch over the limit a 413.
EMPTY_LIST = {"/rerank": 400, "/embed": 400}
OVER_LIMIT_LIST = {"/rerank": 413, "/embed": 413}


def with_number(path: str, literal: str) -> bytes:
    """The good body with ``literal`` (NaN, Infinity, 1e999: not numbers JSON or a double can hold) in the
    route's number field."""
    marker = 12345.678
    return json.dumps({**ROUTES[path], **NUMBER_FIELD[path](marker)}).encode().replace(b"12345.678",
                                                                                       literal.encode())


def bad_bodies(path: str) -> list[tuple[str, bytes, int]]:
    good = ROUTES[path]
    first = json.dumps(good).encode()[1:]
    cases = [
        ("malformed JSON", b'{"query": ', 422),
        ("not an object", b"[1, 2]", 422),
        ("unknown field", json.dumps({**good, "surprise": 1}).encode(), 422),
        ("unknown fields, many", json.dumps({**good, **{f"x{i}": 1 for i in range(5000)}}).encode(), 422),
        ("a key twice", b'{"' + first.split(b'"', 2)[1] + b'": 1, ' + first, 422),
        ("wrong type", json.dumps({**good, STRING_FIELD[path]: 12}).encode(), 422),
        ("over the size limit", json.dumps({**good, "pad": BIG}).encode(), 413),
        ("not UTF-8", b'{"query": "\xff\xfe"}', 422),
    ]
    cases += [(f"{literal} number", with_number(path, literal), 422)
              for literal in ("NaN", "Infinity", "-Infinity", "1e999")]
    if LISTS[path]:
        item = good[LISTS[path]][0]
        cases += [("empty list", json.dumps({**good, LISTS[path]: []}).encode(), EMPTY_LIST.get(path, 422)),
                  ("over-limit list", json.dumps({**good, LISTS[path]: [item] * 1001 if path != "/v1/documents" else
                                                  [{"id": f"d{i}", "text": "t"} for i in range(1001)]}).encode(),
                   OVER_LIMIT_LIST.get(path, 422))]
    if path == "/v1/search":
        cases += [("NaN bound", b'{"query": "q", "filter": {"clauses": [{"key": "y", "range": {"gte": NaN}}]}}', 422),
                  ("over-limit list", json.dumps({**good, "filter": {"clauses": [{"key": "y", "equals": 1}] * 33}}
                                                 ).encode(), 422),
                  ("negative top_k", json.dumps({**good, "top_k": -1}).encode(), 422)]
    if path in ("/embed", "/v1/embeddings"):
        cases += [("token ids", json.dumps({**good, LISTS[path]: [[1, 2]]}).encode(), 422),
                  ("over the embed limit", json.dumps({**good, LISTS[path]: ["t"] * (MAX_EMBED_TEXTS + 1)}).encode(),
                   OVER_LIMIT_LIST.get(path, 422))]
    return cases


@pytest.mark.parametrize("path", list(ROUTES))
async def test_bad_input_on_every_route(http, path):
    assert (await http.post(path, json=ROUTES[path])).status_code == 200, path  # the good body is good
    for case, content, status in bad_bodies(path):
        answer = await http.post(path, content=content, headers={"content-type": "application/json"})
        assert_error(answer, path, status)
    message = assert_error(await http.post(path, content=json.dumps({**ROUTES[path], "surprise": 1, "odd": 2})),
                           path, 422)
    assert "content-type" in message


async def test_a_pathological_body_does_not_hold_the_event_loop(http):
    """Lists of a hundred thousand wrong items, each a new error for every branch of a union: refused with
    one error, and the event loop (this test's, which the face shares) keeps its turns while the body is parsed
    and checked: its longest stall stays within a few times what parsing the body takes here, whatever the CPU."""
    items = b",".join([b"1"] * 100_000)
    bodies = {"/rerank": b'{"query": "q", "texts": ["t", ' + items + b"]}",
              "/embed": b'{"inputs": ["t", ' + items + b"]}",
              "/v1/embeddings": b'{"input": ["t", ' + items + b"]}",
              "/v2/rerank": b'{"model": "m", "query": "q", "documents": ["t", ' + items + b"]}",
              "/v1/documents": b'{"documents": [{"id": "d", "text": "t", "metadata": {"x": [' + items + b"]}}]}",
              "/v1/search": b'{"query": "q", "filter": {"clauses": [{"key": "k", "any_of": [[], ' +
              items.replace(b"1", b"[]") + b"]}]}}"}
    # What this suite's earlier tests left on the heap is not the face's: frozen, a full collection that the
    # body's objects set off does not walk it (the body's own objects are still collected as they would be).
    gc.collect()
    gc.freeze()
    try:
        await send_pathological_bodies(http, bodies)
    finally:
        gc.unfreeze()


async def send_pathological_bodies(http, bodies: dict[str, bytes]) -> None:
    for path, body in bodies.items():
        started = time.perf_counter()
        json.loads(body)
        parse_s = time.perf_counter() - started
        stalls, done = [], asyncio.Event()

        async def tick(stalls=stalls, done=done):
            while not done.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.002)
                stalls.append(time.perf_counter() - before)

        ticker = asyncio.create_task(tick())
        answer = await http.post(path, content=body, headers={"content-type": "application/json"})
        done.set()
        await ticker
        message = assert_error(answer, path, 422)
        more = message.rpartition("(and ")[2].split(" ")[0]
        assert not more.isdigit() or int(more) < 10, message  # one error (or a few), not one per item
        assert max(stalls) < 5 * parse_s + 0.1, (path, max(stalls), parse_s)


async def test_a_body_over_the_limit_is_refused_before_it_is_read(face):
    """The declared length alone decides: the 413 comes back while the body is still unsent."""
    host, port = face[0].removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /rerank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 1099511627776\r\n\r\n{")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    assert status_line.split()[1] == b"413"


async def wait_for(condition, timeout_s: float = 30) -> None:
    """Until ``condition()`` holds (checked every 10 ms), or fail."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_client_that_goes_away_cancels_its_work(face, http):
    """As gRPC cancels a call whose caller left: the rerank stops, and is counted as CANCELLED."""
    host, port = face[0].removeprefix("http://").split(":")
    body = json.dumps({"query": QUERY, "texts": [f"{i} {TEXTS[i % 4]} (left behind)" for i in range(60)]}).encode()
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /rerank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await wait_for(lambda: face[2].in_flight == 1)
    assert face[3].slots.in_use == 1  # the slot it holds is one of the gateway's, which gRPC counts too
    writer.close()
    await wait_for(lambda: face[2].in_flight == 0)
    assert face[3].slots.in_use == 0
    metrics = (await http.get("/metrics")).text
    assert 'twostage_rpc_requests_total{code="CANCELLED",method="Gateway/Rerank",protocol="http"}' in metrics


# --- What the face answers before a route runs: heads, slow senders, slots, unknown routes ------------------

def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


async def exchange(base: str, data: bytes, timeout_s: float = 15) -> bytes:
    """Send ``data`` on a new connection (then nothing more), and read until the server closes it (b"" when it
    reset the connection first)."""
    reader, writer = await asyncio.open_connection(*address(base))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def request(path: str, body: bytes, headers: dict[bytes, bytes] | None = None, method: bytes = b"POST") -> bytes:
    head = b"%s %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n" % (
        method, path.encode())
    head += b"".join(name + b": " + value + b"\r\n" for name, value in (headers or {}).items())
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


async def test_headers_over_the_limit_are_refused(guarded):
    """64 KiB of request line and headers at most: beyond, a 431 (or the connection closed), whether the head
    comes whole or never ends; nothing more of it is kept."""
    whole = b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 70_000 + b"\r\n\r\n"
    endless = b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000)
                                                                  for i in range(100))
    for head in (whole, endless):
        reply = await exchange(guarded[0], head)
        assert status_of(reply) in (431, 0), reply[:100]  # 0: closed (reset) before the client read it
    assert (await exchange(guarded[0], b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            ).startswith(b"HTTP/1.1 200")


async def test_a_request_that_never_finishes_its_head_is_closed(guarded):
    """The head must arrive within message_timeout_s (1 s here), counted from the connection or the request's
    first byte: a connection that says nothing is closed, one that stops halfway gets a 408."""
    started = time.perf_counter()
    silent, half = await asyncio.gather(exchange(guarded[0], b""),
                                        exchange(guarded[0], b"GET /health HTTP/1.1\r\nhost: x\r\n"))
    assert silent == b"" and status_of(half) == 408, half[:100]
    assert time.perf_counter() - started < 10


async def test_slow_bodies_get_408_hold_no_slot_and_leave_health_ready(guarded):
    """Bodies that trickle in fill only the bodies-arriving count (max_concurrent_rpcs, 2 here): they hold no
    slot of the work, /health and /metrics answer meanwhile, new requests get a 429, and each slow body ends
    in a 408 after message_timeout_s."""
    base, _, face, server = guarded
    slow = [asyncio.create_task(exchange(base, request("/v1/search", b'{"query":' + b" " * 100)[:-90]))
            for _ in range(2)]
    await wait_for(lambda: face.uploads == 2)
    assert server.slots.in_use == 0
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert_error(await client.post("/v1/search", json={"query": "q"}), "/v1/search", 429)
    replies = await asyncio.gather(*slow)  # each answered, then closed (the unread rest is no next request)
    assert [status_of(r) for r in replies] == [408, 408]


async def test_a_body_streamed_past_the_limit_gets_its_413(guarded):
    """Refused as soon as it passes max_message_mb (1 here), while the client still sends: the rest is read and
    dropped (within bounds) so that the client reads the 413, and the connection then closes."""

    async def chunks():
        yield b'{"query": "q", "texts": ["'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"]}'

    async with httpx.AsyncClient(base_url=guarded[0], timeout=30) as client:
        answer = await client.post("/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert "max_message_mb" in assert_error(answer, "/rerank", 413)


async def test_http_and_grpc_share_one_limit(guarded, channel_to):
    """max_concurrent_rpcs counts gRPC calls and HTTP requests together; /health is never refused for it."""
    base, target, _, server = guarded
    stub = gateway_pb2_grpc.GatewayStub(channel_to(target))
    server.slots.take()
    server.slots.take()
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert_error(await client.post("/v1/embeddings", json={"input": "t"}), "/v1/embeddings", 429)
            assert (await client.get("/health")).status_code == 200
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Info(common_pb2.InfoRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.slots.give_back()
        server.slots.give_back()
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # with slots free, the call runs (and finds no shard)
        await stub.Search(gateway_pb2.SearchRequest(query="q"), timeout=10)
    assert caught.value.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unknown_routes_and_methods_answer_in_their_dialect(guarded):
    async with httpx.AsyncClient(base_url=guarded[0], timeout=10) as client:
        for method, path, dialect_path, status in (
                ("GET", "/nowhere", "/rerank", 404), ("GET", "/rerank", "/rerank", 405),
                ("GET", "/v1/embeddings", "/v1/embeddings", 405), ("POST", "/v1/models", "/v1/embeddings", 404),
                ("GET", "/v2/rerank", "/v2/rerank", 405), ("POST", "/v2/embed", "/v2/rerank", 404),
                ("GET", "/v1/search", "/v1/search", 405), ("PUT", "/v1/documents/x", "/v1/documents", 405)):
            assert_error(await client.request(method, path), dialect_path, status)


async def test_odd_header_values_are_refused_never_a_500(guarded, caplog):
    """X-Twostage-Budget-Ms and X-Request-Id as raw bytes: what is not a number (in ASCII digits) or a request
    id is a 422 in the route's dialect; only a well-formed request id reaches the access log."""
    caplog.set_level(logging.INFO, logger="twostage.access")
    bodies = {"/rerank": b'{"query":"q","texts":["t"]}', "/v1/rerank": b'{"model":"m","query":"q","documents":["t"]}',
              "/v1/embeddings": b'{"input":"t"}'}
    budgets = [b"\xb2", b"\xd9\xa1\xd9\xa2", b"\xef\xbc\x91", b"99999999999", b"-1", b"1.5", b"0x10", b"1e3",
               b"\xff\xfe", b"12abc"]
    ids = [b"\xb2", b"\xffred", b"a b", b"x" * 129, b"<script>", b"%0a"]
    for path, body in bodies.items():
        for value in budgets:
            reply = await exchange(guarded[0], request(path, body, {b"x-twostage-budget-ms": value}))
            assert status_of(reply) == 422, (path, value, reply[:200])
        for value in ids:
            reply = await exchange(guarded[0], request(path, body, {b"x-request-id": value}))
            assert status_of(reply) == 422, (path, value, reply[:200])
        for value in (b"\x1b[31mred", b"id\x7f", b"a\x00b"):  # control characters: the parser's own 400
            reply = await exchange(guarded[0], request(path, body, {b"x-request-id": value}))
            assert status_of(reply) == 400, (path, value, reply[:200])
    logged = [r.request_id for r in caplog.records if r.name == "twostage.access"]
    assert logged and set(logged) == {""}
    caplog.clear()
    reply = await exchange(guarded[0], request("/rerank", bodies["/rerank"], {b"x-request-id": b"req-7:ok/x"}))
    assert status_of(reply) == 503  # a well-formed id passes (the tier is down here)
    assert [r.request_id for r in caplog.records if r.name == "twostage.access"] == ["req-7:ok/x"]


def test_the_access_log_takes_only_printable_bounded_request_ids(caplog):
    """Whatever face a call came through (gRPC logs the request's own field, before any check)."""
    from twostage.metrics import observe_rpc

    caplog.set_level(logging.INFO, logger="twostage.access")
    for given, logged in (("req-1", "req-1"), ("a\nforged line", ""), ("\x1b[31m", ""), ("x" * 129, "")):
        caplog.clear()
        observe_rpc("Gateway/Search", "OK", "grpc", 0.001, given)
        assert [r.request_id for r in caplog.records] == [logged]


async def test_large_answers_are_written_off_the_loop_and_within_the_limit(monkeypatch):
    from gateway.http import face as face_module
    from twostage import errors

    threads = []
    write = face_module._vector_rows

    def recorded(vectors, limit):
        threads.append(threading.current_thread() is threading.main_thread())
        return write(vectors, limit)

    monkeypatch.setattr(face_module, "_vector_rows", recorded)
    vectors = np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32)
    rows = await face_module.vector_rows(vectors, 2**20)
    assert [json.loads(r) for r in rows] == vectors.tolist() and threads == [False]  # on a worker thread
    await face_module.vector_rows(vectors[:2], 2**20)
    assert threads == [False, True]  # small: on the loop
    with pytest.raises(errors.TooLarge, match="max_message_mb"):
        await face_module.vector_rows(vectors, 100_000)


# --- Compatibility routes answer every text or an error ---------------------------------------------------

async def test_compat_rerank_answers_every_text_or_an_error(http):
    """TEI's and Cohere's clients take a short list for the whole: those routes rank every text or refuse,
    at once, what the budget cannot cover (413 saying how many fit, or 429 under load); only with
    X-Twostage-Allow-Partial may an answer hold fewer, and it then says so."""
    info = (await http.get("/info")).json()
    most = info["max_client_batch_size"]
    assert 0 < most <= info["twostage"]["max_rerank_texts"]
    # max_client_batch_size counts texts as long as the model reads (each pair is priced by its length), in
    # the compatibility budget; a budget a quarter of what about 20 such texts need cannot take 80 of them.
    from gateway.config import GatewaySettings

    budget_ms = max(1, GatewaySettings().compat_budget_ms * 5 // most)
    too_many = [f"{i} " + "coral reefs bleach when the sea warms " * 40 for i in range(80)]
    refused = await http.post("/rerank", json={"query": QUERY, "texts": too_many},
                              headers={"X-Twostage-Budget-Ms": str(budget_ms)})
    assert refused.status_code in (413, 504), refused.text  # 504: not even one text fits that budget
    assert_error(refused, "/rerank", refused.status_code)
    texts = [f"{i}: {TEXTS[i % 4]} (whole or nothing)" for i in range(80)]
    for path, body in (("/rerank", {"query": QUERY, "texts": texts}),
                       ("/v2/rerank", {"model": "m", "query": QUERY, "documents": texts})):
        answer = await http.post(path, json=body, headers={"X-Twostage-Budget-Ms": "600"})
        if answer.status_code == 200:
            ranks = answer.json() if path == "/rerank" else answer.json()["results"]
            assert sorted(r["index"] for r in ranks) == list(range(80))
            assert "x-twostage-degraded" not in answer.headers
        else:
            message = assert_error(answer, path, answer.status_code)
            assert answer.status_code in (413, 429, 504), message
            if answer.status_code == 413:
                assert "at most" in message
    partial = await http.post("/rerank", json={"query": QUERY, "texts": texts},
                              headers={"X-Twostage-Budget-Ms": "600", "X-Twostage-Allow-Partial": "true"})
    assert partial.status_code == 200, partial.text
    indices = [r["index"] for r in partial.json()]
    assert indices and len(set(indices)) == len(indices) <= 80
    if len(indices) < 80:
        assert partial.headers["x-twostage-degraded"].startswith("rerank_partial")
    assert_error(await http.post("/rerank", json={"query": QUERY, "texts": texts},
                                 headers={"X-Twostage-Allow-Partial": "maybe"}), "/rerank", 422)


# --- Tokens (401, 403) and TLS as gRPC has them; 503 when a tier is down ------------------------------------

@pytest.fixture(scope="module")
async def secured(tmp_path_factory):
    """A gateway with TLS and tokens whose stages are down: (base URL, CA file, search token, admin token)."""
    root = tmp_path_factory.mktemp("http-secrets")
    write_dev_certs(root / "tls")
    search, admin = add_token(root / "tokens", "search"), add_token(root / "tokens", "admin")
    server = build_server(GatewaySettings(port=0, http_port=0, recall_targets="127.0.0.1:1",
                                          rerank_targets="127.0.0.1:1", startup_wait_s=0, tls_dir=root / "tls",
                                          auth_tokens=root / "tokens"))
    await server.start()
    yield f"https://localhost:{server.listeners[0].port}", root / "tls" / "ca.pem", search, admin
    await server.stop(grace_s=1)


async def test_tokens_and_roles_over_https(secured):
    base, ca, search, admin = secured
    async with httpx.AsyncClient(base_url=base, verify=ssl.create_default_context(cafile=ca), timeout=30) as client:
        assert (await client.get("/health")).status_code == 200  # open, for probes
        missing = await client.post("/v1/embeddings", json={"input": "t"})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "missing token" in missing.json()["error"]["message"]
        unknown = await client.post("/v2/rerank", json={"model": "m", "query": "q", "documents": ["t"]},
                                    headers={"authorization": "Bearer ts_not-a-token"})
        assert unknown.status_code == 401 and unknown.json() == {"message": "unknown token"}
        denied = await client.post("/v1/documents", json={"documents": [{"id": "d", "text": "t"}]},
                                   headers={"authorization": f"Bearer {search}"})
        assert denied.status_code == 403 and "admin token" in denied.json()["error"]["message"]
        # Past auth, the tier being down is a 503 with Retry-After, in the route's dialect.
        down = await client.post("/rerank", json={"query": "q", "texts": ["t"]},
                                 headers={"authorization": f"Bearer {search}"})
        assert_tei_error(down, 503)
        assert down.headers["retry-after"] == "1"
        down = await client.post("/v1/search", json={"query": "q"}, headers={"authorization": f"Bearer {admin}"})
        assert down.status_code == 503 and down.json()["error"]["status"] == "UNAVAILABLE"
        refused_info = counted("Gateway/Info", "UNAUTHENTICATED")
        for path in ("/metrics", "/v1/info", "/info"):
            assert_error(await client.get(path), path, 401)
        assert counted("Gateway/Info", "UNAUTHENTICATED") == refused_info + 2  # /v1/info and /info, not /metrics
        assert (await client.get("/metrics", headers={"authorization": f"Bearer {search}"})).status_code == 200
        deleting = await client.delete("/v1/documents/d", headers={"authorization": f"Bearer {search}"})
        assert "admin token" in assert_error(deleting, "/v1/documents", 403)
    async with httpx.AsyncClient(base_url=base.replace("https", "http"), timeout=10) as plaintext:
        with pytest.raises(httpx.HTTPError):
            await plaintext.get("/health")


def test_every_status_has_its_http_answer():
    from gateway.http.cohere import COHERE
    from gateway.http.face import error_response
    from gateway.http.native import NATIVE
    from gateway.http.openai import OPENAI
    from gateway.http.tei import TEI, Empty
    from twostage import errors

    paths = {NATIVE: "/v1/search", TEI: "/rerank", COHERE: "/v1/rerank", OPENAI: "/v1/embeddings"}
    for error, status in ((errors.Overloaded("busy"), 429), (errors.TooLarge("big"), 413),
                          (errors.DeadlineExceeded("late"), 504), (errors.NotReady("starting"), 503),
                          (errors.Unauthenticated("who"), 401), (errors.PermissionDenied("no"), 403),
                          (errors.RequestTimeout("slow"), 408), (errors.InvalidArgument("bad"), 422),
                          (errors.NotFound("none"), 404), (ValueError("a bug"), 500)):
        for dialect, path in paths.items():
            answer = error_response(dialect, error)
            response = httpx.Response(answer.status_code, headers=answer.headers, content=answer.body)
            assert_error(response, path, status)
            assert ("www-authenticate" in answer.headers) == (status == 401)
            assert "a bug" not in answer.body.decode()
    assert error_response(TEI, errors.Overloaded("busy", retry_after_s=7)).headers["retry-after"] == "7"
    empty = error_response(TEI, Empty("`texts` cannot be empty"))
    assert empty.status_code == 400 and json.loads(empty.body)["error_type"] == "empty"
