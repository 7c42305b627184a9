"""Filtered dense search at every selectivity: every hit passes, and k hits come back when k documents
pass. When few pass the index scores them exactly (the hits are the brute-force k nearest); when many
do it searches the graph with over-fetch, as near to brute force as the graph is without a filter."""

import numpy as np
import pytest

from recall_server.index import DocumentIndex
from twostage.corpus import Document
from twostage.filters import FilterClause, NumberRange, check_filter

DOCS, DIMS, K = 4000, 16, 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((DOCS, DIMS)).astype(np.float32)
    docs = [Document(f"d{i}", "", f"text {i}", {"bucket": int(rng.integers(0, 1000)),
                                                   "tags": ["even" if i % 2 == 0 else "odd"]})
            for i in range(DOCS)]
    directory = tmp_path_factory.mktemp("filtered") / "index"
    # Few documents pass -> exact scoring of them; many pass -> graph search with over-fetch.
    index = DocumentIndex.create(directory, "random", DIMS, filter_exact_max_docs=200)
    index.upsert(docs, vectors)
    yield index, docs, vectors
    index.close()


def brute_force(vectors, docs, query, filter_, k):
    passing = [i for i, d in enumerate(docs) if filter_.matches(d.metadata)]
    if not passing:
        return []
    chosen = vectors[passing]
    similarity = chosen @ query / (np.linalg.norm(chosen, axis=1) * np.linalg.norm(query))
    return [docs[passing[i]].id for i in np.argsort(-similarity)[:k]]


@pytest.mark.parametrize("selectivity", [0.001, 0.01, 0.05, 0.2, 0.5, 1.0])
def test_filtered_hits_are_the_nearest_passing_documents(corpus, selectivity):
    index, docs, vectors = corpus
    filter_ = check_filter([FilterClause("bucket", range=NumberRange(lt=1000 * selectivity))])
    passing = sum(filter_.matches(d.metadata) for d in docs)
    scored_exactly = passing <= index.filter_exact_max_docs
    rng = np.random.default_rng(int(selectivity * 1000))
    found = wanted = 0
    for _ in range(20):
        query = rng.standard_normal(DIMS).astype(np.float32)
        hits = [doc.id for doc, _ in index.search(query, K, filter_)]
        assert all(filter_.matches(docs[int(i[1:])].metadata) for i in hits)
        assert len(hits) == min(K, passing)  # k when that many pass, all of them when fewer do
        expected = brute_force(vectors, docs, query, filter_, K)
        if scored_exactly:
            assert hits == expected
        found += len(set(hits) & set(expected))
        wanted += len(expected)
    # The graph path: as close to brute force as the graph's own search (random 16-d vectors are its worst case).
    assert found / wanted >= 0.95


def test_conjunctions_and_a_filter_no_document_passes(corpus):
    index, docs, vectors = corpus
    query = np.ones(DIMS, np.float32)
    # About 100 documents pass both clauses: the passing set is scored exactly, so the answer is brute force's.
    both = check_filter([FilterClause("tags", equals="even"), FilterClause("bucket", range=NumberRange(gte=950))])
    assert sum(both.matches(d.metadata) for d in docs) <= index.filter_exact_max_docs
    hits = index.search(query, K, both)
    assert [d.id for d, _ in hits] == brute_force(vectors, docs, query, both, K)
    nothing = check_filter([FilterClause("tags", equals="neither")])
    assert index.search(query, K, nothing) == []


class WatchedGraph:
    """The index's real graph, noting how many neighbours each search asks for and, for each read of
    vectors, how many keys and whether the graph lock was held."""

    def __init__(self, graph, lock):
        self.graph, self.lock = graph, lock
        self.fetched: list[int] = []
        self.reads: list[tuple[int, bool]] = []

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def __len__(self):
        return len(self.graph)

    def search(self, vector, count, *args, **kwargs):
        self.fetched.append(count)
        return self.graph.search(vector, count, *args, **kwargs)

    def get(self, keys, *args, **kwargs):
        self.reads.append((len(keys), self.lock.locked()))
        return self.graph.get(keys, *args, **kwargs)


@pytest.fixture
def capped(corpus, monkeypatch):
    """The corpus index with a low over-fetch cap and small exact chunks, and a filter ~240 documents pass
    (more than it scores exactly up front), too few of them near a query for the capped graph search."""
    import recall_server.index

    index, docs, vectors = corpus
    watched = WatchedGraph(index._graph, index._graph_lock)
    monkeypatch.setattr(index, "_graph", watched)
    monkeypatch.setattr(index, "filter_max_fetch", 64, raising=False)
    monkeypatch.setattr(recall_server.index, "EXACT_CHUNK_KEYS", 50, raising=False)
    filter_ = check_filter([FilterClause("bucket", range=NumberRange(lt=60))])
    assert sum(filter_.matches(d.metadata) for d in docs) > index.filter_exact_max_docs
    return index, docs, vectors, watched, filter_


def test_the_over_fetch_stops_at_its_cap_and_the_passing_documents_are_scored_exactly(capped):
    index, docs, vectors, watched, filter_ = capped
    rng = np.random.default_rng(7)
    for _ in range(5):
        query = rng.standard_normal(DIMS).astype(np.float32)
        hits = [doc.id for doc, _ in index.search(query, K, filter_)]
        assert hits == brute_force(vectors, docs, query, filter_, K)
    assert watched.fetched and max(watched.fetched) <= 64
    # Scored in chunks, each under the lock on its own (searches and writes go on between them).
    assert watched.reads and all(keys <= 50 and locked for keys, locked in watched.reads)
    assert len(watched.reads) >= 5 * 5


def test_the_exact_pass_stops_once_the_deadline_passes(capped):
    import time

    from twostage.errors import DeadlineExceeded

    index, docs, vectors, watched, filter_ = capped
    query = np.random.default_rng(8).standard_normal(DIMS).astype(np.float32)
    with pytest.raises(DeadlineExceeded):
        index.nearest(query, K, filter_, deadline=time.monotonic() - 1)
    assert watched.reads == []  # stopped before scoring anything
    hits = index.nearest(query, K, filter_, deadline=time.monotonic() + 60)
    found = index.fetch([key for key, _ in hits])
    assert [found[key].id for key, _ in hits] == brute_force(vectors, docs, query, filter_, K)
