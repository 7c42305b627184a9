"""Replicas of a shard converge: a replica that was away catches up exactly (a 1,000-document write
included), an older version never replaces a newer one, and anti-entropy repairs what catch-up missed."""

import asyncio
import time

import grpc
import numpy as np
import prometheus_client
import pytest

from recall_server.config import RecallSettings
from recall_server.docstore import Write
from recall_server.replication import PeerCursor
from recall_server.service import RecallService
from recall_server.servicer import build_server
from tests.system.test_snapshots import SHARD, id_of_shard, publish_copy, until
from twostage.corpus import Document
from twostage.sharding import shard_of
from twostage.v1 import recall_pb2, recall_pb2_grpc
from twostage.versions import Version


async def start_replica(tmp_path, name: str, root, peers_file, anti_entropy_period_s: float = 3600):
    settings = RecallSettings(port=0, index_dir=tmp_path / name / "index", snapshot_dir=root, shard=SHARD,
                              snapshot_poll_s=0.05, peers=f"file://{peers_file}", peer_sync_period_s=0.05,
                              anti_entropy_period_s=anti_entropy_period_s)
    service = RecallService(settings)
    server = build_server(service)
    port = await server.start()
    return service, server, f"127.0.0.1:{port}"


class ShardReplicas:
    """Snapshot v1 of shard 1 published, a peers file (empty at first), and the replicas started on it."""

    def __init__(self, tmp_path, sharded_index):
        self.tmp_path, self.root, self.peers_file = tmp_path, tmp_path / "snapshots", tmp_path / "peers"
        publish_copy(sharded_index / "shard-1", self.root, "v1")
        self.peers_file.write_text("")
        self.servers = []

    async def start(self, name: str, anti_entropy_period_s: float = 3600):
        service, server, address = await start_replica(self.tmp_path, name, self.root, self.peers_file,
                                                       anti_entropy_period_s)
        self.servers.append(server)
        return service, server, address

    def peers(self, *addresses: str) -> None:
        self.peers_file.write_text("".join(f"{address}\n" for address in addresses))

    async def stop(self, server) -> None:
        self.servers.remove(server)
        await server.stop(grace_s=1)


@pytest.fixture
async def shard(tmp_path, sharded_index, models):
    replicas = ShardReplicas(tmp_path, sharded_index)
    yield replicas
    await asyncio.gather(*(server.stop(grace_s=1) for server in replicas.servers))


def ids_of_shard(prefix: str, count: int) -> list[str]:
    return [i for i in (f"{prefix}-{n}" for n in range(4 * count)) if shard_of(i, 2) == SHARD][:count]


def state(service: RecallService) -> dict:
    return {w.doc.id: (w.version, w.deleted, w.doc.text)
            for batch in service.index.store.writes_since(0) for w in batch}


async def test_a_replica_away_during_a_1000_document_write_gets_all_of_it(shard):
    first, _, first_address = await shard.start("a")
    shard.peers(first_address)
    # Writes the second replica misses: it is not running yet. One upsert of 1,000 documents (more than two
    # pages of Changes), and a delete of a snapshot document.
    bulk = [Document(i, "", f"note {n}") for n, i in enumerate(ids_of_shard("bulk", 1000))]
    await first.upsert(bulk)
    existing = first.index.fetch([1])[1].id
    await first.delete([existing])

    second, _, second_address = await shard.start("b")
    # Caught up before it served: every document of the bulk write, and the delete.
    assert len(await second.get([d.id for d in bulk])) == 1000
    assert await second.get([existing]) == []
    assert state(second) == state(first) and second.doc_count() == first.doc_count()

    # Both are peers now; a write only the second took reaches the first, and nothing bounces back and forth.
    shard.peers(first_address, second_address)
    later = id_of_shard("written-to-one")
    await second.upsert([Document(later, "Octopus cognition", "Octopuses solve puzzles with their arms.")])
    await until(lambda: first.index.get([later]))
    settled = first.index.store.max_seq(), second.index.store.max_seq()
    assert await first.peers.sync_once() == 0 and await second.peers.sync_once() == 0
    assert (first.index.store.max_seq(), second.index.store.max_seq()) == settled

    async with grpc.aio.insecure_channel(second_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await recall_pb2_grpc.RecallStub(channel).Changes(recall_pb2.ChangesRequest(snapshot_version="v0"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves snapshot 'v1', not 'v0'" in refused.value.details()


async def test_a_restarted_replica_never_brings_an_older_version_back(shard):
    doc_id = id_of_shard("contested")
    first, _, first_address = await shard.start("a")
    second, second_server, second_address = await shard.start("b")
    shard.peers(first_address, second_address)
    await first.upsert([Document(doc_id, "", "version one")])
    await until(lambda: doc_id in second.index.get([doc_id]))
    await shard.stop(second_server)
    newer = await first.upsert([Document(doc_id, "", "version two")])
    # The second replica restarts while the first holds version two, and both read each other.
    shard.peers(first_address)
    second, _, second_address = await shard.start("b")
    shard.peers(first_address, second_address)
    await until(lambda: second.index.get([doc_id])[doc_id].text == "version two")
    await first.peers.sync_once()
    assert first.index.get([doc_id])[doc_id].text == "version two"
    assert first.index.store.rows([doc_id])[0].version == newer.version
    # Two writes of one id at the same moment through two entry points: one order, on every replica.
    tie = newer.version.clock + (1 << 20)
    await first.upsert([Document(doc_id, "", "from gateway a")], version=Version(tie, "gateway-a"))
    await second.upsert([Document(doc_id, "", "from gateway b")], version=Version(tie, "gateway-b"))
    await until(lambda: state(first) == state(second))
    assert first.index.get([doc_id])[doc_id].text == "from gateway b"


async def test_anti_entropy_repairs_what_catch_up_cannot_see(shard):
    first, _, first_address = await shard.start("a")
    second, _, second_address = await shard.start("b", anti_entropy_period_s=0.2)
    written = [Document(i, "", f"written while apart {i}") for i in ids_of_shard("apart", 40)]
    await first.upsert(written)
    await first.delete([first.index.fetch([2])[2].id])
    # The second replica's cursor claims it has read all of the first's changes already (a lost or restored
    # cursor, say): catch-up alone never sends them.
    _, first_id, _ = await first.changes("v1", 0, 1)
    second.peers._cursors[first_address] = PeerCursor(first_id, "v1", (first.index.store.max_seq(), 0))
    shard.peers(first_address, second_address)
    await until(lambda: state(second) == state(first), timeout_s=60)
    repaired_at = time.time()
    await until(lambda: (second.peers.last_agreement or 0) > repaired_at, timeout_s=60)
    assert prometheus_client.REGISTRY.get_sample_value("twostage_replica_agreement_age_seconds") < 60


async def test_a_cancelled_write_holds_writes_back_until_its_thread_has_finished(index_copy, models):
    import threading

    service = RecallService(RecallSettings(port=0, index_dir=index_copy))
    await service.start()
    try:
        entered, release = threading.Event(), threading.Event()
        real_apply = service.index.apply

        def slow_apply(*args, **kwargs):
            entered.set()
            assert release.wait(30)
            return real_apply(*args, **kwargs)

        service.index.apply = slow_apply
        write = asyncio.ensure_future(service.upsert([Document("cancelled-1", "", "A write its caller gave up on.")]))
        await until(entered.is_set)
        write.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the write
        # The thread is still writing: the write gate (which a snapshot switch or shutdown takes) stays held.
        assert service._write_gate.locked()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await write
        assert not service._write_gate.locked()
        assert await service.get(["cancelled-1"])  # the write the thread made is whole
    finally:
        await service.close()


async def test_a_failing_sync_round_is_logged_counted_and_retried(shard):
    def failed_rounds() -> float:
        return prometheus_client.REGISTRY.get_sample_value("twostage_peer_sync_failures_total", {"step": "round"}) or 0

    service, _, _ = await shard.start("a")
    rounds, real_sync = [], service.peers.sync_once
    before = failed_rounds()

    async def broken_once():
        rounds.append(1)
        if len(rounds) == 1:
            raise ValueError("a damaged reply")
        return await real_sync()

    service.peers.sync_once = broken_once
    await until(lambda: len(rounds) >= 3)  # the loop went on after the failure
    assert failed_rounds() == before + 1
    assert "ValueError: a damaged reply" in service.peers.last_error


async def test_a_purge_waits_until_every_peer_holds_the_rows_below_its_horizon(shard):
    from twostage.versions import clock_at

    first, _, first_address = await shard.start("a")
    second, _, second_address = await shard.start("b")
    horizon = Version(clock_at(time.time() - 60), "")
    # A row older than the horizon that only the first replica holds (a write the second missed).
    vector = np.ones(first.index.manifest.dims, np.float32) / np.sqrt(first.index.manifest.dims)
    old = Write(Document(id_of_shard("old-write"), "", "written long ago"), vector, Version(horizon.clock - 1, "w"))
    await first.apply_peer_writes([old])
    shard.peers(first_address, "127.0.0.1:1")
    assert not await first.peers.agree_below(horizon)  # a peer that cannot answer may hold rows this one lacks
    # The second's catch-up is held (it runs every 50 ms) while it is asked, so that it still lacks the old row.
    catch_up, held = second.peers.sync_once, asyncio.Event()

    async def held_catch_up():
        await held.wait()
        return await catch_up()

    second.peers.sync_once = held_catch_up
    shard.peers(first_address, second_address)
    # Writes going on now are newer than the horizon: they never hold the purge back; the missing old row does.
    writing = asyncio.ensure_future(first.upsert([Document(i, "", "new") for i in ids_of_shard("now", 20)]))
    assert not second.index.get([old.doc.id]) and not await second.peers.agree_below(horizon)
    second.peers.sync_once = catch_up
    held.set()
    await until(lambda: second.index.get([old.doc.id]), timeout_s=60)  # caught up
    await writing
    await second.upsert([Document(id_of_shard("later"), "", "newer than the horizon")])
    assert await second.peers.agree_below(horizon) and await first.peers.agree_below(horizon)


async def test_changes_are_sent_in_replies_bounded_in_size(shard, monkeypatch):
    from recall_server import replication

    monkeypatch.setattr(replication, "CHANGES_MAX_BYTES", 1)  # one change a reply
    first, _, first_address = await shard.start("a")
    written = [Document(i, "", f"note {i}") for i in ids_of_shard("bounded", 30)]
    await first.upsert(written)
    # By cursor: a change a reply, marked as cut short, and the replica reading them gets every one.
    batch, _, more = await first.changes("v1", 0, 0)
    assert len(batch) == 1 and more
    second, _, _ = await shard.start("b")
    shard.peers(first_address)
    await until(lambda: len(second.index.get([d.id for d in written])) == 30)
    # By ids: answered in the order asked, cut after the first, the rest still to ask for.
    asked = [written[5].id, "never-stored", written[2].id]
    batch, _, more = await first.changes("v1", 0, 0, ids=asked)
    assert [w.doc.id for w in batch] == [written[5].id] and more


async def test_versions_are_listed_for_distinct_buckets_and_a_bounded_count(shard):
    _, _, address = await shard.start("a")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recall_pb2_grpc.RecallStub(channel)
        once = await stub.Versions(recall_pb2.VersionsRequest(buckets=[7]))
        repeated = await stub.Versions(recall_pb2.VersionsRequest(buckets=[7] * 5000))
        assert list(repeated.versions) == list(once.versions)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Versions(recall_pb2.VersionsRequest(buckets=list(range(129))))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "buckets" in refused.value.details()


async def test_a_replica_that_missed_a_delete_whose_tombstone_is_gone_deletes_too(shard):
    from twostage.versions import clock_at

    first, _, first_address = await shard.start("a")
    second, _, second_address = await shard.start("b", anti_entropy_period_s=0.1)
    gone = first.index.fetch([3])[3].id  # a snapshot document, live on both
    await first.delete([gone])
    await asyncio.to_thread(first.index.save)
    await asyncio.to_thread(first.index.purge, Version(clock_at(time.time() + 1), ""), 0)
    assert first.index.store.rows([gone]) == []  # the tombstone is gone too
    assert await second.get([gone])  # the second replica never saw the delete
    shard.peers(first_address, second_address)
    await until(lambda: gone not in second.index.get([gone]), timeout_s=60)
