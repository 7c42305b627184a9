"""Pseudo-relevance feedback on one recall server: with it off a search answers exactly as the first pass always
did; with it on, the second pass is the one a gateway over several shards asks for with the vector it forms,
bit for bit; a deadline too short for the second pass skips it and says so."""

import time

import numpy as np
import pytest

from twostage import feedback
from twostage.convert import vector_from_bytes
from twostage.scoring import fuse_recall
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc

MODES = {"dense": common_pb2.RECALL_MODE_DENSE, "lexical": common_pb2.RECALL_MODE_LEXICAL,
         "hybrid": common_pb2.RECALL_MODE_HYBRID}


@pytest.fixture
def stub(recall_target, channel_to):
    return recall_pb2_grpc.RecallStub(channel_to(recall_target))


def first_pass(index, settings, query: str, vector: np.ndarray, k: int, mode: str) -> list[tuple]:
    """A search as recall answered one before feedback existed, from the index's own parts: (id, score, cosine,
    BM25) best first."""
    dense = dict(index.nearest(vector, k)) if mode != "lexical" else {}
    lexical, keys = {}, list(dense)
    if mode != "dense":
        depth = max(k, settings.lexical_depth) if mode == "hybrid" else k
        matches = index.store.lexical_search(query, depth)
        lexical = dict(matches[:k])
        keys = list(lexical) if mode == "lexical" else list(dense | lexical)
        if mode == "hybrid":
            every, floor = dict(matches), (matches[-1][1] if len(matches) == depth else 0.0)
            lexical.update({key: every.get(key, floor) for key in dense if key not in lexical})
        if missing := [key for key in lexical if key not in dense]:
            dense.update(index.dense_scores(vector, missing))
    if mode == "hybrid":
        ranked = fuse_recall(keys, [dense.get(key, 0.0) for key in keys], [lexical.get(key, 0.0) for key in keys],
                             settings.hybrid_fusion, settings.hybrid_dense_weight)[:k]
    else:
        source = dense if mode == "dense" else lexical
        ranked = sorted(((key, source[key]) for key in keys), key=lambda pair: -pair[1])[:k]
    docs = index.fetch([key for key, _ in ranked])
    return [(docs[key].id, score, dense.get(key, 0.0), lexical.get(key, 0.0)) for key, score in ranked]


def as_sent(candidates) -> list[tuple]:
    return [(c.id, c.score, c.dense_score, c.lexical_score) for c in candidates]


def float32(rows: list[tuple]) -> list[tuple]:
    """What a proto float carries."""
    return [(doc_id, *(float(np.float32(x)) for x in scores)) for doc_id, *scores in rows]


async def test_with_feedback_off_every_mode_answers_as_the_first_pass_did(recall_server, stub, demo_data):
    service = recall_server[0].lifecycle
    for query in list(demo_data["queries"].values())[:4]:
        (vector,) = await service._embed([query], True, None)
        for mode, code in MODES.items():
            reply = await stub.Search(recall_pb2.RecallSearchRequest(query=query, k=15, mode=code, prf_depth=0))
            expected = first_pass(service.index, service.settings, query, vector, 15, mode)
            assert as_sent(reply.candidates) == float32(expected), (query, mode)
            assert reply.prf_hits == 0 and "prf_ms" not in reply.timings_ms
            assert all(c.prf_dense_score == 0 and not c.vector for c in reply.candidates)


async def test_the_second_pass_asked_with_the_refined_vector_equals_feedback_run_here(stub, demo_data):
    """What a gateway over several shards does (first round with vectors, Rocchio, second round with the refined
    vector) gives what one server's own feedback gives, bit for bit."""
    for query in list(demo_data["queries"].values())[:4]:
        own = await stub.Search(recall_pb2.RecallSearchRequest(query=query, k=12, prf_depth=3, prf_weight=0.4))
        assert own.prf_hits == 3 and own.timings_ms["prf_ms"] > 0 and own.mode == common_pb2.RECALL_MODE_HYBRID
        first = await stub.Search(recall_pb2.RecallSearchRequest(query=query, k=12, prf_depth=0, return_vectors=12))
        assert len(first.query_vector) == 4 * 384 and all(len(c.vector) == 4 * 384 for c in first.candidates)
        hits = np.stack([vector_from_bytes(c.vector) for c in first.candidates[:3]])
        refined = feedback.refine(vector_from_bytes(first.query_vector), hits, np.float32(0.4))
        second = await stub.Search(recall_pb2.RecallSearchRequest(
            query=query, k=12, query_vector=first.query_vector, feedback_vector=refined.astype("<f4").tobytes()))
        assert [(*row, c.prf_dense_score) for row, c in zip(as_sent(second.candidates), second.candidates)] == \
               [(*row, c.prf_dense_score) for row, c in zip(as_sent(own.candidates), own.candidates)]
        # The order is the refined vector's; dense_score stays the query's own cosine (calibrated fusion reads it).
        by_id = {c.id: c for c in first.candidates}
        assert all(c.dense_score == pytest.approx(by_id[c.id].dense_score, abs=1e-6)
                   for c in own.candidates if c.id in by_id)
        assert any(c.prf_dense_score != c.dense_score for c in own.candidates)
        assert [c.id for c in own.candidates] != [c.id for c in first.candidates]


async def test_hybrid_gets_feedback_by_default_dense_when_asked_lexical_never(stub, demo_data):
    query = next(iter(demo_data["queries"].values()))

    async def hits(mode: str, **fields) -> int:
        request = recall_pb2.RecallSearchRequest(query=query, k=10, mode=MODES[mode], **fields)
        return (await stub.Search(request)).prf_hits

    info = await stub.Info(common_pb2.InfoRequest())
    assert (info.prf_depth, info.prf_weight) == (feedback.DEFAULT.depth, feedback.DEFAULT.weight)
    assert await hits("hybrid") == info.prf_depth
    assert await hits("dense") == 0 and await hits("dense", prf_depth=2) == 2
    assert await hits("lexical", prf_depth=2) == 0
    assert await hits("hybrid", prf_weight=0) == 0


async def test_too_little_time_for_a_second_pass_skips_it_and_says_so(recall_server, demo_data):
    service = recall_server[0].lifecycle
    query = next(iter(demo_data["queries"].values()))
    (vector,) = await service._embed([query], True, None)
    with service._leases.hold(service.index) as index:
        passed = service._find(index, query, vector, 10, "hybrid", None, time.monotonic(), feedback.Feedback(3, 0.5))
    assert passed.prf_hits == 0 and "ms left, a second pass needs about" in passed.prf_skipped
    assert "prf_ms" not in passed.timings  # it did not run: nothing to count (a gateway reports prf_ms as run)
    expected = first_pass(service.index, service.settings, query, vector, 10, "hybrid")
    assert [(c.document.id, c.score, c.dense_score, c.lexical_score) for c in passed.candidates] == expected


async def test_the_recall_benchmark_reports_what_feedback_adds(built_index, demo_data):
    from twostage.bench.recall import mode_latency

    report = await mode_latency(built_index, list(demo_data["queries"].values())[:3], 10)
    assert set(report["p50_ms"]) == {"dense", "lexical", "hybrid", "hybrid+prf"}
    assert report["prf"] == {"depth": feedback.DEFAULT.depth, "weight": feedback.DEFAULT.weight}
    assert report["prf_step_p50_ms"] > 0 and "prf_added_p50_ms" in report


def test_a_first_rounds_bm25_serves_one_second_round_until_a_write():
    from recall_server.service import KeptMatches

    kept, index = KeptMatches(size=2), object()
    key = kept.key(index, "q", None, 10, "hybrid")
    kept.keep(key, [(1, 2.5)])
    assert kept.take(key) == [(1, 2.5)] and kept.take(key) is None
    kept.keep(key, [(1, 2.5)])
    kept.invalidate()  # a write, or an index switch
    assert kept.take(key) is None and kept.key(index, "q", None, 10, "hybrid") != key
    for query in ("a", "b", "c"):
        kept.keep(kept.key(index, query, None, 10, "hybrid"), [])
    assert kept.take(kept.key(index, "a", None, 10, "hybrid")) is None  # the oldest went first
    assert kept.take(kept.key(index, "c", None, 10, "hybrid")) == []
