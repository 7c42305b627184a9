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
