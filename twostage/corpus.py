"""Reading data sets in BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from twostage.errors import InvalidArgument

# The SciFact slice shipped with the package: ``make demo``, tests and the load tester's default queries.
DEMO_CORPUS = Path(__file__).resolve().parent / "data" / "scifact-demo"


# A metadata value: a string, a number, a boolean or a list of strings.
MetadataValue = str | int | float | bool | list[str]
# Fields of a corpus row that are not metadata.
_DOCUMENT_FIELDS = ("_id", "id", "title", "text", "metadata")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    metadata: dict[str, MetadataValue] = field(default_factory=dict)


def _metadata_value(value) -> MetadataValue | None:
    """The value as stored, or None when metadata cannot hold it (objects, nulls, mixed lists)."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def document_from_row(row: dict) -> tuple[Document, list[str]]:
    """Map one JSON corpus row to a Document, the way every write path does.

    Metadata is the ``metadata`` object plus every other top-level field;
    returns the names of fields whose values metadata cannot hold (dropped).
    """
    if not isinstance(row, dict):
        raise InvalidArgument(f"expected a JSON object, got {type(row).__name__}")
    doc_id = row.get("_id", row.get("id", ""))
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        raise InvalidArgument(f"_id must be a string, got {doc_id!r}")
    for name in ("title", "text"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise InvalidArgument(f"{name} must be a string, got {type(row[name]).__name__}")
    nested = row.get("metadata") or {}
    if not isinstance(nested, dict):
        raise InvalidArgument(f"metadata must be an object, got {type(nested).__name__}")
    top = {k: v for k, v in row.items() if k not in _DOCUMENT_FIELDS}
    if clash := sorted(set(top) & set(nested)):
        # Neither copy is dropped silently: the writer says which one is meant.
        raise InvalidArgument(f"field {clash[0]!r} is both a top-level field and a key of metadata; keep one")
    fields = {**top, **nested}
    metadata, dropped = {}, []
    for key, value in fields.items():
        converted = _metadata_value(value)
        if converted is None:
            dropped.append(key)
        else:
            metadata[key] = converted
    return Document(str(doc_id), row.get("title") or "", row.get("text") or "", metadata), dropped


def corpus_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of every non-blank line of a JSONL corpus or BEIR directory."""
    with open(corpus_file(path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not JSON: {error}") from None


def corpus_file(path: Path) -> Path:
    path = Path(path)
    return path / "corpus.jsonl" if path.is_dir() else path


def read_corpus(path: Path) -> Iterator[Document]:
    """Documents from a BEIR directory or a JSONL file with ``_id`` (or ``id``), ``title``, ``text``;
    no validation (see ``twostage.documents.scan_corpus`` for that)."""
    for row in _jsonl(corpus_file(path)):
        yield document_from_row(row)[0]


def read_queries(path: Path) -> dict[str, str]:
    path = Path(path)
    file = path / "queries.jsonl" if path.is_dir() else path
    return {str(row["_id"]): row["text"] for row in _jsonl(file)}


def read_qrels(path: Path, split: str = "test") -> dict[str, dict[str, int]]:
    """query id -> {doc id: graded relevance}; the header row is skipped."""
    qrels: dict[str, dict[str, int]] = {}
    with open(Path(path) / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) < 3 or not row[2].lstrip("-").isdigit():
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def document_text(doc: Document) -> str:
    """What the models read for a document: its title, then its text."""
    return titled_text(doc.title, doc.text)


def titled_text(title: str, text: str) -> str:
    """``document_text`` of a title and a text that are not (yet) a Document."""
    return f"{title}. {text}" if title else text
