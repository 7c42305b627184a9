"""Lexical and hybrid recall over a real index and the real embedding model: BM25 finds an exact rare
term the embedding misses, hybrid keeps what each finds, both indexes follow every write (across kill -9
too: tests/system/test_crash_recovery.py), an index made before the lexical part gains it on open, and
filters apply in every mode."""

import json
import shutil
import sqlite3

import grpc
import pytest

from recall_server.config import RecallSettings
from recall_server.index import DocumentIndex
from recall_server.service import RecallService
from twostage import errors
from twostage.corpus import Document
from twostage.evaluation.metrics import evaluate
from twostage.filters import FilterClause, NumberRange, check_filter
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc

RARE = Document("rare-1", "Harvest notes",
                "Farmers in the valley planted the QZ7731 barley cultivar this spring and reported a good yield.",
                {"year": 2021, "tags": ["farming"]})
QUERY = "QZ7731 gene expression"  # the code is the only thing the farming note shares with the query


@pytest.fixture(scope="module")
async def service(tmp_path_factory, built_index):
    index_dir = tmp_path_factory.mktemp("lexical") / "index"
    shutil.copytree(built_index, index_dir)
    service = RecallService(RecallSettings(port=0, index_dir=index_dir))
    await service.start()
    await service.upsert([RARE])
    yield service
    await service.close()


async def ids(service, query, mode, k=10, filter_=None, **feedback):
    answer = await service.answer(query, k, mode=mode, filter_=filter_, **feedback)
    assert answer.mode == mode
    return [c.document.id for c in answer.candidates]


async def test_lexical_finds_an_exact_rare_term_that_dense_misses(service):
    assert RARE.id not in await ids(service, QUERY, "dense")
    assert (await ids(service, QUERY, "lexical"))[0] == RARE.id
    # Hybrid's first pass keeps it. Pseudo-relevance feedback (on by default) moves the query toward the
    # gene-expression abstracts at the top, away from a farming note that shares only the code: a search for an
    # exact code turns feedback off.
    assert RARE.id in await ids(service, QUERY, "hybrid", prf_depth=0)


async def test_every_mode_reports_both_scores_and_orders_by_its_own(service):
    for mode in ("dense", "lexical", "hybrid"):
        answer = await service.answer(QUERY, 10, mode=mode, prf_depth=0)  # the first pass (see above)
        candidates, timings = answer.candidates, answer.timings
        scores = [c.score for c in candidates]
        assert scores == sorted(scores, reverse=True)
        assert all(-1 <= c.dense_score <= 1 and c.dense_score != 0 for c in candidates)  # the cosine, always
        rare = [c for c in candidates if c.document.id == RARE.id]
        if mode == "dense":
            assert all(c.score == c.dense_score and c.lexical_score == 0 for c in candidates)
        else:
            assert rare and rare[0].lexical_score > 0
            assert "lexical_ms" in timings
        if mode == "lexical":
            assert all(c.score == c.lexical_score for c in candidates)


async def test_hybrid_recalls_at_least_as_well_as_either_list(service, demo_data):
    queries, qrels = demo_data["queries"], demo_data["qrels"]
    by_mode = {}
    for mode in ("dense", "lexical", "hybrid"):
        rankings = {q: await ids(service, text, mode, k=10) for q, text in queries.items()}
        by_mode[mode] = evaluate(rankings, qrels, [10])["recall@10"]
    assert by_mode["hybrid"] >= max(by_mode["dense"], by_mode["lexical"]), by_mode


async def test_a_deleted_document_leaves_both_indexes(service):
    doc = Document("fleeting-1", "", "The ZX99Q reagent stabilised the enzyme during purification.")
    await service.upsert([doc])
    assert doc.id in await ids(service, "ZX99Q reagent", "lexical")
    assert doc.id in await ids(service, doc.text, "dense", k=3)
    await service.upsert([Document(doc.id, "", "An unrelated note about river sediment.")])  # rewritten
    assert doc.id not in await ids(service, "ZX99Q reagent", "lexical")  # the old text is out of BM25
    await service.delete([doc.id])
    for mode in ("dense", "lexical", "hybrid"):
        assert doc.id not in await ids(service, "river sediment note", mode, k=50)


async def test_filters_apply_in_every_mode(service):
    only_2021 = check_filter([FilterClause("year", range=NumberRange(gte=2021, lte=2021))])
    for mode in ("dense", "lexical", "hybrid"):
        assert await ids(service, QUERY, mode, filter_=only_2021) == [RARE.id]
    farming = check_filter([FilterClause("tags", equals="farming")])
    assert await ids(service, "barley", "hybrid", filter_=farming) == [RARE.id]


async def test_a_searchs_deadline_reaches_the_filtered_graph_search(service, monkeypatch):
    """A filtered dense search runs in a thread that cancelling the call cannot stop: it checks the deadline."""
    import time

    seen = []
    nearest = service.index.nearest
    monkeypatch.setattr(service.index, "nearest", lambda *args: seen.append(args[3]) or nearest(*args))
    deadline = time.monotonic() + 60
    farming = check_filter([FilterClause("tags", equals="farming")])
    await service.answer("barley", 3, deadline_s=deadline, mode="dense", filter_=farming)
    assert seen == [deadline]


def test_an_index_made_before_the_lexical_part_gains_it_on_open(index_copy):
    with sqlite3.connect(index_copy / "docs.sqlite") as db:
        db.execute("DROP TABLE docs_fts")
    meta = json.loads((index_copy / "index.json").read_text())
    # Read-only, it cannot build the lexical part, and says how to get it.
    index = DocumentIndex.open(index_copy, meta["model"], meta["dims"], read_only=True)
    with pytest.raises(errors.FailedPrecondition, match="index repair"):
        index.store.lexical_search("cancer", 5)
    index.close()
    index = DocumentIndex.open(index_copy, meta["model"], meta["dims"])
    assert index.store.has_lexical and index.store.lexical_search("cancer", 5)
    index.close()


def test_whether_the_store_has_a_lexical_part_is_known_without_reading_it(index_copy):
    """Info reports it on the event loop: it must never wait for the store's reader (a long search holds it)."""
    import threading

    from recall_server.docstore import DocStore

    with sqlite3.connect(index_copy / "docs.sqlite") as db:
        db.execute("DROP TABLE docs_fts")
    reader = DocStore(index_copy / "docs.sqlite", read_only=True)
    try:
        answers = []
        with reader._read_lock:
            asking = threading.Thread(target=lambda: answers.append(reader.has_lexical), daemon=True)
            asking.start()
            asking.join(timeout=5)
            assert answers == [False]
        # Another process (the writer) builds the lexical part: the reader's searches find it, and say so.
        DocStore(index_copy / "docs.sqlite").close()
        assert reader.lexical_search("cancer", 5) and reader.has_lexical
    finally:
        reader.close()


async def test_a_bad_filter_is_invalid_argument_naming_the_clause(recall_target, channel_to):
    stub = recall_pb2_grpc.RecallStub(channel_to(recall_target))
    bad = common_pb2.Filter(clauses=[common_pb2.FilterClause(key="year", range=common_pb2.NumberRange())])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Search(recall_pb2.RecallSearchRequest(query="cancer", k=5, filter=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter clause 0 (key 'year')" in raised.value.details()
