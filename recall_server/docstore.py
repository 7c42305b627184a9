"""The durable document store (SQLite): ids, text, metadata and each
document's vector. It is the source of truth; the HNSW index is rebuilt or
caught up from it, so an acknowledged write survives any restart.

Every write of an id carries a version (``twostage.versions``) and is stored
only when newer than the version held; a delete leaves a versioned tombstone,
kept until ``purge`` drops tombstones older than the purge horizon. Each
stored row gets a sequence of its own, so a reader paging by sequence (index
catch-up, replicas catching up from each other) never skips a row.

It also holds the lexical index: SQLite FTS5 (BM25, Porter stemming) over
title and text, written in the same transaction as the document, so a write
and a crash cover both indexes alike. A store made before it existed gains
it when first opened for writing (built from the stored text, no re-embedding)."""

import contextlib
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import prometheus_client as prom

from twostage.corpus import Document
from twostage.errors import FailedPrecondition, InvalidArgument, StorageFull
from twostage.filters import BOUNDS, Filter
from twostage.schema import type_of
from twostage.versions import Version

log = logging.getLogger(__name__)
SCHEMA_CONFLICTS = prom.Counter(
    "twostage_metadata_type_conflicts_total",
    "Values copied from other replicas or snapshots whose type contradicts this index's metadata schema")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    key INTEGER PRIMARY KEY,           -- the HNSW key
    doc_id TEXT NOT NULL UNIQUE,
    title TEXT, text TEXT, metadata TEXT,
    vector BLOB,                       -- NULL once deleted
    seq INTEGER NOT NULL,              -- write sequence, for catching the index up
    deleted INTEGER NOT NULL DEFAULT 0,
    from_peer INTEGER NOT NULL DEFAULT 0  -- unused since writes are versioned (stores made before keep it)
);
CREATE INDEX IF NOT EXISTS docs_seq ON docs(seq);
"""
# Versions, and what anti-entropy compares: each id's bucket and a hash of (id, version, deleted).
_VERSION_COLUMNS = {
    "clock": "INTEGER NOT NULL DEFAULT 0",
    "writer": "TEXT NOT NULL DEFAULT ''",
    "bucket": "INTEGER NOT NULL DEFAULT 0",
    "row_hash": "INTEGER NOT NULL DEFAULT 0",
}
_REPLICATION_SCHEMA = """
CREATE INDEX IF NOT EXISTS docs_bucket ON docs(bucket);
CREATE TABLE IF NOT EXISTS requests (       -- writes by request id, so a resend is answered alike
    request_id TEXT PRIMARY KEY,
    count INTEGER NOT NULL, clock INTEGER NOT NULL, writer TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replica_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
BUCKETS = 1024  # anti-entropy compares ids in this many buckets


def bucket_of(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=4).digest(), "big") % BUCKETS


def row_hash(doc_id: str, clock: int, writer: str, deleted: int) -> int:
    """A signed 32-bit hash of one row's state; a bucket's digest is their sum (order does not matter)."""
    digest = hashlib.blake2b(f"{doc_id}\0{clock}\0{writer}\0{int(deleted)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)

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
# The type of each metadata key (twostage.schema): declared at build, or set by the first value stored.
_METADATA_TYPES_SCHEMA = "CREATE TABLE metadata_schema (name TEXT PRIMARY KEY, type TEXT NOT NULL)"
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


@dataclass(frozen=True)
class Write:
    """One versioned write of one id: an upsert, or a tombstone when ``vector`` is None (``doc`` then
    carries only the id). ``seq`` is the store's sequence when read back from a store."""

    doc: Document
    vector: np.ndarray | None
    version: Version
    seq: int = 0
    key: int = 0  # the store's key, when read back from a store (with seq, an exact cursor)

    @property
    def deleted(self) -> bool:
        return self.vector is None


@dataclass(frozen=True)
class Applied:
    """What one ``DocStore.apply`` did."""

    keys: list[int] = field(default_factory=list)  # rows written: their graph entries are replaced
    added: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (key, vector) of live rows written
    deleted: int = 0  # live documents that a tombstone replaced
    last_seq: int = 0  # the store's sequence after the write
    count: int = 0  # the request's answer (stored with its request id)
    replayed: bool = False  # the request id was known: nothing was applied, ``count`` is the first answer
    version: Version | None = None  # the request's version, when replayed
    superseded: int = 0  # writes not applied because a newer version of their id was held
    newest: Version | None = None  # the newest version held for the writes' ids afterwards


@dataclass(frozen=True)
class StoredRequest:
    """A write stored under its request id: what a resend of it is answered."""

    count: int  # the first answer
    version: Version


class MetaKind(StrEnum):
    """How a metadata value is stored (``doc_meta.kind``): numbers and booleans in ``num``, strings in ``txt``,
    a list of strings as a row per item."""

    TEXT = "text"
    ITEM = "item"
    NUMBER = "number"
    BOOL = "bool"

    @classmethod
    def of(cls, value) -> "MetaKind":
        return _KIND_OF_TYPE[type_of(value)]

    @property
    def schema_type(self) -> str:
        """The metadata schema's type of a key holding values of this kind (twostage.schema.TYPES)."""
        return _TYPE_OF_KIND[self]


_TYPE_OF_KIND = {MetaKind.TEXT: "string", MetaKind.ITEM: "string_list", MetaKind.NUMBER: "number",
                 MetaKind.BOOL: "bool"}
_KIND_OF_TYPE = {schema_type: kind for kind, schema_type in _TYPE_OF_KIND.items()}
_INSERT_META = "INSERT INTO doc_meta (key, name, kind, num, txt) VALUES (?, ?, ?, ?, ?)"


def _metadata_rows(key: int, metadata: dict) -> list[tuple]:
    rows = []
    for name, value in metadata.items():
        kind = MetaKind.of(value)
        if kind is MetaKind.ITEM:
            rows.extend((key, name, kind.value, None, str(item)) for item in value)
        elif kind is MetaKind.TEXT:
            rows.append((key, name, kind.value, None, str(value)))
        else:
            rows.append((key, name, kind.value, float(value), None))
    return rows


def _value_test(value) -> tuple[str, list]:
    kind = MetaKind.of(value)
    if kind in (MetaKind.NUMBER, MetaKind.BOOL):
        return f"(kind = '{kind.value}' AND num = ?)", [float(value)]
    return f"(kind IN ('{MetaKind.TEXT.value}', '{MetaKind.ITEM.value}') AND txt = ?)", [value]


def filter_sql(filter_: Filter) -> tuple[str, list]:
    """A query for the keys of live documents that pass (the semantics are Filter.matches')."""
    parts, params = [], []
    for clause in filter_.clauses:
        if clause.range is not None:
            bounds = clause.range.given()
            tests = " AND ".join(f"num {BOUNDS[name]} ?" for name in bounds)
            parts.append(f"SELECT DISTINCT key FROM doc_meta WHERE name = ? AND kind = '{MetaKind.NUMBER.value}' "
                         f"AND {tests}")
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


_WRITE_COLUMNS = "seq, doc_id, title, text, metadata, vector, clock, writer, deleted, key"
_AFTER_EVERY_KEY = 1 << 62  # keys are below this


def _write_of(row) -> Write:
    seq, doc_id, title, text, meta, vector, clock, writer, deleted, key = row
    document = Document(doc_id, title or "", text or "", json.loads(meta or "{}"))
    return Write(document, None if deleted or vector is None else np.frombuffer(vector, dtype=np.float32),
                 Version(clock, writer), seq, key)


@dataclass(frozen=True)
class _Outcome:
    keys: list[int] = field(default_factory=list)
    added: list[tuple[int, np.ndarray]] = field(default_factory=list)
    deleted: int = 0
    last_seq: int = 0
    live_before: int = 0  # live rows this write replaced (upserted over or deleted)
    superseded: int = 0
    newest: Version | None = None
    new_types: dict[str, str] = field(default_factory=dict)  # metadata keys this write typed first


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
            self._add_version_columns()
            self._db.executescript(_REPLICATION_SCHEMA)
            self._create_once("docs_fts", _LEXICAL_SCHEMA)  # its schema rebuilds it from the stored text
            self._create_once("doc_meta", _METADATA_SCHEMA, self._fill_metadata)
            self._create_once("metadata_schema", _METADATA_TYPES_SCHEMA, self._fill_schema)
        self._lock = threading.Lock()
        # Searches read through their own connection: in WAL mode a reader never waits for a writer's
        # commit (fsync included), so a bulk upsert cannot hold searches back.
        self._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
        self._read_lock = threading.Lock()
        self._has_state = _has_table(self._db, "replica_state")  # a read-only store made before versions lacks it
        # Kept, not queried: Info reads it on the event loop. A read-only store learns in _require_lexical
        # that another process built the table since.
        self._lexical = _has_table(self._reader, "docs_fts")
        # Kept, not scanned: Info and every write report it.
        self._live = self._db.execute("SELECT COUNT(*) FROM docs WHERE deleted = 0").fetchone()[0]
        # Kept, not queried: every write and filter checks against it.
        self._schema: dict[str, str] = dict(self._db.execute("SELECT name, type FROM metadata_schema").fetchall()
                                            if _has_table(self._db, "metadata_schema") else [])

    def _create_once(self, table: str, schema: str, fill=None) -> None:
        """Create ``table`` (with what ``schema`` builds alongside) if this store predates it, in one
        transaction; ``fill`` then derives its rows from the documents already stored."""
        if _has_table(self._db, table):
            return
        with self._transaction():
            for statement in schema.strip().split(";\n"):
                self._db.execute(statement)
            if fill is not None:
                fill()

    def _add_version_columns(self) -> None:
        """A store made before writes were versioned: its rows are the base version (below every write)."""
        missing = [name for name in _VERSION_COLUMNS if name not in _columns(self._db, "docs")]
        if not missing:
            return
        with self._transaction():
            for name in missing:
                self._db.execute(f"ALTER TABLE docs ADD COLUMN {name} {_VERSION_COLUMNS[name]}")
            rows = self._db.execute("SELECT key, doc_id, clock, writer, deleted FROM docs").fetchall()
            self._db.executemany("UPDATE docs SET bucket = ?, row_hash = ? WHERE key = ?",
                                 [(bucket_of(d), row_hash(d, c, w, x), k) for k, d, c, w, x in rows])

    def _fill_metadata(self) -> None:
        for key, metadata in self._db.execute("SELECT key, metadata FROM docs WHERE deleted = 0").fetchall():
            self._db.executemany(_INSERT_META, _metadata_rows(key, json.loads(metadata or "{}")))

    def _fill_schema(self) -> None:
        """A store made before schemas: each key takes the type most of its stored values have."""
        rows = self._db.execute("SELECT name, kind, COUNT(DISTINCT key) AS n FROM doc_meta GROUP BY name, kind "
                                "ORDER BY n DESC").fetchall()
        self._db.executemany("INSERT OR IGNORE INTO metadata_schema (name, type) VALUES (?, ?)",
                             [(name, MetaKind(kind).schema_type) for name, kind, _ in rows])

    def schema(self) -> dict[str, str]:
        """metadata key -> type (twostage.schema.TYPES)."""
        return dict(self._schema)

    def declare_schema(self, declared: dict[str, str]) -> None:
        """Types declared for keys (at build): a key already typed otherwise is INVALID_ARGUMENT."""
        with self._lock:
            clash = {k: t for k, t in declared.items() if self._schema.get(k, t) != t}
            if clash:
                key = next(iter(clash))
                raise InvalidArgument(f"metadata schema: {key!r} is declared {clash[key]} but the index holds "
                                      f"{self._schema[key]} values under it")
            with self._transaction():
                self._db.executemany("INSERT OR IGNORE INTO metadata_schema (name, type) VALUES (?, ?)",
                                     list(declared.items()))
            self._schema.update(declared)

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

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction: committed (durable) when the block ends, rolled back whole when it raises; a
        full disk is StorageFull."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            self._rollback()
            raise _storage_error(error) from None
        except BaseException:
            self._rollback()
            raise

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
            return self._max_seq_locked()

    def count(self) -> int:
        return self._live

    def request(self, request_id: str) -> StoredRequest | None:
        """The write stored under this request id, if any."""
        with self._read_lock:
            row = self._reader.execute("SELECT count, clock, writer FROM requests WHERE request_id = ?",
                                       (request_id,)).fetchone()
        return None if row is None else StoredRequest(row[0], Version(row[1], row[2]))

    def purge_horizon(self) -> Version | None:
        """Tombstones older than this were purged: an id absent here with an older version was deleted."""
        with self._lock:
            row = self._db.execute("SELECT value FROM replica_state WHERE name = 'purge_horizon'").fetchone()
        return None if row is None else Version(row[0], "")

    def apply(self, writes: list[Write], request_id: str = "", answer=None) -> Applied:
        """Store each write whose version is newer than the one held for its id, in one transaction
        (durable on return). A request id already stored is not applied again: its first answer comes
        back. ``answer(applied_rows, deleted)`` gives the count a request id is answered with (default:
        the writes given)."""
        with self._lock:
            with self._transaction():
                if request_id and (known := self._db.execute(
                        "SELECT count, clock, writer FROM requests WHERE request_id = ?", (request_id,)).fetchone()):
                    return Applied(count=known[0], replayed=True, version=Version(known[1], known[2]),
                                   last_seq=self._max_seq_locked())
                applied = self._apply_locked(writes)
                count = len(writes) if answer is None else answer(applied)
                if request_id:
                    version = writes[0].version if writes else Version(0, "")
                    self._db.execute("INSERT INTO requests (request_id, count, clock, writer, at) VALUES (?, ?, ?, ?, ?)",
                                     (request_id, count, version.clock, version.writer, time.time()))
            self._live += len(applied.added) - applied.live_before
            self._schema.update(applied.new_types)
        return Applied(applied.keys, applied.added, applied.deleted, applied.last_seq, count,
                       superseded=applied.superseded, newest=applied.newest)

    def _max_seq_locked(self) -> int:
        if not self._has_state:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM docs").fetchone()[0]
        # Purged tombstones took their sequences with them; the floor keeps sequences from ever going back.
        return self._db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM docs), 0), "
            "COALESCE((SELECT value FROM replica_state WHERE name = 'seq_floor'), 0))").fetchone()[0]

    def _apply_locked(self, writes: list[Write]) -> "_Outcome":
        ids = [w.doc.id for w in writes]
        held: dict[str, tuple[int, Version, int]] = {}  # id -> (key, version, deleted)
        for part, marks in _in_chunks(ids):
            for doc_id, key, clock, writer, deleted in self._db.execute(
                    f"SELECT doc_id, key, clock, writer, deleted FROM docs WHERE doc_id IN ({marks})", part):
                held[doc_id] = (key, Version(clock, writer), deleted)
        horizon = self._db.execute("SELECT value FROM replica_state WHERE name = 'purge_horizon'").fetchone()
        absent = None if horizon is None else Version(horizon[0], "")

        def newer(write: Write) -> bool:
            current = held[write.doc.id][1] if write.doc.id in held else absent
            return current is None or write.version > current

        chosen = [w for w in writes if newer(w)]
        newest = max([w.version for w in writes] + [version for _, version, _ in held.values()]
                     + ([absent] if absent is not None and len(held) < len(writes) else []), default=None)
        superseded = len(writes) - len(chosen)  # held at a newer version, or deleted past the purge horizon
        seq = self._max_seq_locked()
        if not chosen:
            return _Outcome(last_seq=seq, superseded=superseded, newest=newest)
        replaced_live = [w.doc.id for w in chosen if w.doc.id in held and not held[w.doc.id][2]]
        self._unindex_text(replaced_live)
        keys, added, deleted = [], [], 0
        for write in chosen:
            seq += 1
            doc, version = write.doc, write.version
            hashed = (bucket_of(doc.id), row_hash(doc.id, version.clock, version.writer, write.deleted))
            if write.deleted:
                row = (doc.id, None, None, None, None, 1)
            else:
                vector = np.asarray(write.vector, dtype=np.float32)
                row = (doc.id, doc.title, doc.text, json.dumps(doc.metadata), vector.tobytes(), 0)
            key = self._db.execute(
                "INSERT INTO docs (doc_id, title, text, metadata, vector, deleted, seq, clock, writer, bucket, row_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                "title=excluded.title, text=excluded.text, metadata=excluded.metadata, vector=excluded.vector, "
                "deleted=excluded.deleted, seq=excluded.seq, clock=excluded.clock, writer=excluded.writer, "
                "bucket=excluded.bucket, row_hash=excluded.row_hash, from_peer=0 RETURNING key",
                (*row, seq, version.clock, version.writer, *hashed),
            ).fetchone()[0]
            keys.append(key)
            if write.deleted:
                deleted += doc.id in held and not held[doc.id][2]
            else:
                added.append((key, vector))
        live = {key for key, _ in added}
        self._db.executemany("INSERT INTO docs_fts(rowid, title, text) VALUES (?, ?, ?)",
                             [(key, w.doc.title, w.doc.text) for key, w in zip(keys, chosen) if key in live])
        self._forget_metadata(keys)
        self._db.executemany(_INSERT_META, [row for key, w in zip(keys, chosen) if key in live
                                            for row in _metadata_rows(key, w.doc.metadata)])
        # New keys take the type of their first value. Never a refusal here: a row a peer accepted is copied
        # as it is (clients' writes were checked against the schema before they came here).
        new_types, contradicting = {}, []
        for write in chosen:
            for name, value in write.doc.metadata.items():
                if write.deleted:
                    continue
                held = self._schema.get(name) or new_types.get(name)
                if held is None:
                    new_types[name] = type_of(value)
                elif type_of(value) != held and not (held == "string_list" and type_of(value) == "string"):
                    contradicting.append((write.doc.id, name))
        if contradicting:  # replicas or shards that typed a key apart: filters on it miss these rows
            SCHEMA_CONFLICTS.inc(len(contradicting))
            log.warning("%d stored values contradict this index's metadata types, e.g. document %r key %r",
                        len(contradicting), *contradicting[0])
        self._db.executemany("INSERT OR IGNORE INTO metadata_schema (name, type) VALUES (?, ?)",
                             list(new_types.items()))
        return _Outcome(keys, added, deleted, seq, live_before=len(replaced_live), superseded=superseded,
                        newest=newest, new_types=new_types)

    def upsert(self, docs: list[Document], vectors: np.ndarray, version: Version) -> Applied:
        """Store documents at one version (ids unique within the call)."""
        return self.apply([Write(d, v, version) for d, v in zip(docs, vectors)])

    def delete(self, doc_ids: list[str], version: Version) -> Applied:
        """Tombstone ids at one version; ``deleted`` counts those that were live."""
        return self.apply([Write(Document(i, "", ""), None, version) for i in doc_ids])

    def purge(self, horizon: Version, requests_older_than_s: float, saved_seq: int) -> int:
        """Drop tombstones older than ``horizon`` (ids absent from here on count as deleted at it) and request
        ids older than the given age. Only tombstones at or below ``saved_seq`` go: a graph saved before a
        tombstone must still find it when it replays the store after a crash. Returns the tombstones dropped."""
        with self._lock, self._transaction():
            self._db.execute("INSERT INTO replica_state (name, value) VALUES ('seq_floor', ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = MAX(value, excluded.value)",
                             (self._max_seq_locked(),))
            dropped = self._db.execute("DELETE FROM docs WHERE deleted = 1 AND clock < ? AND seq <= ?",
                                       (horizon.clock, saved_seq)).rowcount
            self._db.execute("INSERT INTO replica_state (name, value) VALUES ('purge_horizon', ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = MAX(value, excluded.value)", (horizon.clock,))
            self._db.execute("DELETE FROM requests WHERE at < ?", (time.time() - requests_older_than_s,))
        return dropped

    def digests(self, tombstones_after: Version, below_clock: int = 0) -> dict[int, tuple[int, int]]:
        """bucket -> (rows, sum of row hashes mod 2^64). Tombstones at or before ``tombstones_after`` are left
        out (replicas purge them at slightly different times); with ``below_clock``, only rows older than it."""
        below = "AND clock < ? " if below_clock else ""
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT bucket, COUNT(*), SUM(row_hash) FROM docs WHERE (deleted = 0 OR clock > ?) {below}"
                "GROUP BY bucket", (tombstones_after.clock, *([below_clock] if below_clock else []))).fetchall()
        return {bucket: (count, total % (1 << 64)) for bucket, count, total in rows}

    def versions(self, buckets: list[int]) -> list[tuple[str, Version, bool]]:
        """(id, version, deleted) of every row in these buckets, old tombstones included (a replica still
        holding a stale live copy learns of its delete from them)."""
        found = []
        with self._read_lock:
            for part, marks in _in_chunks([int(b) for b in buckets]):
                found += [(doc_id, Version(clock, writer), bool(deleted)) for doc_id, clock, writer, deleted in
                          self._reader.execute(
                              f"SELECT doc_id, clock, writer, deleted FROM docs WHERE bucket IN ({marks})", part)]
        return found

    def rows(self, doc_ids: list[str]) -> list[Write]:
        """These ids as stored, live or tombstone (ids never stored, or purged, are left out)."""
        found = []
        with self._read_lock:
            for part, marks in _in_chunks(doc_ids):
                found += [_write_of(row) for row in self._reader.execute(
                    f"SELECT {_WRITE_COLUMNS} FROM docs WHERE doc_id IN ({marks})", part)]
        return found

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

    def writes_since(self, seq: int, batch_rows: int = 1024, after_key: int = 0) -> Iterator[list[Write]]:
        """Every row written after ``(seq, after_key)`` (0: after the whole of ``seq``), as it is now, in
        (sequence, key) order, with its version and vector (a tombstone's vector None): for carrying writes over
        to another index, and for replicas catching up. The cursor is exact even where rows share a sequence, as
        those of stores made before every row had its own do."""
        last = (seq, after_key or _AFTER_EVERY_KEY)
        while True:
            with self._read_lock:
                rows = self._reader.execute(
                    f"SELECT {_WRITE_COLUMNS} FROM docs WHERE (seq, key) > (?, ?) ORDER BY seq, key LIMIT ?",
                    (*last, batch_rows),
                ).fetchall()
            if not rows:
                return
            batch = [_write_of(row) for row in rows]
            last = (batch[-1].seq, batch[-1].key)
            yield batch

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

    def lexical_scores(self, query: str, keys: list[int]) -> dict[int, float]:
        """BM25 of the query for these documents (those matching no query term are left out)."""
        match = lexical_query(query)
        if not match or not keys:
            return {}
        found: dict[int, float] = {}
        with self._read_lock:
            self._require_lexical()
            for chunk, marks in _in_chunks(sorted(set(keys))):
                sql = (f"SELECT rowid, -bm25(docs_fts, {_TITLE_WEIGHT}, {_TEXT_WEIGHT}) FROM docs_fts "
                       f"WHERE docs_fts MATCH ? AND rowid IN ({marks})")
                found.update(self._reader.execute(sql, [match, *chunk]).fetchall())
        return found

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
