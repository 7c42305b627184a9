"""Recall modes and metadata filters through the gateway: passed to recall per request, checked at the
edge, and reported on every hit."""

import grpc
import pytest

from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

TAGGED = [
    common_pb2.Document(id=f"tagged-{i}", title="Sediment survey", text=f"River sediment sample {i} held KX-41 traces.",
                        metadata={"site": common_pb2.MetadataValue(string_value=site),
                                  "depth_m": common_pb2.MetadataValue(number_value=depth)})
    for i, (site, depth) in enumerate([("north", 2.0), ("north", 9.5), ("south", 4.0)])
]


@pytest.fixture(scope="module")
async def stub(gateway_target, channel_to):
    stub = gateway_pb2_grpc.GatewayStub(channel_to(gateway_target))
    await stub.Upsert(common_pb2.UpsertRequest(documents=TAGGED))
    return stub


def clause(key, **test):
    return common_pb2.FilterClause(key=key, **test)


async def test_a_filter_returns_only_passing_documents(stub):
    north_and_shallow = common_pb2.Filter(clauses=[
        clause("site", equals=common_pb2.MetadataValue(string_value="north")),
        clause("depth_m", range=common_pb2.NumberRange(lt=5)),
    ])
    for mode in (common_pb2.RECALL_MODE_DENSE, common_pb2.RECALL_MODE_LEXICAL, common_pb2.RECALL_MODE_HYBRID):
        reply = await stub.Search(gateway_pb2.SearchRequest(query="river sediment", recall_k=10, top_k=10,
                                                            skip_rerank=True, recall_mode=mode,
                                                            filter=north_and_shallow))
        assert [h.id for h in reply.hits] == ["tagged-0"]
        assert reply.hits[0].metadata["site"].string_value == "north"


async def test_the_mode_is_per_request_and_hits_carry_both_scores(stub):
    lexical = await stub.Search(gateway_pb2.SearchRequest(query="KX-41 traces", recall_k=5, top_k=5, skip_rerank=True,
                                                          recall_mode=common_pb2.RECALL_MODE_LEXICAL))
    assert {h.id for h in lexical.hits[:3]} == {d.id for d in TAGGED}
    assert all(h.lexical_score > 0 and h.dense_score > 0 for h in lexical.hits[:3])
    assert all(h.recall_score == pytest.approx(h.lexical_score) for h in lexical.hits)
    dense = await stub.Search(gateway_pb2.SearchRequest(query="KX-41 traces", recall_k=5, top_k=5, skip_rerank=True,
                                                        recall_mode=common_pb2.RECALL_MODE_DENSE))
    assert all(h.lexical_score == 0 and h.recall_score == pytest.approx(h.dense_score) for h in dense.hits)


async def test_a_malformed_filter_is_refused_at_the_edge(stub):
    bad = common_pb2.Filter(clauses=[clause("site", equals=common_pb2.MetadataValue(string_value="north")),
                                     clause("depth_m", range=common_pb2.NumberRange(gte=9, lte=1))])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Search(gateway_pb2.SearchRequest(query="river sediment", filter=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter clause 1 (key 'depth_m')" in raised.value.details()
