"""The gateway's HTTP/JSON face and Gateway.Rerank / Gateway.Embed, over real recall and rerank servers: the
official OpenAI and Cohere SDKs unmodified, TEI's schema field by field, scores that agree across HTTP, gRPC
and the rerank tier, bad input on every route, and tokens and TLS as gRPC has them."""

import asyncio
import json
import ssl

import cohere
import httpx
import numpy as np
import openai
import pytest

from gateway.config import GatewaySettings
from gateway.servicer import build_server
from twostage.auth import add_token
from twostage.dev_certs import write_dev_certs
from twostage.v1 import gateway_pb2, gateway_pb2_grpc, rerank_pb2, rerank_pb2_grpc

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
    yield f"http://127.0.0.1:{server.listeners[0].port}", f"127.0.0.1:{port}", server.listeners[0]
    await server.stop(grace_s=1)


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


async def test_cohere_sdk_v2_and_v1_rerank(face):
    v2 = cohere.ClientV2(base_url=face[0], api_key="unused")
    ranked = await asyncio.to_thread(v2.rerank, model="rerank-v3.5", query=QUERY, documents=TEXTS, top_n=2)
    assert [r.index for r in ranked.results] == [0, 2] or [r.index for r in ranked.results] == [2, 0]
    assert all(0 <= r.relevance_score <= 1 for r in ranked.results)
    v1 = cohere.Client(base_url=face[0], api_key="unused")
    ranked = await asyncio.to_thread(v1.rerank, model="rerank-english-v3.0", query=QUERY,
                                     documents=[TEXTS[0], {"text": TEXTS[1]}], return_documents=True)
    assert [r.index for r in ranked.results] == [0, 1]
    assert ranked.results[0].document.text == TEXTS[0] and ranked.results[1].document.text == TEXTS[1]
    assert ranked.id and ranked.results[0].relevance_score > ranked.results[1].relevance_score


# --- TEI's schema, field by field --------------------------------------------------------------------------

def assert_tei_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"]
    assert body["error_type"] in {"unhealthy", "backend", "overloaded", "validation", "tokenizer"}


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

    info = (await http.get("/info")).json()
    required = {"model_id": str, "model_dtype": str, "model_type": dict, "max_concurrent_requests": int,
                "max_input_length": int, "max_batch_tokens": int, "max_client_batch_size": int,
                "auto_truncate": bool, "tokenization_workers": int, "version": str}
    assert all(isinstance(info[name], kind) for name, kind in required.items())
    assert info["model_id"] == "ms-marco-minilm-l12" and set(info["model_type"]["reranker"]) == {"id2label",
                                                                                                 "label2id"}
    assert (await http.get("/health")).status_code == 200
    metrics = (await http.get("/metrics")).text
    assert 'twostage_rpc_requests_total{code="OK",method="Gateway/Rerank",protocol="http"}' in metrics
    assert_tei_error(await http.post("/rerank", json={"query": QUERY, "texts": []}), 422)


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
        filter={"clauses": [{"key": "year", "range": {"gte": 2020}}, {"key": "tags", "any_of": {"values": [
            {"string_value": "bone"}]}}]}))
    assert [h.id for h in reply.hits] == ["http-face-1"]
    assert reply.hits[0].score == pytest.approx(answer["hits"][0]["score"], abs=1e-5)
    deleted = await http.delete("/v1/documents/http-face-1", params={"request_id": "http-face-delete"})
    assert deleted.json()["deleted"] == 1
    missing = await http.get("/v1/documents/http-face-1")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


# --- gRPC: Gateway.Rerank and Gateway.Embed; one score whichever face --------------------------------------

async def test_scores_agree_across_http_grpc_and_the_rerank_tier(http, gateway_stub, rerank_target, channel_to):
    texts = [f"{t} (agreement check)" for t in TEXTS]
    tier = await rerank_pb2_grpc.RerankStub(channel_to(rerank_target)).Rerank(
        rerank_pb2.RerankRequest(query=QUERY, documents=texts, bypass_cache=True))
    direct = {r.index: r.score for r in tier.results}
    reply = await gateway_stub.Rerank(gateway_pb2.RerankTextsRequest(query=QUERY, documents=texts,
                                                                     request_id="agree-1"))
    assert not reply.degraded and reply.scored == len(texts) and reply.request_id == "agree-1"
    assert reply.model == "ms-marco-minilm-l12"
    grpc_scores = {r.index: r.score for r in reply.results}
    assert [r.index for r in reply.results] == sorted(grpc_scores, key=lambda i: -grpc_scores[i])
    assert all(r.relevance == pytest.approx(1 / (1 + np.exp(-r.score)), rel=1e-5) for r in reply.results)
    raw = (await http.post("/rerank", json={"query": QUERY, "texts": texts, "raw_scores": True})).json()
    http_scores = {r["index"]: r["score"] for r in raw}
    for i in range(len(texts)):
        assert grpc_scores[i] == pytest.approx(direct[i], abs=1e-4)
        assert http_scores[i] == pytest.approx(direct[i], abs=1e-4)
    top = await gateway_stub.Rerank(gateway_pb2.RerankTextsRequest(query=QUERY, documents=texts, top_n=1))
    assert [r.index for r in top.results] == [max(direct, key=direct.get)]


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
NAN = float("nan")
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


def bad_bodies(path: str) -> list[tuple[str, bytes, int]]:
    good = ROUTES[path]
    cases = [
        ("malformed JSON", b'{"query": ', 422),
        ("not an object", b"[1, 2]", 422),
        ("unknown field", json.dumps({**good, "surprise": 1}).encode(), 422),
        ("wrong type", json.dumps({**good, STRING_FIELD[path]: 12}).encode(), 422),
        ("NaN", json.dumps({**good, STRING_FIELD[path]: NAN}).encode(), 422),
        ("over the size limit", json.dumps({**good, "pad": BIG}).encode(), 413),
    ]
    if LISTS[path]:
        item = good[LISTS[path]][0]
        cases += [("empty list", json.dumps({**good, LISTS[path]: []}).encode(), 422),
                  ("over-limit list", json.dumps({**good, LISTS[path]: [item] * 1001 if path != "/v1/documents" else
                                                  [{"id": f"d{i}", "text": "t"} for i in range(1001)]}).encode(), 422)]
    if path == "/v1/search":
        cases += [("NaN number", json.dumps({**good, "fusion_alpha": NAN}).encode(), 422),
                  ("NaN bound", json.dumps({**good, "filter": {"clauses": [{"key": "y", "range": {"gte": NAN}}]}}
                                           ).encode(), 422),
                  ("over-limit list", json.dumps({**good, "filter": {"clauses": [{"key": "y", "equals": 1}] * 33}}
                                                 ).encode(), 422),
                  ("negative top_k", json.dumps({**good, "top_k": -1}).encode(), 422)]
    if path in ("/embed", "/v1/embeddings"):
        cases += [("token ids", json.dumps({**good, LISTS[path]: [[1, 2]]}).encode(), 422),
                  ("over the embed limit", json.dumps({**good, LISTS[path]: ["t"] * (MAX_EMBED_TEXTS + 1)}).encode(),
                   422)]
    return cases


def error_message(path: str, body) -> str:
    if path in ("/rerank", "/embed"):
        return body["error"]
    if path in ("/v1/rerank", "/v2/rerank"):
        return body["message"]
    return body["error"]["message"]


@pytest.mark.parametrize("path", list(ROUTES))
async def test_bad_input_on_every_route(http, path):
    assert (await http.post(path, json=ROUTES[path])).status_code == 200, path  # the good body is good
    for case, content, status in bad_bodies(path):
        answer = await http.post(path, content=content, headers={"content-type": "application/json"})
        assert answer.status_code == status, (path, case, answer.text[:300])
        assert error_message(path, answer.json()), (path, case)


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
    writer.close()
    await wait_for(lambda: face[2].in_flight == 0)
    metrics = (await http.get("/metrics")).text
    assert 'twostage_rpc_requests_total{code="CANCELLED",method="Gateway/Rerank",protocol="http"}' in metrics


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
    async with httpx.AsyncClient(base_url=base.replace("https", "http"), timeout=10) as plaintext:
        with pytest.raises(httpx.HTTPError):
            await plaintext.get("/health")


def test_every_status_has_its_http_answer():
    from gateway.http.cohere import COHERE
    from gateway.http.face import error_response
    from gateway.http.native import NATIVE
    from gateway.http.openai import OPENAI
    from gateway.http.tei import TEI
    from twostage import errors

    for error, status in ((errors.Overloaded("busy"), 429), (errors.TooLarge("big"), 413),
                          (errors.DeadlineExceeded("late"), 504), (errors.NotReady("starting"), 503),
                          (errors.PermissionDenied("no"), 403), (ValueError("a bug"), 500)):
        for dialect in (NATIVE, TEI, COHERE, OPENAI):
            answer = error_response(dialect, error)
            assert answer.status_code == status
            assert ("retry-after" in answer.headers) == (status in (429, 503))
            assert "a bug" not in answer.body.decode()
    assert json.loads(error_response(OPENAI, errors.Overloaded("busy")).body)["error"]["type"] == "rate_limit_error"
