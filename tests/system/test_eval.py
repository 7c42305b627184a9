"""twostage eval end to end on a slice of the demo data, through the real stack."""

import json

import pytest

from twostage.cli import main
from twostage.evaluation.eval_run import recall_k_advice


def beir_slice(tmp_path, demo_data):
    (tmp_path / "qrels").mkdir(parents=True)
    with open(tmp_path / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": query_id, "text": text}) + "\n" for query_id, text in demo_data["queries"].items())
    with open(tmp_path / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for query_id, judged in demo_data["qrels"].items():
            f.writelines(f"{query_id}\t{doc_id}\t{grade}\n" for doc_id, grade in judged.items())
    return tmp_path


async def test_eval_reports_every_ranking(tmp_path, demo_data, gateway_target, recall_target):
    import asyncio

    dataset = beir_slice(tmp_path / "data", demo_data)
    out = tmp_path / "report.json"
    plot = tmp_path / "sweep.png"
    code = await asyncio.to_thread(main, [
        "eval", "--dataset", str(dataset), "--target", gateway_target, "--recall-target", recall_target,
        "--recall-k", "10", "--sweep", "alpha=0,0.7,1", "--sweep", "recall_k=5", "--json", str(out),
        "--plot", str(plot),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["queries"] == len(demo_data["queries"])
    for ranking in ("recall", "rerank", "final"):
        assert {"ndcg@10", "mrr@10", "recall@10", "recall@100"} <= set(report[ranking])
    # Rerank reorders the same candidates: what is found within recall_k cannot change.
    assert report["rerank"]["recall@10"] == report["recall"]["recall@10"]
    assert report["final"]["ndcg@10"] > 0.3
    assert sum(report["promotion_depth"].values()) == 10 * report["queries"]
    assert set(report["sweep_alpha"]) == {"0.0", "0.7", "1.0"}
    assert report["sweep_recall_k"]["5"]["recall@k"] <= report["recall"]["recall@10"]
    assert 0 <= report["beyond_recall_k"] <= 1 and "recall_k=10" in report["advice"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # The same answers fused again with the fitted constants rank exactly as the gateway did, so the
    # comparison with the built-in constants is on identical candidates and rerank scores.
    in_use, built_in = report["calibration"]["in_use"], report["calibration"]["built_in"]
    assert in_use["final_ndcg@10"] == report["final"]["ndcg@10"]
    assert in_use["center"] != built_in["center"] and 0 < built_in["final_ndcg@10"] <= 1


def test_recall_k_advice_in_plain_words():
    positions = {"q1": {"a": 3, "b": 150}, "q2": {"c": None}, "q3": {"d": 40}}
    share, advice = recall_k_advice(positions, recall_k=100, depth=1000)
    assert share == 0.5 and "too small" in advice and "50.0%" in advice
    share, advice = recall_k_advice({"q": {"a": 1}}, recall_k=100, depth=1000)
    assert share == 0 and "large enough" in advice


def test_advice_counts_documents_missing_from_the_index_apart():
    """A relevant document that is not indexed is no reason to raise recall_k, and the advice must not
    contradict itself (too small, yet a smaller recall_k would do)."""
    positions = {"q1": {"a": 3, "b": None}, "q2": {"c": 5, "d": 12}}
    share, advice = recall_k_advice(positions, recall_k=20, depth=1000, not_indexed={"b"})
    assert share == 0.0
    assert "looks large enough" in advice and "1 judged relevant documents are not in the index" in advice
    share, advice = recall_k_advice(positions, recall_k=10, depth=1000, not_indexed={"b"})
    assert "looks too small" in advice and "recall_k=12 would cover 98%" in advice
    share, advice = recall_k_advice({"q": {"a": 3, "b": None}}, recall_k=10, depth=1000)
    assert share == 0.5 and "even recall_k=1000 covers less than 98%" in advice


async def test_eval_prints_only_what_applies(tmp_path, demo_data, gateway_target, capsys):
    import asyncio

    dataset = beir_slice(tmp_path / "data", demo_data)
    code = await asyncio.to_thread(main, [
        "eval", "--dataset", str(dataset), "--target", gateway_target, "--recall-k", "5", "--stages", "recall",
        "--sweep", "recall_mode=dense,lexical", "--limit", "3"])
    out = capsys.readouterr().out
    assert code in (0, None)
    table = out[out.index("queries, recall_k=5"):]
    assert "  recall " in table and "  rerank " not in table and "  final " not in table  # no rerank: one row
    assert "recall@5" in table and "recall@10" not in table.split("\n")[1]  # 5 candidates cannot reach @10
    assert "server default" not in table and "(the modes compared, dense, lexical, are below)" in table

    code = await asyncio.to_thread(main, ["eval", "--dataset", str(dataset), "--target", gateway_target,
                                          "--recall-k", "20", "--limit", "3"])
    out = capsys.readouterr().out
    assert "final top-10 by recall position:" in out and "{" not in out
    lines = out.splitlines()
    spans = lines[lines.index("  final top-10 by recall position:") + 1].split()
    counts = lines[lines.index("  final top-10 by recall position:") + 2].split()
    assert spans == ["1-10", "11-20"] and sum(map(int, counts)) == 30


def test_eval_builds_its_index_where_told(tmp_path, models):
    from recall_server.build import cached_index
    from recall_server.index import IndexManifest

    dataset = tmp_path / "tiny"
    dataset.mkdir()
    (dataset / "corpus.jsonl").write_text('{"_id": "a", "text": "Tents keep campers dry."}\n'
                                          '{"_id": "b", "text": "Lamps light desks."}\n')
    out = tmp_path / "eval-index"
    assert cached_index(dataset, out) == out and IndexManifest.read(out).dims > 0
    built = (out / "index.json").stat().st_mtime_ns
    assert cached_index(dataset, out) == out and (out / "index.json").stat().st_mtime_ns == built  # reused


def test_a_tuned_setting_is_judged_held_out_and_refused_when_it_loses_there(tmp_path):
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings
    from twostage.config import read_settings_file
    from twostage.evaluation.tuning import Combination, cross_validate, write_if_better

    queries = [f"q{i}" for i in range(10)]
    default, lucky, better = Combination(), Combination(alpha=0.3), Combination(alpha=0.6, prf_depth=3)
    # lucky wins in sample on one query's strength alone; held out, that query is never among its training folds.
    scores = {default: dict.fromkeys(queries, 0.5), lucky: {q: 1.0 if q == "q3" else 0.45 for q in queries}}
    judged = cross_validate(scores, default, folds=10)
    assert judged["best"] == lucky and judged["in_sample"] > judged["default"] > judged["held_out"]
    report = {"names": ["alpha"], "folds": 10, "queries": 10, "default_ndcg@10": 0.5, "best": {"alpha": 0.3},
              "in_sample_ndcg@10": round(judged["in_sample"], 4), "in_sample_gain": 0.005,
              "held_out_ndcg@10": round(judged["held_out"], 4), "held_out_gain": round(judged["held_out"] - 0.5, 4)}
    out = tmp_path / "tuned.env"
    assert write_if_better(report, out, "scifact", "test", 20).startswith(
        "not written: the tuned settings do not beat the defaults held out (held-out gain -0.0450")
    assert not out.exists()

    scores[better] = dict.fromkeys(queries, 0.6)
    judged = cross_validate(scores, default, folds=5)
    assert judged["best"] == better and judged["chosen_per_fold"] == [better] * 5
    assert judged["held_out"] == pytest.approx(0.6)
    report.update({"names": ["alpha", "prf_depth"], "best": {"alpha": 0.6, "prf_depth": 3}, "held_out_gain": 0.1})
    outcome = write_if_better(report, out, "scifact", "test", 20)
    assert outcome == f"written to {out} (serve it with --settings-file {out})"
    assert read_settings_file(out, GatewaySettings) == {"fusion_alpha": "0.6"}
    assert read_settings_file(out, RecallSettings) == {"prf_depth": "3"}


async def test_eval_sweeps_and_tunes_feedback_through_the_gateway(tmp_path, demo_data, gateway_target, recall_target):
    import asyncio

    dataset = beir_slice(tmp_path / "data", demo_data)
    out, tuned = tmp_path / "report.json", tmp_path / "tuned.env"
    code = await asyncio.to_thread(main, [
        "eval", "--dataset", str(dataset), "--target", gateway_target, "--recall-target", recall_target,
        "--recall-k", "8", "--limit", "4", "--sweep", "prf_depth=0,3", "--tune", "alpha,prf_depth",
        "--tune-grid", "alpha=0.5,0.8", "--tune-grid", "prf_depth=0,2", "--folds", "2", "--tune-out", str(tuned),
        "--json", str(out)])
    assert code in (0, None)
    report = json.loads(out.read_text())
    assert set(report["sweep_prf_depth"]) == {"0", "3"}
    assert report["sweep_prf_depth"]["0"]["prf_p50_ms"] is None and report["sweep_prf_depth"]["3"]["prf_p50_ms"] > 0
    assert report["prf"]["answers"] == report["queries"]  # hybrid recall runs feedback by default
    tune = report["tune"]
    # The defaults, and prf_depth 0 and 2 each at two alphas.
    assert len(tune["combinations"]) == 5 and tune["folds"] == 2 and len(tune["chosen_per_fold"]) == 2
    assert tune["in_sample_gain"] >= 0 and tune["in_sample_ndcg@10"] >= tune["held_out_ndcg@10"] - 1e-9
    assert tune["outcome"].startswith("written" if tune["held_out_gain"] > 0 and tune["best"] else "not written")
    assert tuned.exists() == tune["outcome"].startswith("written")


def test_a_tuned_combination_that_turns_feedback_off_is_written_and_printed(tmp_path, capsys):
    """prf_depth 0 leaves prf_weight unset (any weight is the same search): the best such combination is written
    without it, and the report prints."""
    from recall_server.config import RecallSettings
    from twostage.cli.evaluate import print_tuning
    from twostage.config import read_settings_file
    from twostage.evaluation.tuning import Combination, judge, write_if_better

    queries = [f"q{i}" for i in range(6)]
    grids = {"alpha": [0.4], "prf_depth": [0, 3], "prf_weight": [0.5]}
    off = Combination(alpha=0.4, prf_depth=0)
    scores = {Combination(): dict.fromkeys(queries, 0.5), off: dict.fromkeys(queries, 0.7),
              Combination(alpha=0.4, prf_depth=3, prf_weight=0.5): dict.fromkeys(queries, 0.6)}
    report = judge(scores, Combination(), grids, folds=3)
    assert report["best"] == {"alpha": 0.4, "prf_depth": 0} and report["held_out_gain"] == pytest.approx(0.2)
    out = tmp_path / "tuned.env"
    report["outcome"] = write_if_better(report, out, "scifact", "test", 20)
    assert report["outcome"].startswith("written") and read_settings_file(out, RecallSettings) == {"prf_depth": "0"}
    print_tuning(report)
    assert "best in sample (alpha=0.4, prf_depth=0) 0.7000 (+0.2000)" in capsys.readouterr().out


def test_tuning_needs_queries_to_hold_out_and_at_least_two_folds(capsys):
    from twostage.evaluation.tuning import Combination, cross_validate

    with pytest.raises(ValueError, match="--tune needs at least 2 queries with relevant documents"):
        cross_validate({Combination(): {"q1": 0.5}, Combination(alpha=0.3): {"q1": 0.6}}, Combination(), 5)
    with pytest.raises(SystemExit):
        main(["eval", "--tune", "alpha", "--folds", "1"])
    assert "--folds: must be at least 2, got 1" in capsys.readouterr().err


def with_corpus(dataset, demo_data, docs: int, empty: int):
    """The slice's queries over a corpus of its first ``docs`` documents plus ``empty`` empty ones."""
    rows = [{"_id": d.id, "title": d.title, "text": d.text} for d in list(demo_data["docs"].values())[:docs]]
    rows += [{"_id": f"empty-{i}", "title": "", "text": ""} for i in range(empty)]
    (dataset / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return dataset


def test_eval_on_a_corpus_with_empty_documents_names_the_flag_that_skips_them(tmp_path, demo_data, capsys):
    dataset = with_corpus(beir_slice(tmp_path / "data", demo_data), demo_data, 3, 2)
    code = main(["eval", "--dataset", str(dataset), "--index-dir", str(tmp_path / "index"), "--port", "1"])
    error = capsys.readouterr().err
    assert code == 2 and "2 invalid lines" in error and "pass --skip-invalid" in error
    assert not (tmp_path / "index").exists()


def children_of(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_to_eval_stops_its_stack_and_frees_its_ports(tmp_path, demo_data, models):
    """eval builds its index around the empty documents (--skip-invalid), starts its three servers, and is
    stopped mid-run: it exits only after they have, leaving no process and no port behind."""
    import contextlib
    import os
    import signal
    import socket
    import subprocess
    import sys

    from tests.system.test_cli import free_port_run, wait_for_line

    dataset = with_corpus(beir_slice(tmp_path / "data", demo_data), demo_data, 40, 2)
    port = free_port_run(3)
    run = subprocess.Popen(
        [sys.executable, "-m", "twostage", "eval", "--dataset", str(dataset), "--skip-invalid", "--port", str(port),
         "--index-dir", str(tmp_path / "index"), "--recall-k", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    servers = []
    try:
        wait_for_line(run, "gateway serving on port")  # the last tier up: queries begin
        servers = children_of(run.pid)
        assert len(servers) == 3
        run.send_signal(signal.SIGTERM)
        # 143: eval stopped its servers and exited on its own; -15 would be eval killed alone.
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        for pid in servers:
            assert not os.path.exists(f"/proc/{pid}"), pid
        for taken in range(port, port + 3):
            socket.create_server(("127.0.0.1", taken)).close()  # free again
        _, err = run.communicate(timeout=10)
        assert "SIGTERM: stopping the local stack" in err and "2 invalid lines" in err
    finally:
        for pid in [*servers, run.pid]:  # nothing left behind, even when this fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
