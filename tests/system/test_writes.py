"""Write semantics at the gateway over real recall replicas: a request is validated whole before any shard
sees it, a write is acknowledged by a quorum of each shard's replicas (one replica down does not block its
shard), the reply says how many acknowledged, and a resend with the same request_id is answered alike."""

import shutil

import grpc
import pytest

from gateway.config import GatewaySettings
from gateway.servicer import build_server as build_gateway
from recall_server.config import RecallSettings
from recall_server.service import RecallService
from recall_server.servicer import build_server as build_recall
from twostage.sharding import shard_of
from twostage.v1 import common_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow


def ids_of(shard: int, prefix: str, count: int) -> list[str]:
    return [i for i in (f"{prefix}-{n}" for n in range(8 * count)) if shard_of(i, 2) == shard][:count]


@pytest.fixture(scope="module")
async def replicas(sharded_index, tmp_path_factory, models):
    """Shard 0 on three replicas, shard 1 on one, each on its own copy of its shard."""
    servers = {0: [], 1: []}
    for shard, count in ((0, 3), (1, 1)):
        for n in range(count):
            directory = tmp_path_factory.mktemp("replica") / "index"
            shutil.copytree(sharded_index / f"shard-{shard}", directory)
            service = RecallService(RecallSettings(port=0, index_dir=directory))
            server = build_recall(service)
            servers[shard].append((service, server, f"127.0.0.1:{await server.start()}"))
    yield servers
    for shard in servers.values():
        for _, server, _ in shard:
            await server.stop(grace_s=1)


@pytest.fixture
async def gateway(replicas, channel_to):
    started = []

    async def make(**settings):
        targets = ",".join("|".join(address for _, _, address in replicas[s]) for s in (0, 1))
        server = build_gateway(GatewaySettings(port=0, recall_targets=targets, rerank_targets="127.0.0.1:1",
                                               startup_wait_s=0, **settings))
        started.append(server)
        return gateway_pb2_grpc.GatewayStub(channel_to(f"127.0.0.1:{await server.start()}"))

    yield make
    for server in started:
        await server.stop(grace_s=1)


def document(doc_id: str, text: str = "Corals expel algae when the sea warms.") -> common_pb2.Document:
    return common_pb2.Document(id=doc_id, title="", text=text)


def common_doc(doc_id: str, text: str):
    from twostage.corpus import Document

    return Document(doc_id, "", text)


async def stored_on(replicas, shard: int, ids: list[str], up: slice = slice(None)) -> list[int]:
    """How many of the ids each (running) replica of the shard holds."""
    return [len(await service.get(ids)) for service, _, _ in replicas[shard][up]]


async def test_an_invalid_document_anywhere_leaves_every_shard_untouched(replicas, gateway):
    stub = await gateway()
    (valid,), (invalid,) = ids_of(0, "edge", 1), ids_of(1, "edge", 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Upsert(common_pb2.UpsertRequest(documents=[document(valid), document(invalid, " ")]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("documents[1]:")  # the client's position, not the shard's
    assert await stored_on(replicas, 0, [valid]) == [0, 0, 0]


async def test_a_key_given_two_types_in_one_request_is_refused_before_any_shard_types_it(replicas, gateway):
    """Each shard types a new key by the first value it sees: split over two shards, one request would type
    it twice, and filters on it would then miss one half of the request."""
    stub = await gateway()
    (first,), (second,) = ids_of(0, "typed", 1), ids_of(1, "typed", 1)
    docs = [document(first), document(second)]
    docs[0].metadata["discount"].number_value = 10
    docs[1].metadata["discount"].string_value = "10%"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Upsert(common_pb2.UpsertRequest(documents=docs))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[1]: document" in refused.value.details() and "'discount'" in refused.value.details()
    assert await stored_on(replicas, 0, [first]) == [0, 0, 0] and await stored_on(replicas, 1, [second]) == [0]


async def test_a_filter_one_shard_refuses_fails_the_search_instead_of_answering_from_the_other(replicas, gateway):
    """Keys typed apart by two shards (written to each directly): the filter is the caller's mistake on one of
    them, so the search is INVALID_ARGUMENT naming it, never a partial answer that looks like an outage."""
    from twostage.convert import filter_to_proto
    from twostage.corpus import Document
    from twostage.filters import parse_filter
    from twostage.v1 import gateway_pb2

    (first,), (second,) = ids_of(0, "sized", 1), ids_of(1, "sized", 1)
    await replicas[0][0][0].upsert([Document(first, "", "A small coral reef survey.", {"size": 3})])
    await replicas[1][0][0].upsert([Document(second, "", "A large coral reef survey.", {"size": "L"})])
    stub = await gateway()
    request = gateway_pb2.SearchRequest(query="coral reef survey", recall_k=10, skip_rerank=True,
                                        filter=filter_to_proto(parse_filter(["size<=5"])))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Search(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'size'" in refused.value.details()


async def test_one_replica_down_does_not_block_its_shards_writes_under_a_majority(replicas, gateway):
    stub = await gateway()
    down_service, down_server, _ = replicas[0][2]
    await down_server.stop(grace_s=1)
    try:
        ids = ids_of(0, "majority", 30) + ids_of(1, "majority", 10)
        reply = await stub.Upsert(common_pb2.UpsertRequest(documents=[document(i) for i in ids],
                                                           request_id="majority-1"))
        acks = {a.shard: (a.documents, a.acknowledged, a.replicas) for a in reply.shards}
        assert acks == {0: (30, 2, 3), 1: (10, 1, 1)}
        assert reply.upserted == 40 and reply.version.clock > 0
        assert await stored_on(replicas, 0, ids[:30], slice(0, 2)) == [30, 30]

        # "all" needs the replica that is down: refused, saying what is durable where.
        strict = await gateway(write_quorum="all")
        more = ids_of(0, "strict", 5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await strict.Upsert(common_pb2.UpsertRequest(documents=[document(i) for i in more], request_id="all-1"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard 0 on 2 of 3 replicas (3 needed" in refused.value.details()
        assert "resend it with request_id 'all-1'" in refused.value.details()
    finally:  # back, on its volume, for the tests after this one
        service = RecallService(down_service.settings)
        server = build_recall(service)
        replicas[0][2] = (service, server, f"127.0.0.1:{await server.start()}")


async def test_a_resend_with_the_same_request_id_is_answered_alike(replicas, gateway):
    stub = await gateway()
    ids = ids_of(0, "resend", 3) + ids_of(1, "resend", 2)
    request = common_pb2.DeleteRequest(ids=ids, request_id="resend-1")
    await stub.Upsert(common_pb2.UpsertRequest(documents=[document(i) for i in ids]))
    first = await stub.Delete(request)
    second = await stub.Delete(request)
    assert first.deleted == 5 and (second.deleted, second.version) == (first.deleted, first.version)
    # Through another gateway, which never saw it: each replica answers from the request ids it stored.
    other = await (await gateway()).Delete(request)
    assert other.deleted == 5
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await stub.Delete(common_pb2.DeleteRequest(ids=ids[:1], request_id="resend-1"))
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already used for a different write" in reused.value.details()


async def test_resends_waiting_on_a_failed_attempt_start_one_new_attempt_between_them():
    import asyncio

    from gateway.writes import DocumentRouter
    from twostage import errors

    router = DocumentRouter([])
    sends, first_may_fail = [], asyncio.Event()

    async def send_to_shards(items, ids, request_id, version, timeout_s, send):
        sends.append(version)
        if len(sends) == 1:
            await first_may_fail.wait()
            raise errors.Unavailable("too few replicas")
        return version

    router._send_to_shards = send_to_shards
    first = asyncio.ensure_future(router.delete(["a"], 5, "req-1"))
    await asyncio.sleep(0)
    while not sends:  # the first attempt is in flight
        await asyncio.sleep(0)
    resends = [asyncio.ensure_future(router.delete(["a"], 5, "req-1")) for _ in range(3)]
    await asyncio.sleep(0)
    first_may_fail.set()
    with pytest.raises(errors.Unavailable):
        await first
    answers = await asyncio.gather(*resends)
    assert len(sends) == 2 and len(set(sends)) == 1  # one new attempt, at the first attempt's version
    assert answers == [sends[0]] * 3


async def test_a_write_that_loses_to_a_newer_version_says_so_and_the_next_one_wins(replicas, gateway):
    from twostage.versions import Version

    stub = await gateway()
    (doc_id,) = ids_of(1, "ahead", 1)
    first = await stub.Upsert(common_pb2.UpsertRequest(documents=[document(doc_id, "first")]))
    # Written elsewhere by a writer whose clock runs a minute ahead of this gateway's.
    ahead = Version(first.version.clock + (60_000 << 16), "elsewhere")
    service = replicas[1][0][0]
    await service.upsert([common_doc(doc_id, "from the writer ahead")], version=ahead)
    lost = await stub.Upsert(common_pb2.UpsertRequest(documents=[document(doc_id, "second")]))
    assert lost.superseded == 1 and (lost.newest_version.clock, lost.newest_version.writer) == (ahead.clock,
                                                                                                 ahead.writer)
    assert (await service.get([doc_id]))[0].text == "from the writer ahead"
    won = await stub.Upsert(common_pb2.UpsertRequest(documents=[document(doc_id, "third")]))
    assert won.superseded == 0 and won.version.clock > ahead.clock  # the gateway's clock moved past it
    assert (await service.get([doc_id]))[0].text == "third"


async def test_a_malformed_request_id_is_refused_before_any_shard_sees_it(replicas, gateway):
    stub = await gateway()
    (doc_id,) = ids_of(0, "rid", 1)
    for bad in ("x" * 129, " padded", "line\nbreak"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Upsert(common_pb2.UpsertRequest(documents=[document(doc_id)], request_id=bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in refused.value.details()
    assert await stored_on(replicas, 0, [doc_id]) == [0, 0, 0]


async def test_a_quorum_counts_the_replicas_a_shard_is_meant_to_have(replicas, gateway):
    # Shard 1 is meant to have three replicas but one resolves (the others' names dropped out while down).
    stub = await gateway(shard_replicas=3)
    (doc_id,) = ids_of(1, "meant", 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Upsert(common_pb2.UpsertRequest(documents=[document(doc_id)], request_id="meant-1"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shard 1 on 1 of 3 replicas (2 needed" in refused.value.details()
