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


def test_the_progress_bar_advances_with_the_work_not_the_document_count():
    """Batches go short documents first: the bar moves by each batch's padded tokens, so its rate and ETA hold
    from the first batch (counting documents, the short ones would make the start look many times faster)."""
    from types import SimpleNamespace

    import numpy as np

    from recall_server.build import embed_documents
    from twostage.batching import BatchPolicy
    from twostage.corpus import Document
    from twostage.execution_plan import SinglePlan

    lengths = [4] * 8 + [64] * 8  # half the documents, a 17th of the tokens

    class Embedder:
        dims = 2
        plan = SinglePlan([])  # batches as the policy makes them

        def encode(self, texts, is_query):
            return [SimpleNamespace(length=int(text.split()[0])) for text in texts]

        def embed(self, encoded):
            return np.zeros((len(encoded), 2), np.float32)

    class Bar:
        def __init__(self):
            self.shown = []

        def update(self, n):
            self.shown.append((self.shown[-1] if self.shown else 0) + n)

    docs = [Document(str(i), "", f"{n} tokens") for i, n in enumerate(lengths)]
    bar = Bar()
    embed_documents(Embedder(), docs, BatchPolicy(max_batch_size=8, max_batch_tokens=1 << 20), bar)
    assert bar.shown == [round(16 * 32 / (32 + 512)), 16]  # the short half is 1/17 of the work, not half of it


def test_an_index_records_its_embedding_graph_and_the_eval_cache_keeps_one_per_graph(tmp_path, models, monkeypatch):
    """Documents embedded by the per-row rewrite and queries by the stock graph differ slightly: the cache of
    evaluation indexes must never hand an index of one graph to a server of the other."""
    from recall_server.build import cached_index
    from recall_server.index import IndexManifest

    dataset = tmp_path / "tiny"
    dataset.mkdir()
    write(dataset / "corpus.jsonl", {"_id": "a", "text": "Tents keep campers dry."},
          {"_id": "b", "text": "Lamps light desks."})
    built = {}
    for plan, graph in (("single", "stock"), ("rows", "per-row"), ("sessions", "stock")):
        monkeypatch.setenv("TWOSTAGE_RECALL_EXECUTION_PLAN", plan)
        index_dir = cached_index(dataset, root=tmp_path / "cache")
        assert (IndexManifest.read(index_dir).model, IndexManifest.read(index_dir).embedding_graph) == (
            "bge-small-en", graph)
        built.setdefault(graph, (index_dir, (index_dir / "index.json").stat().st_mtime_ns))
        assert built[graph] == (index_dir, (index_dir / "index.json").stat().st_mtime_ns)  # one per graph, reused
    assert built["stock"][0] != built["per-row"][0]
