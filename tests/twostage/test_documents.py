"""One mapping from JSON rows to documents and one set of rules, shared by
Upsert, ``docs upsert`` and ``index build``."""

import json

import pytest

from recall_server.config import RecallSettings
from twostage.convert import document_from_proto, document_to_proto
from twostage.corpus import Document, document_from_row
from twostage.documents import check_documents, scan_corpus, valid_documents
from twostage.errors import InvalidArgument

LIMITS = RecallSettings().document_limits()


def lines(*rows) -> list[tuple[int, str]]:
    return [(i, row if isinstance(row, str) else json.dumps(row)) for i, row in enumerate(rows, 1)]


def test_top_level_fields_become_typed_metadata_and_unstorable_ones_are_reported():
    doc, dropped = document_from_row({
        "_id": 7, "title": "T", "text": "x", "lang": "en", "year": 2021, "score": 0.5, "open": True,
        "tags": ["a", "b"], "metadata": {"source": "pubmed"}, "nested": {"a": 1}, "mixed": [1, "a"], "none": None,
    })
    assert doc == Document("7", "T", "x", {"lang": "en", "year": 2021, "score": 0.5, "open": True,
                                           "tags": ["a", "b"], "source": "pubmed"})
    assert sorted(dropped) == ["mixed", "nested", "none"]


def test_metadata_round_trips_through_the_proto_with_its_types():
    doc = Document("d", "t", "x", {"lang": "en", "year": 2021, "score": 0.25, "open": False, "tags": ["a"]})
    back = document_from_proto(document_to_proto(doc))
    assert back == doc
    assert type(back.metadata["year"]) is int and type(back.metadata["open"]) is bool


def test_scan_finds_every_kind_of_bad_line_with_its_number():
    scan = scan_corpus(lines(
        {"_id": "a", "text": "fine"},
        "{not json",
        {"_id": "a", "text": "again"},
        {"id": "b", "body": "no text field"},
        {"_id": " padded", "text": "x"},
        {"_id": "c", "text": "x", "title": 5},
        {"_id": "d", "text": "x" * (LIMITS.max_doc_chars + 1)},
        ["a", "list"],
        {"_id": "e", "title": "only a title"},
    ), LIMITS)
    assert scan.valid == 2
    assert sorted(scan.invalid) == [2, 3, 4, 5, 6, 7, 8]
    assert "not JSON" in scan.invalid[2]
    assert "already appears on line 1" in scan.invalid[3]
    assert "no title or text" in scan.invalid[4]
    assert "malformed" in scan.invalid[5]
    assert "title must be a string" in scan.invalid[6]
    assert "limit is" in scan.invalid[7]
    assert "JSON object" in scan.invalid[8]
    assert [d.id for d in valid_documents(lines(
        {"_id": "a", "text": "fine"}, "{not json", {"_id": "a", "text": "again"}, {"id": "b", "body": "x"},
        {"_id": " padded", "text": "x"}, {"_id": "c", "text": "x", "title": 5},
        {"_id": "d", "text": "x" * (LIMITS.max_doc_chars + 1)}, ["a", "list"], {"_id": "e", "title": "only a title"},
    ), scan)] == ["a", "e"]


def test_a_request_is_checked_like_a_corpus():
    with pytest.raises(InvalidArgument, match="appears more than once"):
        check_documents([Document("a", "", "x"), Document("a", "", "y")], LIMITS)
    with pytest.raises(InvalidArgument, match="documents \\(count\\)"):
        check_documents([], LIMITS)
    with pytest.raises(InvalidArgument, match="documents\\[0\\]: metadata 'tags' has 300 items"):
        check_documents([Document("a", "", "x", {"tags": ["t"] * 300})], LIMITS)
