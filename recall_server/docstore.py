"""The durable document store (SQLite): ids, text, metadata and each
document's vector. It is the source of truth; the HNSW index is rebuilt or
caught up from it, so an acknowledged write survives any restart.

It also holds the lexical index: SQLite FTS5 (BM25, Porter stemming) over
title and text, written in the same transaction as the document, so a write
and a crash cover both indexes alike. A store made before it existed gains
it when first opened for writing (built from the stored text, no re-embedding)."""

import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twostage.corpus import Document
from twostage.errors import FailedPrecondition, StorageFull
from twostage.filters import BOUNDS, Filter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    key INTEGER PRIMARY KEY,           -- the HNSW key
    doc_id TEXT NOT NULL UNIQUE,
    title TEXT, text TEXT, metadata TEXT,
    vector BLOB,                       -- NULL once deleted
    seq INTEGER NOT NULL,              -- write sequence, for catching the index up
    deleted INTEGER NOT NULL DEFAULT 0,
    from_peer INTEGER NOT NULL DEFAULT 0  -- copied from another replica (not served to replicas in turn)
);
CREATE INDEX IF NOT EXISTS docs_seq ON docs(seq);
"""
# Live documents' metadata, a row per value (a list of strings: a row per item), indexed by key and value,
# so a filter reads the documents that pass instead of parsing every document's JSON.
_METADATA_SCHEMA = """
CREATE TABLE doc_meta (
    key INTEGER NOT NULL,              -- docs.key
    name TEXT NOT NULL,
    kind TEXT NOT NULL,                -- text, item (of a list of strings), number, bool
    num REAL, txt TEXT
);
CREATE INDEX doc_meta_num ON doc_meta(name, kind, num);
CREATE INDEX doc_meta_txt ON doc_meta(name, kind, txt);
CREATE INDEX doc_meta_key ON doc_meta(key);
"""
# External content: the text lives once, in docs; FTS5 keeps only its inverted index.
_LEXICAL_SCHEMA = """
CREATE VIRTUAL TABLE docs_fts USING fts5(
    title, text, content='docs', content_rowid='key', tokenize='porter unicode61 remove_diacritics 2'
);
INSERT INTO docs_fts(docs_fts) VALUES ('rebuild');
"""
_TITLE_WEIGHT, _TEXT_WEIGHT = 1.0, 1.0
_TERM = re.compile(r"\w+", re.UNICODE)


# English function words: they occur in nearly every document, so they add almost nothing to BM25 and
# most of its cost (every document they occur in is scored).
STOP_WORDS = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with"]
)


def lexical_query(text: str, max_terms: int = 64) -> str:
    """An FTS5 query matching any of the text's words but stop words (each quoted, so no word is read as
    syntax); a text of stop words alone keeps them."""
    terms = list(dict.fromkeys(t.lower() for t in _TERM.findall(text)))
    terms = ([t for t in terms if t not in STOP_WORDS] or terms)[:max_terms]
    return " OR ".join(f'"{t}"' for t in terms)


@dataclass(frozen=True)
class Change:
    key: int
    vector: np.ndarray | None  # None: the document was deleted


_INSERT_META = "INSERT INTO doc_meta (key, name, kind, num, txt) VALUES (?, ?, ?, ?, ?)"


def _metadata_rows(key: int, metadata: dict) -> list[tuple]:
    rows = []
    for name, value in metadata.items():
        if isinstance(value, bool):
            rows.append((key, name, "bool", float(value), None))
        elif isinstance(value, int | float):
            rows.append((key, name, "number", float(value), None))
        elif isinstance(value, list):
            rows.extend((key, name, "item", None, str(item)) for item in value)
        else:
            rows.append((key, name, "text", None, str(value)))
    return rows


def _value_test(value) -> tuple[str, list]:
    if isinstance(value, bool):
        return "(kind = 'bool' AND num = ?)", [float(value)]
    if isinstance(value, int | float):
        return "(kind = 'number' AND num = ?)", [float(value)]
    return "(kind IN ('text', 'item') AND txt = ?)", [value]


def filter_sql(filter_: Filter) -> tuple[str, list]:
    """A query for the keys of live documents that pass (the semantics are Filter.matches')."""
    parts, params = [], []
    for clause in filter_.clauses:
        if clause.range is not None:
            bounds = clause.range.given()
            tests = " AND ".join(f"num {BOUNDS[name]} ?" for name in bounds)
            parts.append(f"SELECT DISTINCT key FROM doc_meta WHERE name = ? AND kind = 'number' AND {tests}")
            params += [clause.key, *bounds.values()]
            continue
        tests, values = [], []
        for value in (clause.equals,) if clause.any_of is None else clause.any_of:
            test, test_params = _value_test(value)
            tests.append(test)
            values += test_params
        parts.append(f"SELECT DISTINCT key FROM doc_meta WHERE name = ? AND ({' OR '.join(tests)})")
        params += [clause.key, *values]
    return " INTERSECT ".join(parts), params


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


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
            if "from_peer" not in _columns(self._db, "docs"):  # a store made before replicas caught up
                self._db.execute("ALTER TABLE docs ADD COLUMN from_peer INTEGER NOT NULL DEFAULT 0")
            self._create_once("docs_fts", _LEXICAL_SCHEMA)  # its schema rebuilds it from the stored text
            self._create_once("doc_meta", _METADATA_SCHEMA, self._fill_metadata)
        self._lock = threading.Lock()
        # Searches read through their own connection: in WAL mode a reader never waits for a writer's
        # commit (fsync included), so a bulk upsert cannot hold searches back.
        self._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
        self._read_lock = threading.Lock()
        # Kept, not queried: Info reads it on the event loop. A read-only store learns in _require_lexical
        # that another process built the table since.
        self._lexical = _has_table(self._reader, "docs_fts")
        # Kept, not scanned: Info and every write report it.
        self._live = self._db.execute("SELECT COUNT(*) FROM docs WHERE deleted = 0").fetchone()[0]

    def _create_once(self, table: str, schema: str, fill=None) -> None:
        """Create ``table`` (with what ``schema`` builds alongside) if this store predates it, in one
        transaction; ``fill`` then derives its rows from the documents already stored."""
        if _has_table(self._db, table):
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in schema.strip().split(";\n"):
                self._db.execute(statement)
            if fill is not None:
                fill()
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _fill_metadata(self) -> None:
        for key, metadata in self._db.execute("SELECT key, metadata FROM docs WHERE deleted = 0").fetchall():
            self._db.executemany(_INSERT_META, _metadata_rows(key, json.loads(metadata or "{}")))

    @property
    def has_lexical(self) -> bool:
        return self._lexical

    def _unindex_text(self, doc_ids: list[str]) -> None:
        """Take live documents' current text out of the lexical index (FTS5 needs the indexed values)."""
        for part, marks in _in_chunks(doc_ids):
            self._db.execute(
                "INSERT INTO docs_fts(docs_fts, rowid, title, text) SELECT 'delete', key, title, text FROM docs "
                f"WHERE deleted = 0 AND doc_id IN ({marks})", part,
            )

    def _forget_metadata(self, keys: list[int]) -> None:
        for part, marks in _in_chunks(keys):
            self._db.execute(f"DELETE FROM doc_meta WHERE key IN ({marks})", part)

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

    def upsert(self, docs: list[Document], vectors: np.ndarray, from_peer: bool = False) -> list[int]:
        """Commit documents with their vectors in one transaction; returns their keys."""
        rows = [
            (d.id, d.title, d.text, json.dumps(d.metadata), np.asarray(v, dtype=np.float32).tobytes(), int(from_peer))
            for d, v in zip(docs, vectors)
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM docs").fetchone()[0]
                already_live = self._count_live([d.id for d in docs])
                self._unindex_text([d.id for d in docs])
                keys = [
                    self._db.execute(
                        "INSERT INTO docs (doc_id, title, text, metadata, vector, from_peer, seq, deleted) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT(doc_id) DO UPDATE SET "
                        "title=excluded.title, text=excluded.text, metadata=excluded.metadata, "
                        "vector=excluded.vector, from_peer=excluded.from_peer, seq=excluded.seq, deleted=0 "
                        "RETURNING key",
                        (*row, seq),
                    ).fetchone()[0]
                    for row in rows
                ]
                self._db.executemany("INSERT INTO docs_fts(rowid, title, text) VALUES (?, ?, ?)",
                                     [(key, d.title, d.text) for key, d in zip(keys, docs)])
                self._forget_metadata(keys)
                self._db.executemany(_INSERT_META, [row for key, d in zip(keys, docs)
                                                    for row in _metadata_rows(key, d.metadata)])
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

    def delete(self, doc_ids: list[str], from_peer: bool = False) -> list[int]:
        """Tombstone documents in one transaction; returns keys of those that existed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM docs").fetchone()[0]
                self._unindex_text(doc_ids)
                keys = []
                for doc_id in doc_ids:
                    row = self._db.execute(
                        "UPDATE docs SET title=NULL, text=NULL, metadata=NULL, vector=NULL, seq=?, deleted=1, "
                        "from_peer=? WHERE doc_id=? AND deleted=0 RETURNING key",
                        (seq, int(from_peer), doc_id),
                    ).fetchone()
                    if row:
                        keys.append(row[0])
                self._forget_metadata(keys)
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

    def writes_since(self, seq: int, batch_rows: int = 1024, from_clients_only: bool = False,
                     ) -> Iterator[list[tuple[int, Document, np.ndarray | None]]]:
        """Every document written after ``seq``, as it is now, in write order: (seq, document, vector), the
        vector None for a delete (the document then carries only its id). For carrying writes over to
        another index, and (``from_clients_only``) for replicas catching up from each other."""
        last = (seq, 1 << 62)  # keys are below this: the first batch starts after seq
        origin = "AND from_peer = 0 " if from_clients_only else ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, key, doc_id, title, text, metadata, vector FROM docs WHERE (seq, key) > (?, ?) "
                    f"{origin}ORDER BY seq, key LIMIT ?", (*last, batch_rows),
                ).fetchall()
            if not rows:
                return
            last = (rows[-1][0], rows[-1][1])
            yield [(row_seq, Document(doc_id, title or "", text or "", json.loads(meta or "{}")),
                    None if vector is None else np.frombuffer(vector, dtype=np.float32))
                   for row_seq, _, doc_id, title, text, meta, vector in rows]

    def lexical_search(self, query: str, k: int, filter_: Filter | None = None) -> list[tuple[int, float]]:
        """(key, BM25) of the k best live documents matching any query term, best first."""
        match = lexical_query(query)
        if not match or k <= 0:
            return []
        passing, params = ("", []) if filter_ is None else filter_sql(filter_)
        sql = (f"SELECT docs_fts.rowid, -bm25(docs_fts, {_TITLE_WEIGHT}, {_TEXT_WEIGHT}) FROM docs_fts "
               "WHERE docs_fts MATCH ? " + (f"AND docs_fts.rowid IN ({passing}) " if filter_ else "")
               + "ORDER BY bm25(docs_fts, ?, ?) LIMIT ?")
        with self._read_lock:
            self._require_lexical()
            return self._reader.execute(sql, [match, *params, _TITLE_WEIGHT, _TEXT_WEIGHT, k]).fetchall()

    def _require_lexical(self) -> None:
        """Called with the read lock held."""
        if not self._lexical:
            self._lexical = _has_table(self._reader, "docs_fts")
        if not self._lexical:
            raise FailedPrecondition("this index has no lexical part yet; open it for writing once "
                                     "(or run 'twostage index repair --index-dir DIR') to build it")

    def matching_keys(self, filter_: Filter, limit: int | None = None) -> list[int]:
        """Keys of live documents whose metadata passes the filter (at most ``limit``)."""
        passing, params = filter_sql(filter_)
        sql = passing + (" LIMIT ?" if limit is not None else "")
        with self._read_lock:
            rows = self._reader.execute(sql, params + ([limit] if limit is not None else [])).fetchall()
        return [key for (key,) in rows]

    def passing(self, filter_: Filter, keys: list[int]) -> set[int]:
        """Which of these keys pass the filter."""
        passing, params = filter_sql(filter_)
        found: set[int] = set()
        with self._read_lock:
            for part, marks in _in_chunks([int(k) for k in keys]):
                found.update(k for (k,) in self._reader.execute(
                    f"SELECT key FROM ({passing}) WHERE key IN ({marks})", [*params, *part]))
        return found
