"""``twostage serve all`` rehearses the cluster topology as processes: shards with replicas."""

import asyncio
import os
import signal

import grpc
import pytest

from twostage.sharding import shard_of
from twostage.stack import Interrupted, Stack
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, recall_pb2_grpc


@pytest.mark.slow
async def test_a_write_through_the_gateway_reaches_every_replica_of_its_shard_only(sharded_index, tmp_path):
    import shutil

    from tests.system.test_cli import free_port_run

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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_stop_signal_stops_the_stack_before_the_command_ends(signum, monkeypatch):
    """Whatever the block awaits is cancelled, the stack is stopped, and the block ends with Interrupted."""
    calls = []

    async def start(self, ready_timeout_s):
        calls.append("start")

    async def stop(self, timeout_s=30.0):
        calls.append("stop")
        return 0

    monkeypatch.setattr(Stack, "start", start)
    monkeypatch.setattr(Stack, "stop", stop)
    monkeypatch.setattr("twostage.stack.check_index_dir", lambda index_dir, shards: [index_dir])
    previous = signal.getsignal(signum)
    try:
        with pytest.raises(Interrupted) as raised:
            async with Stack("127.0.0.1", 1, "index").running(10):
                os.kill(os.getpid(), signum)
                await asyncio.Event().wait()  # only the signal ends this
        assert raised.value.signum == signum and calls == ["start", "stop"]
        assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handed back
    finally:
        signal.signal(signum, previous)
