"""The recall server over gRPC with the real bi-encoder and a real index."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc


@pytest.fixture
def stub(recall_target, channel_to):
    return recall_pb2_grpc.RecallStub(channel_to(recall_target))


async def test_search_finds_a_relevant_document(stub, demo_data):
    for query_id, query in demo_data["queries"].items():
        reply = await stub.Search(recall_pb2.RecallSearchRequest(query=query, k=10))
        ids = [c.id for c in reply.candidates]
        if set(ids) & set(demo_data["qrels"][query_id]):
            break
    else:
        pytest.fail("no test query found a relevant document in its top 10")
    scores = [c.score for c in reply.candidates]
    assert scores == sorted(scores, reverse=True)
    assert all(c.text for c in reply.candidates)
    assert {"embed_ms", "search_ms", "total_ms"} <= set(reply.timings_ms)


async def test_a_search_reports_what_embedding_its_query_cost(stub):
    """Queue wait, model time and the replica's model time per embedded text; nothing when the query's vector
    is given, for nothing is embedded."""
    embedded = await stub.Search(recall_pb2.RecallSearchRequest(query="what a query's embedding costs", k=3,
                                                                 return_vectors=1))
    cost = embedded.cost
    assert cost.queue_ms >= 0 and cost.service_ms > 0 and cost.ms_per_item > 0
    assert cost.queue_ms + cost.service_ms <= embedded.timings_ms["embed_ms"]  # within the step that embeds
    given = await stub.Search(recall_pb2.RecallSearchRequest(query="what a query's embedding costs", k=3,
                                                              query_vector=embedded.query_vector))
    assert [c.id for c in given.candidates] == [c.id for c in embedded.candidates]
    assert (given.cost.queue_ms, given.cost.service_ms, given.cost.ms_per_item) == (0, 0, 0)


async def test_embed_returns_unit_vectors(stub):
    reply = await stub.Embed(recall_pb2.EmbedRequest(texts=["first text", "second"], is_query=True))
    assert reply.dims == 384 and len(reply.embeddings) == 2
    for embedding in reply.embeddings:
        assert sum(v * v for v in embedding.values) == pytest.approx(1.0, abs=1e-4)


async def test_upsert_then_search_then_delete(stub):
    doc = common_pb2.Document(
        id="new-doc-1", title="Zebrafish fin regeneration",
        text="Zebrafish regenerate amputated caudal fins through blastema formation within two weeks.",
    )
    before = (await stub.Info(common_pb2.InfoRequest())).doc_count
    reply = await stub.Upsert(common_pb2.UpsertRequest(documents=[doc]))
    assert (reply.upserted, reply.doc_count) == (1, before + 1)
    found = await stub.Search(recall_pb2.RecallSearchRequest(query="how do zebrafish regrow fins", k=3))
    assert found.candidates[0].id == "new-doc-1"
    assert found.candidates[0].text == doc.text

    deleted = await stub.Delete(common_pb2.DeleteRequest(ids=["new-doc-1", "never-existed"]))
    assert (deleted.deleted, deleted.doc_count) == (1, before)
    after = await stub.Search(recall_pb2.RecallSearchRequest(query="how do zebrafish regrow fins", k=20))
    assert "new-doc-1" not in [c.id for c in after.candidates]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="", k=5)), "query must not be empty"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="x" * 5000, k=5)), "limit is 2048"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=0)), "k must be between 1 and 1000"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5000)), "k must be between 1 and 1000"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, prf_depth=101)),
         "prf_depth must be between 0 and 100, got 101"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, prf_weight=-0.5)),
         "prf_weight must be between 0 and 1, got -0.5"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, query_vector=b"\0" * 12)),
         "query_vector has 3 values; this index holds 384-dimension vectors"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, feedback_vector=b"\0" * 5)),
         "feedback_vector has 5 bytes, not a whole number of float32 values"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, feedback_vector=b"\0" * 1536)),
         "feedback_vector must be finite and not all zero"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, return_vectors=6)),
         "return_vectors must be between 0 and 5, got 6"),
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, prf_depth=6)),
         "prf_depth (6) must not exceed k (5)"),
        # Finite values whose squares overflow float32: a length the index cannot compute a cosine with.
        (lambda s: s.Search(recall_pb2.RecallSearchRequest(query="ok", k=5, query_vector=b"\xca\xf2\x49\x71" * 384)),
         "query_vector must be finite and not all zero, with a length float32 can hold (got inf)"),
        (lambda s: s.Embed(recall_pb2.EmbedRequest(texts=[])), "texts (count)"),
        (lambda s: s.Embed(recall_pb2.EmbedRequest(texts=["a"] * 300)), "texts (count)"),
        (lambda s: s.Embed(recall_pb2.EmbedRequest(texts=["a"], model="other")), "unknown model 'other'"),
        (lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(id=" bad", text="t")])), "malformed"),
        (lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(id="", text="t")])), "has no id; give each one an _id"),
        (
            lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(id="a", text="t")] * 2)),
            "more than once",
        ),
        (lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(id="a", text="")])), "no title or text"),
        (
            lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(
                id="a", text="t", metadata={"bad key!": common_pb2.MetadataValue(string_value="x")})])),
            "metadata key 'bad key!'",
        ),
        (
            lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(
                id="a", text="t", metadata={"year": common_pb2.MetadataValue(number_value=float("nan"))})])),
            "metadata 'year' must be a finite number",
        ),
        (lambda s: s.Get(common_pb2.GetRequest(ids=[])), "ids (count)"),
        (
            lambda s: s.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(id="a", text="x" * 200_000)])),
            "limit is 100000",
        ),
        (lambda s: s.Delete(common_pb2.DeleteRequest(ids=[])), "ids (count)"),
        (lambda s: s.Delete(common_pb2.DeleteRequest(ids=["a\x00b"])), "malformed"),
    ],
)
async def test_invalid_requests_are_rejected(stub, call, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_info_health_and_reflection(recall_target, channel_to, stub):
    info = await stub.Info(common_pb2.InfoRequest())
    assert (info.model, info.dims) == ("bge-small-en", 384)
    assert info.execution_plan.startswith("sessions")  # as the test suite sets it (conftest)
    assert {limit.name for limit in info.limits} >= {"max_k", "max_upsert_docs"}
    channel = channel_to(recall_target)
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="twostage.v1.Recall"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
        assert {"twostage.v1.Recall", "grpc.health.v1.Health"} <= names
        break


@pytest.mark.slow
async def test_acknowledged_writes_survive_a_restart(index_copy, models):
    from recall_server.config import RecallSettings
    from recall_server.service import RecallService
    from recall_server.servicer import build_server

    settings = RecallSettings(port=0, index_dir=index_copy, save_every_writes=10**6)
    doc = common_pb2.Document(id="persist-1", title="Tardigrade desiccation",
                              text="Tardigrades survive complete desiccation by entering a tun state.")
    for round_trip in range(2):
        server = build_server(RecallService(settings))
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = recall_pb2_grpc.RecallStub(channel)
            if round_trip == 0:
                await stub.Upsert(common_pb2.UpsertRequest(documents=[doc]))
                first_doc = (await stub.Search(recall_pb2.RecallSearchRequest(query="mycobacterium", k=1))).candidates[0].id
                await stub.Delete(common_pb2.DeleteRequest(ids=[first_doc]))
            else:
                found = await stub.Search(recall_pb2.RecallSearchRequest(query="tardigrades surviving drying", k=1))
                assert found.candidates[0].id == "persist-1"
                again = await stub.Search(recall_pb2.RecallSearchRequest(query="mycobacterium", k=50))
                assert first_doc not in [c.id for c in again.candidates]
        await server.stop(grace_s=1)


async def test_metadata_comes_back_typed_in_hits_and_get(stub):
    metadata = {
        "lang": common_pb2.MetadataValue(string_value="en"),
        "year": common_pb2.MetadataValue(number_value=2024),
        "open": common_pb2.MetadataValue(bool_value=True),
        "tags": common_pb2.MetadataValue(string_list=common_pb2.StringList(values=["a", "b"])),
    }
    doc = common_pb2.Document(id="meta-1", title="Axolotl limb regeneration",
                              text="Axolotls regrow whole limbs after amputation.", metadata=metadata)
    await stub.Upsert(common_pb2.UpsertRequest(documents=[doc]))
    hits = (await stub.Search(recall_pb2.RecallSearchRequest(query="axolotl limb regrowth", k=1))).candidates
    assert hits[0].id == "meta-1" and dict(hits[0].metadata) == metadata
    got = await stub.Get(common_pb2.GetRequest(ids=["meta-1"]))
    assert dict(got.documents[0].metadata) == metadata
    await stub.Delete(common_pb2.DeleteRequest(ids=["meta-1"]))


@pytest.mark.slow
async def test_a_server_embedding_with_another_graph_than_its_index_says_so_and_stops_its_threads(
        index_copy, models, caplog):
    """The index records the graph that embedded it (stock, as the suite builds it); a server whose plan embeds
    queries with the per-row rewrite warns and shows both in Info; a plan's threads end with the server."""
    import threading

    from recall_server.config import RecallSettings
    from recall_server.index import IndexManifest
    from recall_server.service import RecallService
    from recall_server.servicer import build_server

    assert IndexManifest.read(index_copy).embedding_graph == "stock"
    for plan, graph in (("rows", "per-row"), ("sessions", "stock")):
        caplog.clear()
        before, started = set(threading.enumerate()), set()
        server = build_server(RecallService(RecallSettings(port=0, index_dir=index_copy, execution_plan=plan,
                                                           intra_op_threads=2)))
        with caplog.at_level("WARNING", logger="recall_server.service"):
            port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                info = await recall_pb2_grpc.RecallStub(channel).Info(common_pb2.InfoRequest())
                texts = ["ribosomes", "a longer text about how ribosomes translate messenger RNA", "cells"]
                embedded = await recall_pb2_grpc.RecallStub(channel).Embed(recall_pb2.EmbedRequest(texts=texts))
            assert len(embedded.embeddings) == 3
            assert (info.embedding_graph, info.index_embedding_graph) == (graph, "stock")
            assert ("embedded by the stock graph" in caplog.text) == (graph != "stock")
            started = {t for t in set(threading.enumerate()) - before if t.name.startswith("plan-session")}
            assert bool(started) == (plan == "sessions")
        finally:
            await server.stop(grace_s=1)
        assert not any(t.is_alive() for t in started)


async def test_searches_carry_the_calibration_of_the_latest_fit(index_copy, models):
    from recall_server.config import RecallSettings
    from recall_server.service import RecallService
    from recall_server.servicer import build_server

    service = RecallService(RecallSettings(port=0, index_dir=index_copy))
    server = build_server(service)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = recall_pb2_grpc.RecallStub(channel)
            first = (await stub.Search(recall_pb2.RecallSearchRequest(query="mycobacterium", k=1))).calibration
            assert service.calibration is not None and first.doc_count == service.calibration.doc_count
            await stub.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(
                id="fit-1", title="Tardigrade desiccation", text="Tardigrades survive drying in a tun state.")]))
            refitted = await service.refit_calibration()
            assert refitted.doc_count == first.doc_count + 1
            again = (await stub.Search(recall_pb2.RecallSearchRequest(query="mycobacterium", k=1))).calibration
            assert again.doc_count == refitted.doc_count and again.scale == pytest.approx(refitted.scale)
    finally:
        await server.stop(grace_s=1)
