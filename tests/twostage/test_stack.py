"""``twostage serve all`` rehearses the cluster topology as processes: shards with replicas."""

import grpc
import pytest

from twostage.sharding import shard_of
from twostage.stack import Stack
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, recall_pb2_grpc

pytestmark = pytest.mark.slow


async def test_a_write_through_the_gateway_reaches_every_replica_of_its_shard_only(sharded_index, tmp_path):
    import shutil

    from tests.twostage.test_cli import free_port_run

    shutil.copytree(sharded_index, tmp_path / "index")  # replica 0 of each shard writes to its shard's index
    stack = Stack("127.0.0.1", free_port_run(6), str(tmp_path / "index"), recall_shards=2, shard_replicas=2)
    await stack.start(ready_timeout_s=180)
    channels = []

    def channel(target: str) -> grpc.aio.Channel:
        channels.append(grpc.aio.insecure_channel(target))
        return channels[-1]

    try:
        assert [len(replicas) for replicas in stack.shard_targets] == [2, 2]
        gateway = gateway_pb2_grpc.GatewayStub(channel(stack.gateway_target))
        info = await gateway.Info(common_pb2.InfoRequest())
        assert list(info.recall_targets) == ["|".join(replicas) for replicas in stack.shard_targets]

        ids = [f"replicated-{i}" for i in range(8)]
        assert {shard_of(i, 2) for i in ids} == {0, 1}
        documents = [common_pb2.Document(id=i, title="Axolotl limb regeneration",
                                         text=f"Axolotls regrow limbs ({i}).") for i in ids]
        reply = await gateway.Upsert(common_pb2.UpsertRequest(documents=documents))
        assert reply.upserted == len(ids)
        for shard, replicas in enumerate(stack.shard_targets):
            mine = sorted(i for i in ids if shard_of(i, 2) == shard)
            for target in replicas:
                got = await recall_pb2_grpc.RecallStub(channel(target)).Get(common_pb2.GetRequest(ids=ids))
                assert sorted(d.id for d in got.documents) == mine, (shard, target)
        found = await gateway.Search(gateway_pb2.SearchRequest(query="axolotl limb regeneration", top_k=8,
                                                               recall_k=8, skip_rerank=True))
        assert set(ids) <= {hit.id for hit in found.hits}
    finally:
        for open_channel in channels:
            await open_channel.close()
        await stack.stop(timeout_s=10)
