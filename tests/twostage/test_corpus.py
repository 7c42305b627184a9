import json

from twostage.corpus import Document, document_text, read_corpus, read_qrels, read_queries


def test_reads_beir_layout(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "T", "text": "body"}) + "\n\n" + json.dumps({"_id": 7, "text": "x"}) + "\n"
    )
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n")
    assert list(read_corpus(tmp_path)) == [Document("d1", "T", "body"), Document("7", "", "x")]
    assert read_queries(tmp_path) == {"q1": "what"}
    assert read_qrels(tmp_path) == {"q1": {"d1": 2, "d2": 0}}


def test_document_text_joins_title_and_text():
    assert document_text(Document("a", "Title", "Body")) == "Title. Body"
    assert document_text(Document("a", "", "Body")) == "Body"
