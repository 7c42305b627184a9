"""Property-based fuzzing of every RPC of every service against a running stack
(real processes): thousands of generated requests, boundary values, odd text and
metadata. No request may crash a server or come back INTERNAL or UNKNOWN; every
rejection names what was wrong; afterwards every replica still answers normally.

Requests are drawn in batches and sent concurrently, so the run stays bounded in
time; the whole module sends at least 10,000.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twostage.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    recall_pb2,
    recall_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
)

pytestmark = pytest.mark.slow
BATCH = 50
OUTCOMES: Counter = Counter()  # (service.method, status) -> count
# Words a rejection may name; every INVALID_ARGUMENT must name one of them.
FIELDS = ("query", "k", "top_k", "recall_k", "budget_ms", "request_id", "texts", "documents", "document", "ids",
          "id", "metadata", "model", "top_n", "dimensions")


def limit_and_neighbours(limit: int) -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, limit - 1, limit, limit + 1])


odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=10),  # control characters
    st.sampled_from(["", " ", "\t\n", "\x00", "é", "你好", "🙂" * 10, "a" * 2047, "a" * 2048, "a" * 2049,
                     "word " * 409, "b12 " * 600]),
)
ids = st.one_of(st.text(max_size=20), st.sampled_from(["a", " a", "a ", "x" * 256, "x" * 257, "a\x00b", "dup"]))
metadata_values = st.one_of(
    st.builds(lambda s: common_pb2.MetadataValue(string_value=s), st.text(max_size=30)),
    st.builds(lambda x: common_pb2.MetadataValue(number_value=x), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda b: common_pb2.MetadataValue(bool_value=b), st.booleans()),
    st.builds(lambda v: common_pb2.MetadataValue(string_list=common_pb2.StringList(values=v)),
              st.lists(st.text(max_size=5), max_size=300)),
    st.just(common_pb2.MetadataValue()),
)
documents = st.builds(
    lambda i, t, x, m: common_pb2.Document(id=i, title=t, text=x, metadata=m),
    ids, st.text(max_size=30), odd_text,
    st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(["lang", "year", "bad key!"])), metadata_values,
                    max_size=4),
)
doc_lists = st.one_of(st.lists(documents, max_size=4),
                      st.integers(999, 1001).map(lambda n: [common_pb2.Document(id=f"n{i}", text="t")
                                                            for i in range(n)]))
id_lists = st.one_of(st.lists(ids, max_size=5), st.integers(999, 1001).map(lambda n: [f"n{i}" for i in range(n)]))
rerank_docs = st.one_of(st.lists(odd_text, max_size=4), st.sampled_from([[], ["d"] * 1000, ["d"] * 1001,
                                                                          ["x" * 100_001]]))

SEARCH = st.builds(gateway_pb2.SearchRequest, query=odd_text, top_k=limit_and_neighbours(1000),
                   recall_k=st.one_of(limit_and_neighbours(1000), st.integers(1, 20)),
                   budget_ms=st.sampled_from([0, 1, 5, 25, 100, 300, 2**31 - 1, 2**32 - 1]),
                   request_id=st.one_of(st.just(""), st.text(max_size=130)))
RECALL_SEARCH = st.builds(recall_pb2.RecallSearchRequest, query=odd_text, k=limit_and_neighbours(1000))
EMBED = st.builds(recall_pb2.EmbedRequest, texts=st.one_of(st.lists(odd_text, max_size=3),
                                                           st.sampled_from([["a"] * 256, ["a"] * 257])),
                  is_query=st.booleans(), model=st.sampled_from(["", "bge-small-en", "other"]))
UPSERT = st.builds(common_pb2.UpsertRequest, documents=doc_lists)
DELETE = st.builds(common_pb2.DeleteRequest, ids=id_lists)
GET = st.builds(common_pb2.GetRequest, ids=id_lists)
RERANK = st.builds(rerank_pb2.RerankRequest, query=odd_text, documents=rerank_docs, top_n=limit_and_neighbours(1000),
                   model=st.sampled_from(["", "ms-marco-minilm-l12", "bge"]))
GATEWAY_RERANK = st.builds(gateway_pb2.RerankTextsRequest, query=odd_text, documents=rerank_docs,
                           top_n=limit_and_neighbours(1000), budget_ms=st.sampled_from([0, 1, 25, 300, 2**32 - 1]),
                           model=st.sampled_from(["", "ms-marco-minilm-l12", "bge"]))
GATEWAY_EMBED = st.builds(gateway_pb2.EmbedTextsRequest, texts=st.one_of(st.lists(odd_text, max_size=3),
                                                                         st.sampled_from([["a"] * 300, ["a"] * 2049])),
                          is_query=st.booleans(), dimensions=st.sampled_from([0, 1, 383, 384, 385]),
                          normalize=st.booleans(), model=st.sampled_from(["", "bge-small-en", "other"]))
INFO = st.just(common_pb2.InfoRequest())


@pytest.fixture(scope="module")
def stack(built_index, tmp_path_factory):
    """serve all on a copy of the test index, two rerank replicas, and budgets capped so that the
    run is bounded by what the CPU can do, not by the generated budgets."""
    from tests.system.test_cli import free_port_run, wait_for_line

    index = tmp_path_factory.mktemp("fuzz") / "index"
    shutil.copytree(built_index, index)
    port = free_port_run(4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TWOSTAGE_GATEWAY_MAX_BUDGET_MS": "500",
           "TWOSTAGE_GATEWAY_DEFAULT_BUDGET_MS": "300"}
    process = subprocess.Popen(
        [sys.executable, "-m", "twostage", "serve", "all", "--port", str(port), "--index-dir", str(index),
         "--rerank-replicas", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    wait_for_line(process, "twostage is serving")
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{port + offset}")
                for name, offset in (("gateway", 0), ("recall", 1), ("rerank", 2), ("rerank2", 3))}
    yield {"process": process, "port": port, **channels}
    for channel in channels.values():
        channel.close()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)


def send_all(name: str, method, requests: list) -> None:
    """Send concurrently; record and check each outcome."""
    def one(request):
        try:
            method(request, timeout=120)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details() or ""

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(one, requests))
    for request, (code, details) in zip(requests, outcomes):
        OUTCOMES[(name, code.name)] += 1
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE), (
            f"{name}: {code.name}: {details} for {str(request)[:300]!r}"
        )
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            assert any(field in details for field in FIELDS), f"{name}: unnamed field in {details!r}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            # Only the gateway's own budget (at most 500 ms here) may end a call like this: the client's
            # deadline is 120 s, and the stages have no budget of their own.
            assert name in ("Gateway.Search", "Gateway.Rerank", "Gateway.Embed"), details
        else:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), f"{name}: {code.name}: {details}"


def fuzz(name: str, strategy, channel_name: str, stub_cls, method: str, examples: int):
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(strategy, min_size=BATCH, max_size=BATCH))
    def run(stack, requests):
        send_all(name, getattr(stub_cls(stack[channel_name]), method), requests)

    return run


# (service.method, strategy, channel, stub, method, batches of BATCH requests)
CASES = [
    ("Gateway.Search", SEARCH, "gateway", gateway_pb2_grpc.GatewayStub, "Search", 55),
    ("Gateway.Upsert", UPSERT, "gateway", gateway_pb2_grpc.GatewayStub, "Upsert", 4),
    ("Gateway.Delete", DELETE, "gateway", gateway_pb2_grpc.GatewayStub, "Delete", 10),
    ("Gateway.Get", GET, "gateway", gateway_pb2_grpc.GatewayStub, "Get", 14),
    ("Gateway.Info", INFO, "gateway", gateway_pb2_grpc.GatewayStub, "Info", 2),
    ("Gateway.Rerank", GATEWAY_RERANK, "gateway", gateway_pb2_grpc.GatewayStub, "Rerank", 8),
    ("Gateway.Embed", GATEWAY_EMBED, "gateway", gateway_pb2_grpc.GatewayStub, "Embed", 6),
    ("Recall.Search", RECALL_SEARCH, "recall", recall_pb2_grpc.RecallStub, "Search", 45),
    ("Recall.Embed", EMBED, "recall", recall_pb2_grpc.RecallStub, "Embed", 8),
    ("Recall.Upsert", UPSERT, "recall", recall_pb2_grpc.RecallStub, "Upsert", 4),
    ("Recall.Delete", DELETE, "recall", recall_pb2_grpc.RecallStub, "Delete", 10),
    ("Recall.Get", GET, "recall", recall_pb2_grpc.RecallStub, "Get", 14),
    ("Recall.Info", INFO, "recall", recall_pb2_grpc.RecallStub, "Info", 2),
    ("Rerank.Rerank", RERANK, "rerank", rerank_pb2_grpc.RerankStub, "Rerank", 32),
    ("Rerank.Info", INFO, "rerank2", rerank_pb2_grpc.RerankStub, "Info", 2),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fuzz(stack, case):
    name, strategy, channel_name, stub_cls, method, batches = case
    fuzz(name, strategy, channel_name, stub_cls, method, batches)(stack)
    assert stack["process"].poll() is None, "the stack died"


def test_after_the_fuzz_every_replica_still_answers(stack):
    sent = sum(OUTCOMES.values())
    by_status = Counter()
    for (_, status), count in OUTCOMES.items():
        by_status[status] += count
    print(f"\nfuzz: {sent} requests; by status: {dict(by_status)}")
    if path := os.environ.get("TWOSTAGE_FUZZ_REPORT"):
        with open(path, "w") as f:
            json.dump({"requests": sent, "by_status": by_status,
                       "by_method": {f"{m} {s}": n for (m, s), n in sorted(OUTCOMES.items())}}, f, indent=2)
    assert sent >= 10_000
    gateway = gateway_pb2_grpc.GatewayStub(stack["gateway"])
    request = gateway_pb2.SearchRequest(query="vitamin B12 and homocysteine", recall_k=4)
    # Budgets are capped at 500 ms in this stack and the cost model still remembers the fuzz's queues:
    # within a few calm answers it must be back to reranking every candidate.
    replies = [gateway.Search(request, timeout=120) for _ in range(20)]
    assert all(r.candidates == 4 for r in replies)
    assert not replies[-1].degraded and replies[-1].reranked == 4, replies[-1].degraded_reason
    for name in ("rerank", "rerank2"):
        reply = rerank_pb2_grpc.RerankStub(stack[name]).Rerank(
            rerank_pb2.RerankRequest(query="vitamin b12", documents=["b12 and homocysteine", "the sky"]), timeout=60)
        assert len(reply.results) == 2
