"""``twostage index build`` checks a corpus as Upsert would, before it embeds anything,
and leaves nothing behind when it fails."""

import json

import pytest

from recall_server.index import DocumentIndex
from twostage.cli import main


def write(path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}], "line 2: id 'a' already appears on line 1"),
        ([{"id": "a", "body": "no text"}], "line 1: document 'a' has no title or text"),
        ([{"_id": "a", "text": "x"}, '{"_id": "b", "text": '], "line 2: not JSON"),
        ([], "no documents to index"),
        (["", "   "], "no documents to index"),
    ],
)
def test_invalid_corpora_are_refused_with_line_numbers(tmp_path, capsys, rows, message):
    corpus = write(tmp_path / "corpus.jsonl", *rows)
    assert main(["index", "build", "--corpus", corpus, "--out", str(tmp_path / "ix")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # no index, no .partial


def test_skip_invalid_indexes_the_rest_with_typed_metadata(tmp_path, capsys, models):
    corpus = write(
        tmp_path / "corpus.jsonl",
        {"_id": "a", "title": "Aspirin", "text": "Aspirin lowers the risk of colorectal cancer.", "year": 2019,
         "tags": ["oncology", "drugs"], "metadata": {"peer_reviewed": True}},
        {"_id": "b", "text": "Statins reduce cholesterol.", "nested": {"dropped": 1}},
        {"_id": "a", "text": "a duplicate"},
        "not json",
    )
    out = tmp_path / "ix"
    assert main(["index", "build", "--corpus", corpus, "--out", str(out), "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "indexed 2 documents" in captured.out and "skipped 2 invalid lines" in captured.out
    index = DocumentIndex.open(out, "bge-small-en", 384)
    try:
        stored = index.get(["a", "b"])
        assert stored["a"].metadata == {"year": 2019, "tags": ["oncology", "drugs"], "peer_reviewed": True}
        assert stored["a"].text.startswith("Aspirin")  # the first copy of a repeated id wins
        assert stored["b"].metadata == {}
    finally:
        index.close()


def test_sharded_build_records_each_shards_part(tmp_path, models):
    from recall_server.build import build_from_corpus
    from twostage.sharding import shard_of

    rows = [{"_id": f"doc-{i}", "text": f"document number {i}"} for i in range(12)]
    out = tmp_path / "ix"
    build_from_corpus(write(tmp_path / "corpus.jsonl", *rows), out, shards=3, progress=False)
    for shard in range(3):
        index = DocumentIndex.open(out / f"shard-{shard}", "bge-small-en", 384, read_only=True)
        try:
            assert (index.manifest.shard, index.manifest.shards) == (shard, 3)
            ids = [r["_id"] for r in rows if shard_of(r["_id"], 3) == shard]
            assert sorted(index.get(ids)) == sorted(ids) and index.store.count() == len(ids)
        finally:
            index.close()
