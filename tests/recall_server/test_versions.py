"""Versioned writes in the store: the newest version of an id wins whatever the order of arrival, tombstones
keep deletes from coming back, and every row has a sequence of its own so paging never skips one."""

import itertools
import random

import numpy as np

from recall_server.docstore import DocStore, Write
from twostage.corpus import Document
from twostage.versions import BASE, HybridClock, Version


def upsert(doc_id: str, text: str, clock: int, writer: str = "a") -> Write:
    return Write(Document(doc_id, "", text), np.full(4, clock, np.float32), Version(clock, writer))


def delete(doc_id: str, clock: int, writer: str = "a") -> Write:
    return Write(Document(doc_id, "", ""), None, Version(clock, writer))


def paged(store: DocStore, batch_rows: int) -> list[str]:
    """Every id, paged as a replica catching up pages: after the (sequence, key) of the last row received."""
    seen, after = [], (0, 0)
    while page := next(store.writes_since(after[0], batch_rows=batch_rows, after_key=after[1]), []):
        seen += [w.doc.id for w in page]
        after = (page[-1].seq, page[-1].key)
    return seen


def state(store: DocStore) -> dict:
    """id -> (version, deleted, text) of every row."""
    return {w.doc.id: (w.version, w.deleted, w.doc.text) for batch in store.writes_since(0) for w in batch}


def test_the_same_writes_in_any_order_any_number_of_times_leave_the_same_state(tmp_path):
    rng = random.Random(3)
    writes = [upsert(f"d{rng.randrange(6)}", f"t{i}", rng.randrange(1, 9), rng.choice("ab")) for i in range(30)]
    writes += [delete(f"d{rng.randrange(6)}", rng.randrange(1, 9), rng.choice("ab")) for _ in range(10)]
    # The writer breaks ties between equal clocks; equal versions of one id never carry different content.
    writes = list({(w.doc.id, w.version): w for w in writes}.values())
    states = []
    for n in range(6):
        store = DocStore(tmp_path / f"{n}.sqlite")
        order = writes * (1 + n % 2)  # some stores get every write twice
        rng.shuffle(order)
        for write in order:
            store.apply([write])
        states.append(state(store))
        store.close()
    assert all(s == states[0] for s in states)
    newest = {}
    for w in writes:
        if w.doc.id not in newest or w.version > newest[w.doc.id].version:
            newest[w.doc.id] = w
    assert states[0] == {i: (w.version, w.deleted, "" if w.deleted else w.doc.text) for i, w in newest.items()}


def test_an_older_write_never_replaces_a_newer_one_and_a_delete_is_a_versioned_tombstone(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert("x", "v2", 20)])
    assert store.apply([upsert("x", "v1", 10)]).keys == []  # arrives late: ignored
    assert store.get(["x"])["x"].text == "v2"
    # A delete that arrives before the upsert it follows still wins over it.
    store.apply([delete("y", 30)])
    store.apply([upsert("y", "old", 25)])
    assert store.get(["y"]) == {}
    assert store.count() == 1
    store.close()


def test_each_row_has_its_own_sequence_so_a_page_boundary_never_skips_one(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert(f"d{i}", "t", 5) for i in range(1000)])  # one write of 1,000 documents
    assert sorted(paged(store, 512)) == sorted(f"d{i}" for i in range(1000))
    store.close()


def test_a_request_id_is_applied_once_and_answered_alike(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert("x", "t", 5)])
    first = store.apply([delete("x", 6)], "req-1", answer=lambda outcome: outcome.deleted)
    store.apply([upsert("x", "back", 7)])
    again = store.apply([delete("x", 8)], "req-1", answer=lambda outcome: outcome.deleted)
    assert (first.count, again.count, again.replayed, again.version) == (1, 1, True, Version(6, "a"))
    assert store.get(["x"])["x"].text == "back"  # the resend did not delete the newer write
    store.close()


def test_purged_tombstones_keep_deleted_documents_deleted(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert("base", "snapshot", 0, ""), upsert("x", "t", 5)])
    store.apply([delete("base", 10), delete("x", 11)])
    last_seq = store.max_seq()
    assert store.purge(Version(100, ""), requests_older_than_s=0, saved_seq=store.max_seq()) == 2
    assert state(store) == {}
    # A stale copy from a replica that never saw the deletes stays out: absent means deleted at the horizon.
    store.apply([upsert("x", "stale", 5), Write(Document("base", "", "snapshot"), np.zeros(4, np.float32), BASE)])
    assert state(store) == {}
    store.apply([upsert("x", "new", 200)])
    assert store.get(["x"])["x"].text == "new"
    assert store.max_seq() > last_seq  # sequences never go back, though the purged rows took theirs away
    store.close()


def test_digests_are_equal_exactly_when_the_rows_are(tmp_path):
    a, b = DocStore(tmp_path / "a.sqlite"), DocStore(tmp_path / "b.sqlite")
    writes = [upsert(f"d{i}", "t", i + 1) for i in range(300)]
    a.apply(writes)
    b.apply(writes[::-1])
    assert a.digests(BASE) == b.digests(BASE)
    b.apply([upsert("d7", "newer", 1000)])
    differing = {k for k in a.digests(BASE).keys() | b.digests(BASE).keys()
                 if a.digests(BASE).get(k) != b.digests(BASE).get(k)}
    assert len(differing) == 1
    assert {doc_id for doc_id, _, _ in b.versions(sorted(differing))} >= {"d7"}
    a.close()
    b.close()


def test_the_clock_orders_writes_after_any_version_it_has_seen():
    wall = itertools.count(1000)
    clock = HybridClock("g1", wall=lambda: next(wall) / 1000)
    first = clock.now()
    clock.observe(first.clock + (50 << 16))  # another writer, ahead by 50 ms
    assert clock.now() > Version(first.clock + (50 << 16), "zz")
    frozen = HybridClock("g2", wall=lambda: 1.0)
    readings = [frozen.now() for _ in range(5)]
    assert readings == sorted(readings) and len(set(readings)) == 5  # a stopped wall clock still moves it on


def test_a_store_made_before_rows_had_sequences_of_their_own_is_paged_whole(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert(f"d{i}", "t", 5) for i in range(10)])
    store._db.execute("UPDATE docs SET seq = 3")  # as an older store wrote one upsert: one sequence for all
    assert sorted(paged(store, 4)) == sorted(f"d{i}" for i in range(10))
    store.close()


def test_a_write_that_loses_to_a_newer_version_is_reported_superseded(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert("x", "later elsewhere", 50, "b")])
    outcome = store.apply([upsert("x", "earlier", 40), upsert("y", "new", 40)])
    assert (outcome.superseded, outcome.newest) == (1, Version(50, "b"))
    assert store.get(["x"])["x"].text == "later elsewhere"
    store.close()


def test_a_purge_keeps_tombstones_the_saved_graph_has_not_seen(tmp_path):
    store = DocStore(tmp_path / "docs.sqlite")
    store.apply([upsert("x", "t", 5)])
    store.apply([delete("x", 6)])
    assert store.purge(Version(100, ""), requests_older_than_s=0, saved_seq=1) == 0  # the graph saved at seq 1
    assert store.purge(Version(100, ""), requests_older_than_s=0, saved_seq=store.max_seq()) == 1
    store.close()


def test_a_digest_below_a_clock_ignores_newer_rows(tmp_path):
    a, b = DocStore(tmp_path / "a.sqlite"), DocStore(tmp_path / "b.sqlite")
    older = [upsert(f"d{i}", "t", i + 1) for i in range(50)]
    a.apply(older)
    b.apply(older)
    a.apply([upsert("new", "t", 500)])  # written after the point the digest is taken below
    assert a.digests(BASE, below_clock=100) == b.digests(BASE, below_clock=100)
    assert a.digests(BASE) != b.digests(BASE)
    b.apply([delete("d3", 60)])  # a change below the point does show
    assert a.digests(BASE, below_clock=100) != b.digests(BASE, below_clock=100)
    a.close()
    b.close()
