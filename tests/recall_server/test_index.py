"""DocumentIndex durability: SQLite is the acknowledgement point; the graph
catches up from it on open."""

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
