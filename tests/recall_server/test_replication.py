"""The pure parts of replication: which ids a replica pulls from a peer and which it tombstones, the purge
horizon replicas agree on, and the size bound of a Changes reply. (Replicas converging for real:
tests/system/test_peer_sync.py.)"""

import numpy as np

from recall_server import replication
from recall_server.docstore import Write
from recall_server.replication import bounded_page, plan_reconcile, tombstone_horizon
from twostage.corpus import Document
from twostage.versions import Version, clock_at


def test_a_replica_pulls_what_the_peer_holds_newer_and_tombstones_what_the_peer_purged():
    held = {
        "same": (Version(10, "a"), False),
        "older-here": (Version(10, "a"), False),
        "newer-here": (Version(30, "a"), False),
        "purged-there": (Version(5, "a"), False),  # live here, absent there, below the peer's horizon
        "recent-there-absent": (Version(50, "a"), False),  # absent there but newer than its horizon: kept
        "deleted-here": (Version(4, "a"), True),  # already a tombstone: nothing to do
    }
    listed = [("same", Version(10, "a")), ("older-here", Version(20, "b")), ("newer-here", Version(20, "b")),
              ("absent-here-new", Version(40, "b")), ("absent-here-old", Version(2, "b"))]
    plan = plan_reconcile(held, Version(3, ""), listed, peer_horizon=8)
    # An id absent here counts as deleted at this store's purge horizon (3): only a newer copy is pulled.
    assert plan.pull == ["older-here", "absent-here-new"]
    assert plan.purged == ["purged-there"]
    # Without a purge horizon here, whatever the peer holds and this store lacks is pulled.
    assert plan_reconcile({}, None, [("x", Version(1, "b"))], peer_horizon=0).pull == ["x"]


def test_replicas_pick_the_same_purge_horizon_within_a_step():
    ttl_s = 4 * 3600.0  # a step of an hour
    start = 1_700_000_000.0 - 1_700_000_000.0 % 3600
    # Any two moments within the same step give the same horizon, so the digests of replicas agree between purges.
    assert tombstone_horizon(ttl_s, start + 10) == tombstone_horizon(ttl_s, start + 3500)
    assert tombstone_horizon(ttl_s, start + 3600) > tombstone_horizon(ttl_s, start + 3500)
    assert tombstone_horizon(ttl_s, start + 10) == Version(clock_at(start - ttl_s), "")


def test_a_changes_reply_is_cut_at_its_byte_bound_but_never_empty(monkeypatch):
    rows = [Write(Document(f"d{i}", "", "x" * 100), np.zeros(4, np.float32), Version(1, "a")) for i in range(5)]
    assert bounded_page(rows) == (rows, False)
    monkeypatch.setattr(replication, "CHANGES_MAX_BYTES", 1)
    assert bounded_page(rows) == (rows[:1], True)
