"""kill -9 of a recall server in the middle of a stream of acknowledged upserts, several
rounds: after each restart every acknowledged document is there, whole, by id and by search; and both
indexes (the graph and BM25) follow a write and a delete across kill -9."""

import os
import shutil
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc

pytestmark = pytest.mark.slow
ROUNDS = 3


def start_recall(index_dir, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "recall_server", "--port", str(port), "--index-dir", str(index_dir),
         "--save-every-writes", "3"],  # graph saves happen mid-stream too
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        if line.startswith("recall serving on port"):
            return process
    pytest.fail("the recall server exited before serving")


def document(round_: int, i: int) -> common_pb2.Document:
    # Distinct, searchable text per document, so "found by search" means this very document.
    return common_pb2.Document(
        id=f"crash-{round_}-{i}", title=f"Round {round_} entry {i}",
        text=f"Crash recovery probe {round_}-{i}: axolotl regeneration study number {i} of round {round_}.",
    )


def test_acknowledged_upserts_survive_kill_9(built_index, tmp_path):
    from tests.system.test_cli import free_port_run

    index_dir = tmp_path / "index"
    shutil.copytree(built_index, index_dir)
    port = free_port_run(1)
    acknowledged: list[common_pb2.Document] = []
    for round_ in range(ROUNDS):
        process = start_recall(index_dir, port)
        enough = threading.Event()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = recall_pb2_grpc.RecallStub(channel)

        def write(stub=stub, round_=round_, enough=enough):
            for i in range(10_000):
                doc = document(round_, i)
                try:
                    stub.Upsert(common_pb2.UpsertRequest(documents=[doc]), timeout=60)
                except grpc.RpcError:
                    return  # the server is gone: this write was not acknowledged
                acknowledged.append(doc)
                if i == 6 + 3 * round_:
                    enough.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert enough.wait(120)
        os.kill(process.pid, signal.SIGKILL)  # mid-stream: the writer has a request in flight or about to be
        process.wait()
        writer.join(60)
        channel.close()

        process = start_recall(index_dir, port)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = recall_pb2_grpc.RecallStub(channel)
                ids = [d.id for d in acknowledged]
                got = stub.Get(common_pb2.GetRequest(ids=ids), timeout=60)
                assert list(got.missing) == []
                stored = {d.id: d for d in got.documents}
                for doc in acknowledged:  # whole, not half-written
                    assert (stored[doc.id].title, stored[doc.id].text) == (doc.title, doc.text)
                for doc in acknowledged[-5:]:
                    found = stub.Search(recall_pb2.RecallSearchRequest(query=doc.text, k=3), timeout=60)
                    assert doc.id in [c.id for c in found.candidates]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print(f"\nkill -9: {len(acknowledged)} acknowledged upserts over {ROUNDS} rounds, all recovered")


def test_both_indexes_survive_kill_9(built_index, tmp_path):
    from tests.system.test_cli import free_port_run

    index_dir = tmp_path / "index"
    shutil.copytree(built_index, index_dir)
    port = free_port_run(1)
    kept = common_pb2.Document(id="kept", text="The YV5521 isolate grew at low temperature.")
    gone = common_pb2.Document(id="gone", text="The WQ8813 isolate failed to grow.")
    process = start_recall(index_dir, port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = recall_pb2_grpc.RecallStub(channel)
        stub.Upsert(common_pb2.UpsertRequest(documents=[kept, gone]), timeout=60)
        stub.Delete(common_pb2.DeleteRequest(ids=["gone"]), timeout=60)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process = start_recall(index_dir, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = recall_pb2_grpc.RecallStub(channel)
            for mode in (common_pb2.RECALL_MODE_LEXICAL, common_pb2.RECALL_MODE_HYBRID, common_pb2.RECALL_MODE_DENSE):
                def found(query, mode=mode):
                    reply = stub.Search(recall_pb2.RecallSearchRequest(query=query, k=5, mode=mode), timeout=60)
                    return [c.id for c in reply.candidates]
                assert "kept" in found("YV5521 isolate temperature")
                assert "gone" not in found("WQ8813 isolate failed to grow")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
