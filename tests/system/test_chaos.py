"""The fault campaign: its checker on made-up histories and states, and the quick campaign end to end."""

import json

import pytest

from twostage.bench.chaos import FAULTS, Op, SearchRecord, Window, check, pinned_writes, search_stats
from twostage.sharding import shard_of

# Ids on each of the two shards.
A, B = next(f"doc-{i}" for i in range(100) if shard_of(f"doc-{i}", 2) == 0), next(
    f"doc-{i}" for i in range(100) if shard_of(f"doc-{i}", 2) == 1)


def upsert(doc_id, text, version, start, end, outcome="ok", request_id=None):
    return Op("upsert", [doc_id], request_id or f"u-{doc_id}-{version}", 0, start, {doc_id: text}, end, outcome,
              (version, "g0") if outcome == "ok" else None)


def delete(doc_id, version, start, end, outcome="ok"):
    return Op("delete", [doc_id], f"d-{doc_id}-{version}", 0, start, {}, end, outcome,
              (version, "g0") if outcome == "ok" else None)


def states_of(shard0: dict, shard1: dict | None = None, replicas=("a", "b", "c")):
    """The same rows on every replica of each shard."""
    return {0: {r: dict(shard0) for r in replicas}, 1: {r: dict(shard1 or {}) for r in replicas}}


def texts_of(shard0: dict, shard1: dict | None = None, replicas=("a", "b", "c")):
    return {0: {r: dict(shard0) for r in replicas}, 1: {r: dict(shard1 or {}) for r in replicas}}


def test_a_history_the_replicas_hold_passes():
    history = [upsert(A, "one", 10, 0, 1), upsert(A, "two", 20, 2, 3), delete(B, 30, 4, 5)]
    verdict = check(history, states_of({A: ((20, "g0"), False)}, {B: ((30, "g0"), True)}), texts_of({A: "two"}))
    assert verdict["lost"] == verdict["divergent"] == verdict["misplaced"] == verdict["resurrected"] == 0
    assert verdict["acknowledged"] == 3 and verdict["pinned_ids"] == 2


def test_a_missing_or_older_acknowledged_write_is_lost():
    history = [upsert(A, "one", 10, 0, 1), upsert(A, "two", 20, 2, 3)]
    states = states_of({A: ((20, "g0"), False)})
    states[0]["b"][A] = ((10, "g0"), False)
    del states[0]["c"][A]
    verdict = check(history, states, texts_of({A: "two"}))
    assert verdict["lost"] == 3  # b: the second write; c: both
    assert verdict["divergent"] == 1


def test_the_newest_write_must_be_held_with_its_text():
    history = [upsert(A, "right", 10, 0, 1)]
    verdict = check(history, states_of({A: ((10, "g0"), False)}), texts_of({A: "wrong"}))
    assert verdict["lost"] == 3 and "text 'wrong'" in verdict["lost_examples"][0]


def test_a_newer_version_needs_an_indeterminate_write_to_explain_it():
    acked = upsert(A, "one", 10, 0, 1)
    states = states_of({A: ((99, "g1"), False)})
    assert check([acked], states, texts_of({A: "other"}))["lost"] == 3
    # A write that timed out while (or after) the acknowledged one was in flight may be the newer one.
    overlapping = upsert(A, "other", 0, 0.5, 3, outcome="info")
    assert pinned_writes([acked, overlapping]) == {}
    assert check([acked, overlapping], states, texts_of({A: "other"}))["lost"] == 0
    # One that gave up before the acknowledged write began cannot be newer.
    earlier = upsert(A, "other", 0, -3, -1, outcome="info")
    assert check([earlier, acked], states, texts_of({A: "other"}))["lost"] == 3


def test_concurrent_writes_of_one_id_are_ordered_by_version_then_writer():
    first = Op("upsert", [A], "x", 0, 0, {A: "from g0"}, 1, "ok", (50, "g0"))
    second = Op("upsert", [A], "y", 1, 0, {A: "from g1"}, 1, "ok", (50, "g1"))
    verdict = check([first, second], states_of({A: ((50, "g1"), False)}), texts_of({A: "from g1"}))
    assert verdict["lost"] == 0
    verdict = check([first, second], states_of({A: ((50, "g0"), False)}), texts_of({A: "from g0"}))
    assert verdict["lost"] == 3  # the newer write, at an older version on each replica


def test_a_deleted_id_live_again_is_resurrected_unless_an_indeterminate_write_touched_it():
    history = [upsert(A, "one", 10, 0, 1), delete(A, 20, 2, 3)]
    live = states_of({A: ((20, "g0"), False)})
    verdict = check(history, live, texts_of({A: "one"}))
    assert verdict["resurrected"] == 1 and verdict["lost"] == 3
    assert check(history, states_of({A: ((20, "g0"), True)}), texts_of({}))["resurrected"] == 0
    touched = [*history, upsert(A, "maybe", 0, 10, 11, outcome="fail")]
    assert check(touched, states_of({A: ((30, "g1"), False)}), texts_of({A: "maybe"}))["resurrected"] == 0


def test_divergent_and_misplaced_documents_are_counted():
    states = states_of({A: ((0, ""), False)}, {B: ((0, ""), False)})
    states[0]["c"][A] = ((5, "g0"), True)  # replicas of shard 0 disagree
    states[0]["a"][B] = ((0, ""), False)  # B is live on shard 0, which does not own it
    states[1]["b"][A] = ((0, ""), True)  # a tombstone in the wrong shard is not a live document
    verdict = check([], states, texts_of({}))
    assert verdict["divergent"] == 3  # A and B on shard 0, A on shard 1
    assert verdict["misplaced"] == 1 and verdict["misplaced_examples"] == [B]


def test_searches_are_attributed_to_the_fault_active_when_they_started():
    windows = [Window("kill", "r0a", 10, 20), Window("pause", "r1a", 30, 40)]
    searches = [SearchRecord(5, 0.01, False, 0), SearchRecord(12, 0.5, True, 0), SearchRecord(19.9, 0.1, False, 1),
                SearchRecord(35, 0.2, False, 1)]
    stats = search_stats(searches, windows)
    assert stats["kill"]["searches"] == 2 and stats["kill"]["search_failed_share"] == 0.5
    assert stats["kill"]["rounds"] == 1 and stats["pause"]["search_p99_ms"] == 200.0
    assert stats["none"]["searches"] == 1 and stats["partition"]["rounds"] == 0
    assert set(FAULTS) < set(stats)


def test_without_root_the_campaign_fails_saying_why(monkeypatch):
    import asyncio

    from twostage.bench import hosts

    monkeypatch.setattr(hosts.os, "geteuid", lambda: 1000)
    with pytest.raises(hosts.HostsError, match="need root"):
        asyncio.run(hosts.Network().create())


def _leftovers() -> list[str]:
    import subprocess
    import tempfile
    from pathlib import Path

    namespaces = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True, text=True).stdout
    return ([n for n in namespaces if n.startswith("ts-")] + [w for w in links.split() if w.startswith("ts-")]
            + [p.name for p in Path(tempfile.gettempdir()).glob("ts-*")])


@pytest.mark.slow
def test_quick_campaign_loses_no_acknowledged_write(tmp_path, capsys):
    """Ten hosts in network namespaces, every fault type while writes and searches go on. Needs root and
    iproute2: without them the campaign fails, saying why."""
    from twostage.cli import main

    out = tmp_path / "chaos.json"
    code = main(["bench", "chaos", "--quick", "--json", str(out)])
    assert _leftovers() == []
    assert out.exists(), capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["acknowledged"] > 0
    assert report["bulk"]["outcome"] == "ok" and report["bulk"]["documents"] == 1000
    assert report["lost"] == 0, report["lost_examples"]
    assert report["resurrected"] == 0, report["resurrected_examples"]
    assert report["divergent"] == 0, report["divergent_examples"]
    assert report["misplaced"] == 0, report["misplaced_examples"]
    assert report["converge_s"] is not None and not report["read_errors"], report["read_errors"]
    assert all(report["faults"][fault]["rounds"] >= 1 for fault in FAULTS)
    assert code == 0
