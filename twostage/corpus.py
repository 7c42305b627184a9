"""Reading data sets in BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


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
    """Documents from a BEIR directory or a JSONL file with ``_id`` (or ``id``), ``title``, ``text``."""
    for row in _jsonl(corpus_file(path)):
        doc_id = str(row.get("_id", row.get("id", "")))
        metadata = {k: str(v) for k, v in (row.get("metadata") or {}).items()}
        yield Document(doc_id, row.get("title") or "", row.get("text") or "", metadata)


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
    return f"{doc.title}. {doc.text}" if doc.title else doc.text
