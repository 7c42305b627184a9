"""DocumentIndex durability: SQLite is the acknowledgement point; the graph
catches up from it on open."""

import threading
import time

import numpy as np
import pytest

from recall_server.index import DocumentIndex
from twostage.corpus import Document
from twostage.errors import FailedPrecondition, IndexLocked, InvalidArgument, ModelMismatch

DIMS = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIMS).astype(np.float32)
    return v / np.linalg.norm(v)


def docs(*ids: str) -> list[Document]:
    return [Document(i, f"title {i}", f"text {i}", {"n": i}) for i in ids]


def test_search_returns_documents_with_cosine_scores(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a", "b", "c"), np.stack([unit(1), unit(2), unit(3)]))
    (best, score), *_ = index.search(unit(2), 3)
    assert best == Document("b", "title b", "text b", {"n": "b"})
    assert score == pytest.approx(1.0, abs=1e-5)
    assert len(index.search(unit(2), 10)) == 3
    index.close()


def test_writes_survive_a_crash_between_graph_saves(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS, save_every_writes=10**9)
    index.upsert(docs("a", "b"), np.stack([unit(1), unit(2)]))
    index.delete(["a"])
    index.upsert(docs("b", "c"), np.stack([unit(5), unit(3)]))  # b moves
    index.store.close()  # no save: as if the process died here (which also drops its lock)
    index._lock.release()
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    assert len(reopened) == 2
    assert sorted(d.id for d, _ in reopened.search(unit(1), 5)) == ["b", "c"]
    assert reopened.search(unit(5), 1)[0][0].id == "b"
    assert reopened.search(unit(3), 1)[0][0].id == "c"
    reopened.close()


def test_reopen_after_clean_close_serves_the_same(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a", "b", "c"), np.stack([unit(1), unit(2), unit(3)]))
    before = [(d.id, round(s, 5)) for d, s in index.search(unit(4), 3)]
    index.close()
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    assert [(d.id, round(s, 5)) for d, s in reopened.search(unit(4), 3)] == before
    assert reopened.manifest.applied_seq == reopened.store.max_seq()
    reopened.close()


def test_opening_with_another_model_fails_clearly(tmp_path):
    DocumentIndex.create(tmp_path / "ix", "model-a", DIMS).close()
    with pytest.raises(ModelMismatch, match="built with model 'model-a'.*loads 'model-b'"):
        DocumentIndex.open(tmp_path / "ix", "model-b", DIMS)
    with pytest.raises(ModelMismatch, match="8 dims"):
        DocumentIndex.open(tmp_path / "ix", "model-a", 16)
    with pytest.raises(InvalidArgument, match="not an index"):
        DocumentIndex.open(tmp_path / "missing", "model-a", DIMS)
    with pytest.raises(InvalidArgument, match="already holds an index"):
        DocumentIndex.create(tmp_path / "ix", "model-a", DIMS)


def test_delete_reports_only_existing_ids(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a"), np.stack([unit(1)]))
    assert index.delete(["a", "zzz"]) == 1
    assert index.delete(["a"]) == 0
    assert index.search(unit(1), 5) == []
    index.close()


def test_one_writer_per_index_directory(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    with pytest.raises(IndexLocked, match="for writing: another process \\(pid \\d+\\) has it open"):
        DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    with pytest.raises(IndexLocked, match="read-only"):
        DocumentIndex.open(tmp_path / "ix", "m", DIMS, read_only=True)
    index.close()
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)  # the lock went with the writer
    reopened.close()


def test_another_process_cannot_open_a_locked_index(tmp_path):
    import subprocess
    import sys

    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    try:
        script = ("from recall_server.index import DocumentIndex\n"
                  f"DocumentIndex.open({str(tmp_path / 'ix')!r}, 'm', {DIMS})")
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    finally:
        index.close()
    assert other.returncode != 0 and "IndexLocked" in other.stderr


def test_read_only_replicas_share_a_snapshot_and_refuse_writes(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a", "b"), np.stack([unit(1), unit(2)]))
    index.close()
    first = DocumentIndex.open(tmp_path / "ix", "m", DIMS, read_only=True)
    second = DocumentIndex.open(tmp_path / "ix", "m", DIMS, read_only=True)
    assert first.search(unit(2), 1)[0][0].id == second.search(unit(2), 1)[0][0].id == "b"
    with pytest.raises(FailedPrecondition, match="read-only"):
        first.upsert(docs("c"), np.stack([unit(3)]))
    with pytest.raises(IndexLocked):
        DocumentIndex.open(tmp_path / "ix", "m", DIMS)  # no writer while replicas read
    first.close()
    second.close()
    DocumentIndex.open(tmp_path / "ix", "m", DIMS).close()


def test_document_count_is_kept_through_writes_and_reopen(tmp_path):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a", "b"), np.stack([unit(1), unit(2)]))
    index.upsert(docs("b", "c"), np.stack([unit(1), unit(3)]))  # b replaced, c new
    assert index.store.count() == 3
    assert index.delete(["a", "zz"]) == 1
    assert index.store.count() == 2
    index.upsert(docs("a"), np.stack([unit(4)]))  # a comes back
    assert index.store.count() == 3
    index.close()
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    assert reopened.store.count() == 3
    assert sorted(reopened.get(["a", "b", "zz"])) == ["a", "b"]
    reopened.close()


@pytest.mark.parametrize("damage", ["missing", "torn", "garbage"])
def test_a_lost_or_torn_graph_is_rebuilt_from_the_store(tmp_path, damage):
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a", "b", "c"), np.stack([unit(1), unit(2), unit(3)]))
    index.delete(["b"])
    index.close()
    graph = tmp_path / "ix" / "vectors.usearch"
    if damage == "missing":
        graph.unlink()
    elif damage == "torn":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    else:
        graph.write_bytes(b"not a graph" * 10)
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    try:
        assert len(reopened) == 2  # every live document, not only the writes after the last save
        assert reopened.search(unit(3), 1)[0][0].id == "c"
        assert "b" not in [d.id for d, _ in reopened.search(unit(2), 5)]
    finally:
        reopened.close()
    assert DocumentIndex.open(tmp_path / "ix", "m", DIMS).close() is None  # the rebuilt graph was saved


def test_a_failed_graph_save_does_not_fail_writes(tmp_path, monkeypatch):
    """Fault injection: the disk refuses the graph file (ENOSPC). Acknowledged writes stay acknowledged,
    later writes succeed, and a restart recovers everything from the store."""
    import errno

    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS, save_every_writes=1)
    from recall_server.index import fsync_file as real_fsync
    full = {"on": True}

    def fsync_or_full(path):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(path)

    monkeypatch.setattr("recall_server.index.fsync_file", fsync_or_full)
    index.upsert(docs("a"), np.stack([unit(1)]))  # its save fails; the write does not
    index.upsert(docs("b"), np.stack([unit(2)]))
    assert not list((tmp_path / "ix").glob("*.tmp"))  # nothing half-written left behind
    full["on"] = False  # space returns
    index.upsert(docs("c"), np.stack([unit(3)]))
    index.store.close()
    index._lock.release()  # as if the process died
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    assert sorted(reopened.get(["a", "b", "c"])) == ["a", "b", "c"] and len(reopened) == 3
    reopened.close()


def test_repair_rebuilds_the_graph_from_the_store(tmp_path, capsys):
    from twostage.cli import main

    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a", "b"), np.stack([unit(1), unit(2)]))
    index.close()
    (tmp_path / "ix" / "vectors.usearch").write_bytes(b"torn")
    assert main(["index", "repair", "--index-dir", str(tmp_path / "ix")]) == 0
    assert "2 documents" in capsys.readouterr().out
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    assert reopened.search(unit(2), 1)[0][0].id == "b"
    reopened.close()


def test_heavy_deletes_and_rewrites_never_leave_searches_short(tmp_path):
    """HNSW tombstones can cut a graph apart (found by fuzzing: thousands of identical documents written
    and deleted). Searches must still return the k nearest live documents."""
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, DIMS)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    index.upsert([Document(f"r{i}", "", "x") for i in range(200)], base)
    same = np.tile(np.full(DIMS, 1 / np.sqrt(DIMS), dtype=np.float32), (1000, 1))
    for _ in range(5):
        index.upsert([Document(f"n{i}", "", "t") for i in range(1000)], same)
        index.delete([f"n{i}" for i in range(1000)])
    overlaps = []
    for probe in range(0, 200, 10):
        exact = {f"r{i}" for i in np.argsort(-(base @ base[probe]))[:8]}
        found = [d.id for d, _ in index.search(base[probe], 8)]
        assert len(found) == 8 and found[0] == f"r{probe}"  # never short; the nearest (itself) first
        overlaps.append(len(exact & set(found)))
    # HNSW is approximate, so no exact order is promised; worn out, it had returned nothing at all.
    assert sum(overlaps) / len(overlaps) >= 7.5
    index.close()


def test_a_write_whose_graph_insert_failed_is_never_claimed_by_a_save(tmp_path, monkeypatch):
    import recall_server.index as index_module

    real_add, failing = index_module._add, {"on": True}

    def add_or_fail(graph, keys, vectors):
        if failing["on"]:
            raise MemoryError("no memory for the graph")
        real_add(graph, keys, vectors)

    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS)
    index.upsert(docs("a"), np.stack([unit(1)]))
    monkeypatch.setattr(index_module, "_add", add_or_fail)
    index.upsert(docs("b"), np.stack([unit(2)]))  # committed in the store; the graph insert fails
    assert index.get(["b"]) and index.graph_behind
    index.save()  # must not claim b is in the saved graph
    index.store.close()
    index._lock.release()  # as if the process died here
    failing["on"] = False
    reopened = DocumentIndex.open(tmp_path / "ix", "m", DIMS)
    assert reopened.search(unit(2), 1)[0][0].id == "b"  # replayed from the store on open
    # In a running server the next write catches the graph up first.
    failing["on"] = True
    reopened.upsert(docs("c"), np.stack([unit(3)]))
    failing["on"] = False
    reopened.upsert(docs("d"), np.stack([unit(4)]))
    assert not reopened.graph_behind and [reopened.search(unit(n), 1)[0][0].id for n in (3, 4)] == ["c", "d"]
    reopened.close()


def test_a_save_and_a_write_that_triggers_one_never_wait_for_each_other(tmp_path, monkeypatch):
    """A save takes the save lock, then the write lock; a write must not take them the other way round."""
    index = DocumentIndex.create(tmp_path / "ix", "m", DIMS, save_every_writes=1)
    inside_write, go_on = threading.Event(), threading.Event()
    real_apply = index.store.apply

    def apply_then_wait(*args, **kwargs):
        applied = real_apply(*args, **kwargs)
        inside_write.set()
        assert go_on.wait(30)
        return applied

    monkeypatch.setattr(index.store, "apply", apply_then_wait)
    writer = threading.Thread(target=index.upsert, args=(docs("a"), np.stack([unit(1)])))
    writer.start()
    assert inside_write.wait(30)  # the writer holds the write lock
    saver = threading.Thread(target=index.save)
    saver.start()
    deadline = time.monotonic() + 30
    while not index._save_lock.locked():  # the saver holds the save lock and waits for the write lock
        assert time.monotonic() < deadline
        time.sleep(0.005)  # polling a lock another thread takes: there is no event to wait on
    go_on.set()  # the writer now finishes and its save is due
    writer.join(30)
    saver.join(30)
    assert not writer.is_alive() and not saver.is_alive(), "deadlock between a save and a write"
    index.close()
