"""Snapshots: an index-build job publishes a shard; a recall server with no index waits NOT_SERVING for
one, serves it, switches to newer ones without failing a search, and carries its own writes over."""

import asyncio
import functools
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recall_server.config import RecallSettings
from recall_server.index import DocumentIndex, IndexManifest
from recall_server.service import RecallService
from recall_server.servicer import build_server
from recall_server.snapshots import SNAPSHOT_FILE, Snapshot, building_dir, publish, read_snapshot
from twostage.cli import main
from twostage.corpus import Document
from twostage.sharding import shard_of
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc

SHARD = 1


async def until(condition, timeout_s: float = 120.0) -> None:
    """Wait for a condition the server reaches on its own (polling it, bounded)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def publish_copy(index_dir: Path, root: Path, version: str, edit=None) -> Path:
    """Publish a copy of a built shard as a snapshot, optionally edited first (no model needed)."""
    building = building_dir(root, SHARD, version)
    building.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(index_dir, building)
    manifest = IndexManifest(**json.loads((building / "index.json").read_text()))
    if edit is not None:
        index = DocumentIndex.open(building, manifest.model, manifest.dims)
        edit(index)
        index.close()
    count = DocumentIndex.open(building, manifest.model, manifest.dims, read_only=True)
    documents = count.store.count()
    count.close()
    return publish(building, root, Snapshot(version, SHARD, 2, manifest.model, documents, time.time()))


def id_of_shard(prefix: str) -> str:
    return next(f"{prefix}-{i}" for i in range(100) if shard_of(f"{prefix}-{i}", 2) == SHARD)


def test_index_build_publishes_one_shard_from_a_url(tmp_path, small_corpus, models, capsys):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(small_corpus.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{small_corpus.name}"
        root = tmp_path / "snapshots"
        code = main(["index", "build", "--corpus", url, "--limit", "12", "--shards", "2", "--shard-index", "1",
                     "--snapshot-dir", str(root), "--version", "v1"])
        server.shutdown()
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in (root / "shard-1").iterdir()] == ["v1"]  # nothing half-built beside it
    snapshot = read_snapshot(root / "shard-1" / "v1")
    first_twelve = [json.loads(line)["_id"] for line in small_corpus.read_text().splitlines()[:12]]
    mine = {doc_id for doc_id in first_twelve if shard_of(doc_id, 2) == 1}
    assert (snapshot.shard, snapshot.shards, snapshot.documents) == (1, 2, len(mine))
    index = DocumentIndex.open(root / "shard-1" / "v1", snapshot.model, 384, read_only=True)
    assert set(index.get(first_twelve)) == mine
    index.close()
    # A version is published once; --snapshot-dir needs --shard-index.
    assert main(["index", "build", "--corpus", str(small_corpus), "--shards", "2", "--shard-index", "1",
                 "--snapshot-dir", str(root), "--version", "v1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["index", "build", "--corpus", str(small_corpus), "--snapshot-dir", str(root)]) == 2
    assert "--shard-index" in capsys.readouterr().err


async def test_recall_waits_for_a_snapshot_then_switches_while_serving(tmp_path, sharded_index, small_corpus, models):
    root = tmp_path / "snapshots"
    settings = RecallSettings(port=0, index_dir=tmp_path / "data" / "index", snapshot_dir=root, shard=SHARD,
                              snapshot_poll_s=0.05)
    service = RecallService(settings)
    server = build_server(service)
    starting = asyncio.create_task(server.start())
    await until(lambda: server.port or starting.done())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub, health = recall_pb2_grpc.RecallStub(channel), health_pb2_grpc.HealthStub(channel)
    try:
        # No snapshot yet: alive, not serving, and a call says why.
        await until(lambda: service.snapshots is not None)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Search(recall_pb2.RecallSearchRequest(query="cells", k=3))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"waiting for a snapshot under {root / 'shard-1'}" in refused.value.details()

        publish_copy(sharded_index / "shard-1", root, "v1")
        await starting
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        v1_count = (await stub.Info(common_pb2.InfoRequest())).doc_count
        assert v1_count == read_snapshot(root / "shard-1" / "v1").documents > 0

        # A write the server acknowledges, then a newer snapshot that lacks it and drops another document.
        mine = id_of_shard("written-live")
        await stub.Upsert(common_pb2.UpsertRequest(documents=[common_pb2.Document(
            id=mine, title="Tardigrade desiccation", text="Tardigrades survive desiccation by vitrification.")]))
        dropped = next(doc_id for doc_id in (json.loads(line)["_id"] for line in small_corpus.read_text().splitlines())
                       if shard_of(doc_id, 2) == SHARD)
        added = id_of_shard("added-in-v2")

        def edit(index: DocumentIndex) -> None:
            vector = np.random.default_rng(0).normal(size=(1, 384)).astype(np.float32)
            index.delete([dropped])
            index.upsert([Document(added, "New in v2", "Published with the second snapshot.")],
                         vector / np.linalg.norm(vector))

        searches_ok = 0
        stop_searching = asyncio.Event()

        async def search_throughout() -> None:
            nonlocal searches_ok
            while not stop_searching.is_set():
                await stub.Search(recall_pb2.RecallSearchRequest(query="tardigrade survival", k=5))
                searches_ok += 1

        searching = asyncio.create_task(search_throughout())
        await asyncio.to_thread(publish_copy, sharded_index / "shard-1", root, "v2", edit)
        await until(lambda: service.snapshots.current.version == "v2")
        await until(lambda: searches_ok > 3)
        stop_searching.set()
        await searching  # not one search failed across the switch

        got = await stub.Get(common_pb2.GetRequest(ids=[mine, dropped, added]))
        assert sorted(d.id for d in got.documents) == sorted([mine, added])
        assert (await stub.Info(common_pb2.InfoRequest())).doc_count == v1_count + 1  # -dropped +added +mine

        # A snapshot of another model is refused: the server keeps serving what it has.
        refused_dir = publish_copy(sharded_index / "shard-1", root, "v3")
        meta = json.loads((refused_dir / SNAPSHOT_FILE).read_text())
        (refused_dir / SNAPSHOT_FILE).write_text(json.dumps({**meta, "model": "another-model"}))
        await service.snapshots.check_now()
        assert service.snapshots.current.version == "v2"
        assert len(list((tmp_path / "data" / "snapshots").iterdir())) == 1  # the v1 copy is gone
    finally:
        await channel.close()
        await server.stop(grace_s=1)

    # Restarted, it serves its copy of v2 at once, the live write included.
    again = RecallService(settings)
    restarted = build_server(again)
    await restarted.start()
    try:
        assert again.snapshots.current.version == "v2"
        assert [d.id for d in await again.get([mine])] == [mine]
    finally:
        await restarted.stop(grace_s=1)


def test_a_server_following_snapshots_will_not_replace_an_index_it_did_not_make(tmp_path, index_copy):
    from recall_server.snapshots import check_managed
    from twostage.errors import ConfigError

    with pytest.raises(ConfigError, match="manages --index-dir itself"):
        check_managed(index_copy)
    check_managed(tmp_path / "empty" / "index")  # nothing there yet: fine


def test_a_shard_built_in_parts_is_merged_by_the_last_part(tmp_path, small_corpus, models, capsys):
    root = tmp_path / "snapshots"
    first = [json.loads(line)["_id"] for line in small_corpus.read_text().splitlines()[:16]]
    build = ["index", "build", "--corpus", str(small_corpus), "--limit", "16", "--shards", "2", "--parts", "2",
             "--snapshot-dir", str(root), "--version", "v1"]
    assert main([*build, "--task-index", "1"]) == 0  # shard 0, part 1
    assert "the last part to finish publishes the shard" in capsys.readouterr().out
    assert not (root / "shard-0" / "v1").exists()
    assert main([*build, "--task-index", "0"]) == 0  # shard 0, part 0: the last, so it merges
    snapshot = read_snapshot(root / "shard-0" / "v1")
    mine = {doc_id for doc_id in first if shard_of(doc_id, 2) == 0}
    assert snapshot.documents == len(mine) and snapshot.shards == 2
    assert [p.name for p in (root / "shard-0").iterdir()] == ["v1"]  # the parts are gone
    index = DocumentIndex.open(root / "shard-0" / "v1", snapshot.model, 384, read_only=True)
    assert set(index.get(first)) == mine and len(index) == len(mine)
    index.close()
    # Two parts finishing at once both merge: the second to publish defers to the first.
    from recall_server.build import merge_parts

    again = [*build[:-1], "v2"]
    assert main([*again, "--task-index", "1"]) == 0
    kept = shutil.copytree(root / "shard-0" / ".parts-v2", tmp_path / "kept-parts")
    assert main([*again, "--task-index", "0"]) == 0
    published = root / "shard-0" / "v2"
    created = read_snapshot(published).created_at
    assert merge_parts([kept / "part-0", kept / "part-1"], root, 0, 2, "v2") == published
    assert read_snapshot(published).created_at == created
    assert sorted(p.name for p in (root / "shard-0").iterdir()) == ["v1", "v2"]  # its own copy is gone
    assert main([*build, "--task-index", "4"]) == 2
    assert "beyond --shards x --parts" in capsys.readouterr().err


async def test_a_snapshot_that_cannot_be_opened_is_skipped_and_the_next_one_served(tmp_path, sharded_index, models):
    root = tmp_path / "snapshots"
    broken = publish_copy(sharded_index / "shard-1", root, "v1")
    manifest = json.loads((broken / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps({**manifest, "dims": 8}))  # built for another model
    service = RecallService(RecallSettings(port=0, index_dir=tmp_path / "data" / "index", snapshot_dir=root,
                                           shard=SHARD, snapshot_poll_s=0.05))
    starting = asyncio.create_task(service.start())
    await until(lambda: service.snapshots is not None and "v1" in service.snapshots._refused)
    assert not starting.done() and service.index is None  # still waiting, not crashed
    publish_copy(sharded_index / "shard-1", root, "v2")
    await starting
    try:
        assert service.snapshots.current.version == "v2" and service.doc_count() > 0
    finally:
        await service.close()


async def test_a_damaged_or_unfinished_snapshot_is_retried_and_following_goes_on(tmp_path, sharded_index, models):
    from prometheus_client import REGISTRY

    def failures_counted() -> float:
        return REGISTRY.get_sample_value("twostage_recall_snapshot_check_failures_total") or 0.0

    root = tmp_path / "snapshots"
    damaged = publish_copy(sharded_index / "shard-1", root, "v1")
    for path in damaged.glob("docs.sqlite*"):
        path.unlink()
    (damaged / "docs.sqlite").write_bytes(b"not a database " * 512)  # a torn or corrupted copy
    counted = failures_counted()
    service = RecallService(RecallSettings(port=0, index_dir=tmp_path / "data" / "index", snapshot_dir=root,
                                           shard=SHARD, snapshot_poll_s=0.05))
    starting = asyncio.create_task(service.start())
    try:
        # Not fatal at start: logged, counted, shown, and tried again at each poll.
        await until(lambda: starting.done() or (service.snapshots and service.snapshots.failures >= 3))
        assert not starting.done() and "v1" not in service.snapshots._refused
        assert "database" in service.snapshots.last_error
        assert failures_counted() >= counted + 3
        publish_copy(sharded_index / "shard-1", root, "v2")
        await starting
        assert service.snapshots.current.version == "v2" and service.snapshots.failures == 0
        # While serving: a snapshot whose index.json is half written is retried, not refused for good...
        unfinished = publish_copy(sharded_index / "shard-1", root, "v3")
        manifest = (unfinished / "index.json").read_text()
        (unfinished / "index.json").write_text(manifest[: len(manifest) // 2])
        failed = service.snapshots.failures
        await until(lambda: service.snapshots.failures >= failed + 2)
        assert service.snapshots.current.version == "v2" and service.doc_count() > 0
        assert service.info()["snapshot"]["failures"] >= 2 and service.info()["snapshot"]["version"] == "v2"
        # ...and served once it is whole: following went on.
        (unfinished / "index.json").write_text(manifest)
        # (the count of failures in a row is reset once the check that switched has returned)
        await until(lambda: service.snapshots.current.version == "v3" and service.snapshots.failures == 0)
        assert "v3" not in service.snapshots._refused
    finally:
        if not starting.done():
            starting.cancel()
        await service.close()


def test_a_snapshot_copy_is_durable_before_and_after_it_takes_its_name(tmp_path, monkeypatch):
    from recall_server import snapshots

    source = tmp_path / "published" / "v1"
    (source / "nested").mkdir(parents=True)
    for name in ("index.json", "docs.sqlite", "vectors.usearch", "nested/part"):
        (source / name).write_text(name)
    synced = []
    monkeypatch.setattr(snapshots, "fsync_file", lambda path: synced.append(("file", Path(path))), raising=False)
    monkeypatch.setattr(snapshots, "fsync_directory", lambda path: synced.append(("dir", Path(path))))
    snapshot = Snapshot("v1", SHARD, 2, "model", 0, time.time())
    copy = snapshots.copy_snapshot(source, tmp_path / "data" / "index", snapshot)
    partial = copy.with_name(".copy-v1")
    files = {("file", partial / name) for name in ("index.json", "docs.sqlite", "vectors.usearch", "nested/part")}
    renamed = synced.index(("dir", copy.parent))  # the rename itself
    assert files <= set(synced[:renamed])  # every copied file, before the rename makes the copy count
    assert {("dir", partial), ("dir", partial / "nested")} <= set(synced[:renamed])
