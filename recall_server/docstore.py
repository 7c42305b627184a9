"""The durable document store (SQLite): ids, text, metadata and each
document's vector. It is the source of truth; the HNSW index is rebuilt or
caught up from it, so an acknowledged write survives any restart."""

import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twostage.corpus import Document
from twostage.errors import StorageFull

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    key INTEGER PRIMARY KEY,           -- the HNSW key
    doc_id TEXT NOT NULL UNIQUE,
    title TEXT, text TEXT, metadata TEXT,
    vector BLOB,                       -- NULL once deleted
    seq INTEGER NOT NULL,              -- write sequence, for catching the index up
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS docs_seq ON docs(seq);
"""


@dataclass(frozen=True)
class Change:
    key: int
    vector: np.ndarray | None  # None: the document was deleted


def _in_chunks(values: list, size: int = 500):
    """(chunk, its "?,?,..." placeholders): SQLite bounds the parameters of one statement."""
    for start in range(0, len(values), size):
        part = values[start:start + size]
        yield part, ",".join("?" * len(part))


def _storage_error(error: sqlite3.OperationalError) -> Exception:
    if "full" in str(error):
        return StorageFull("the document store's disk is full; nothing of this write was stored")
    return error


class DocStore:
    def __init__(self, path: Path, read_only: bool = False):
        if read_only:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
        else:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the write is acknowledged.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        # Searches read through their own connection: in WAL mode a reader never waits for a writer's
        # commit (fsync included), so a bulk upsert cannot hold searches back.
        self._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
        self._read_lock = threading.Lock()
        # Kept, not scanned: Info and every write report it.
        self._live = self._db.execute("SELECT COUNT(*) FROM docs WHERE deleted = 0").fetchone()[0]

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite may already have rolled back (a full disk does)
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def max_seq(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM docs").fetchone()[0]

    def count(self) -> int:
        return self._live

    def upsert(self, docs: list[Document], vectors: np.ndarray) -> list[int]:
        """Commit documents with their vectors in one transaction; returns their keys."""
        rows = [
            (d.id, d.title, d.text, json.dumps(d.metadata), np.asarray(v, dtype=np.float32).tobytes())
            for d, v in zip(docs, vectors)
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM docs").fetchone()[0]
                already_live = self._count_live([d.id for d in docs])
                keys = [
                    self._db.execute(
                        "INSERT INTO docs (doc_id, title, text, metadata, vector, seq, deleted) "
                        "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT(doc_id) DO UPDATE SET "
                        "title=excluded.title, text=excluded.text, metadata=excluded.metadata, "
                        "vector=excluded.vector, seq=excluded.seq, deleted=0 RETURNING key",
                        (*row, seq),
                    ).fetchone()[0]
                    for row in rows
                ]
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as error:
                self._rollback()
                raise _storage_error(error) from None
            except BaseException:
                self._rollback()
                raise
            self._live += len(keys) - already_live
        return keys

    def _count_live(self, doc_ids: list[str]) -> int:
        return sum(
            self._db.execute(f"SELECT COUNT(*) FROM docs WHERE deleted = 0 AND doc_id IN ({marks})", part).fetchone()[0]
            for part, marks in _in_chunks(doc_ids)
        )

    def delete(self, doc_ids: list[str]) -> list[int]:
        """Tombstone documents in one transaction; returns keys of those that existed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM docs").fetchone()[0]
                keys = []
                for doc_id in doc_ids:
                    row = self._db.execute(
                        "UPDATE docs SET title=NULL, text=NULL, metadata=NULL, vector=NULL, seq=?, deleted=1 "
                        "WHERE doc_id=? AND deleted=0 RETURNING key",
                        (seq, doc_id),
                    ).fetchone()
                    if row:
                        keys.append(row[0])
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as error:
                self._rollback()
                raise _storage_error(error) from None
            except BaseException:
                self._rollback()
                raise
            self._live -= len(keys)
        return keys

    def fetch(self, keys: list[int]) -> dict[int, Document]:
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT key, doc_id, title, text, metadata FROM docs WHERE deleted=0 AND key IN ({marks})",
                [int(k) for k in keys],
            ).fetchall()
        return {key: Document(doc_id, title, text, json.loads(meta)) for key, doc_id, title, text, meta in rows}

    def get(self, doc_ids: list[str]) -> dict[str, Document]:
        """Live documents by id; ids not stored are absent."""
        found: dict[str, Document] = {}
        with self._read_lock:
            for part, marks in _in_chunks(doc_ids):
                rows = self._reader.execute(
                    f"SELECT doc_id, title, text, metadata FROM docs WHERE deleted = 0 AND doc_id IN ({marks})", part,
                ).fetchall()
                found.update({d: Document(d, t, x, json.loads(m)) for d, t, x, m in rows})
        return found

    def changes_since(self, seq: int, batch_rows: int = 4096) -> Iterator[list[Change]]:
        """Every write after ``seq``, in batches, for catching the index up."""
        last_key = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT key, vector FROM docs WHERE seq > ? AND key > ? ORDER BY key LIMIT ?",
                    (seq, last_key, batch_rows),
                ).fetchall()
            if not rows:
                return
            last_key = rows[-1][0]
            yield [Change(k, None if v is None else np.frombuffer(v, dtype=np.float32)) for k, v in rows]
