"""Replicas of a shard catch up from each other on the writes they missed, and copies never bounce."""

import asyncio

import grpc
import pytest

from recall_server.config import RecallSettings
from recall_server.service import RecallService
from recall_server.servicer import build_server
from tests.recall_server.test_snapshots import SHARD, id_of_shard, publish_copy, until
from twostage.corpus import Document
from twostage.v1 import recall_pb2, recall_pb2_grpc


async def start_replica(tmp_path, name: str, root, peers_file):
    settings = RecallSettings(port=0, index_dir=tmp_path / name / "index", snapshot_dir=root, shard=SHARD,
                              snapshot_poll_s=0.05, peers=f"file://{peers_file}", peer_sync_period_s=0.05)
    service = RecallService(settings)
    server = build_server(service)
    port = await server.start()
    return service, server, f"127.0.0.1:{port}"


async def test_a_replica_that_was_away_catches_up_and_copies_never_bounce(tmp_path, sharded_index, models):
    root, peers_file = tmp_path / "snapshots", tmp_path / "peers"
    publish_copy(sharded_index / "shard-1", root, "v1")
    peers_file.write_text("")
    first, first_server, first_address = await start_replica(tmp_path, "a", root, peers_file)
    peers_file.write_text(first_address + "\n")
    servers = [first_server]
    try:
        # Writes the second replica misses: it is not running yet.
        missed = id_of_shard("written-while-away")
        await first.upsert([Document(missed, "Coral bleaching", "Corals expel algae when the sea warms.")])
        existing = first.index.fetch([1])[1].id  # a document of the snapshot
        await first.delete([existing])

        second, second_server, second_address = await start_replica(tmp_path, "b", root, peers_file)
        servers.append(second_server)
        # Caught up before it served: the write it missed is there, the deleted document is not.
        assert [d.id for d in await second.get([missed, existing])] == [missed]
        assert second.doc_count() == first.doc_count()

        # From now on both are peers; a write only the second took reaches the first.
        peers_file.write_text(f"{first_address}\n{second_address}\n")
        later = id_of_shard("written-to-one")
        await second.upsert([Document(later, "Octopus cognition", "Octopuses solve puzzles with their arms.")])
        await until(lambda: first.index.get([later]))
        # Each serves only what clients wrote to it: the copies stay where they are.
        served = {}
        for name, service in (("first", first), ("second", second)):
            batch, _ = await service.changes("v1", 0, 100)
            served[name] = {doc.id for _, doc, _ in batch}
        assert served == {"first": {missed, existing}, "second": {later}}

        async with grpc.aio.insecure_channel(second_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await recall_pb2_grpc.RecallStub(channel).Changes(recall_pb2.ChangesRequest(snapshot_version="v0"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves snapshot 'v1', not 'v0'" in refused.value.details()
    finally:
        await asyncio.gather(*(s.stop(grace_s=1) for s in servers))
