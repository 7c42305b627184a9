"""The open-loop load tester against real servers on loopback."""

import pytest

from rerank_server.config import RerankSettings
from rerank_server.service import RerankService
from rerank_server.servicer import build_server
from twostage.evaluation.loadtest import run_load, schedule


def test_schedules_are_bounded_and_open_loop():
    constant = schedule(10, 2.0, 1000, poisson=False)
    assert len(constant) == 20 and constant[0] == 0.1
    assert len(schedule(10, 2.0, 5, poisson=False)) == 5
    poisson = schedule(10, 100.0, 100_000, poisson=True)
    assert 800 < len(poisson) < 1200  # mean rate holds


async def test_fixed_rate_against_recall(recall_target):
    result = await run_load(recall_target, "recall", ["vitamin b12", "statins"], 20, 1.5, 1000, recall_k=5,
                            progress=False)
    report = result.report()
    assert report["ok"] == report["requests"] == 30 and report["errors"] == {}
    assert report["sent_rps"] == 20  # what was sent over the schedule's window, not the run's whole length
    assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]


@pytest.mark.slow
async def test_schedule_is_kept_when_the_server_is_slow(slow_reranker):
    """Each batch takes 0.3 s; requests still leave on time and queueing shows in latency."""
    settings = RerankSettings(port=0, score_cache_mb=0, max_batch_size=1, pipeline_depth=1)
    server = build_server(RerankService(settings, model=slow_reranker(settings, delay_s=0.3)))
    target = f"127.0.0.1:{await server.start()}"
    try:
        result = await run_load(target, "rerank", ["query"], 10, 1.0, 100, documents=["a document"], progress=False)
    finally:
        await server.stop(grace_s=0)
    assert len(result.send_offsets_s) == 10
    assert max(result.send_offsets_s) < 0.25  # sent on schedule, not after earlier replies
    assert max(result.latencies_ms) > 1000  # the tenth waited behind nine slow batches


async def test_errors_are_counted_by_status():
    result = await run_load("127.0.0.1:1", "gateway", ["q"], 20, 0.5, 100, timeout_s=2, progress=False)
    assert result.report()["errors"] == {"UNAVAILABLE": 10} and result.report()["ok"] == 0


async def test_defaults_leave_top_k_to_the_server(gateway_target):
    """--recall-k alone must work: top_k falls back to the server's default, bounded by recall_k."""
    result = await run_load(gateway_target, "gateway", ["vitamin b12"], 4, 0.5, 2, recall_k=5, budget_ms=100,
                            progress=False)
    assert result.report()["errors"] == {} and result.report()["ok"] == 2


async def test_degraded_answers_are_not_a_sustained_rate(recall_target, tmp_path):
    from gateway.config import GatewaySettings
    from gateway.servicer import build_server as build_gateway
    from twostage.evaluation.loadtest import find_max_rate
    from twostage.evaluation.plots import plot_steps

    gateway = build_gateway(GatewaySettings(port=0, recall_targets=recall_target, rerank_targets="127.0.0.1:1",
                                            startup_wait_s=0))
    target = f"127.0.0.1:{await gateway.start()}"
    try:
        report = await find_max_rate(target, "gateway", ["statins"], [2.0], 1.0, 10_000, recall_k=5, progress=False)
    finally:
        await gateway.stop(grace_s=0)
    assert report["steps"][0]["degraded"] == {"rerank_unavailable": 2} and report["steps"][0]["errors"] == {}
    assert report["max_sustainable_rps"] is None
    plot_steps(report["steps"], 10_000, tmp_path / "steps.png", "steps")
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"


def test_a_load_test_whose_requests_all_fail_exits_non_zero(capsys):
    from twostage.cli import main

    code = main(["loadtest", "--target", "127.0.0.1:1", "--rate-rps", "10", "--duration-s", "0.3", "--timeout-s", "2"])
    assert code == 1
    assert "every request failed (UNAVAILABLE:" in capsys.readouterr().err


def test_a_zipf_stream_repeats_the_head_as_s_grows():
    from twostage.evaluation.loadtest import zipf_stream

    queries = [f"q{i}" for i in range(200)]
    uniform, skewed = zipf_stream(queries, 2000, 0.0, seed=1), zipf_stream(queries, 2000, 1.2, seed=1)
    head = {q: skewed.count(q) for q in queries[:3]}
    assert skewed.count("q0") > skewed.count("q1") > skewed.count("q9") > 0  # popularity follows the rank
    assert len(set(skewed)) < len(set(uniform))  # more repetition, fewer distinct queries
    assert max(uniform.count(q) for q in queries) < min(head.values())
    assert zipf_stream(queries, 50, 1.0, seed=3) == zipf_stream(queries, 50, 1.0, seed=3)  # reproducible


async def test_score_cache_hits_are_reported_beside_latency(gateway_target):
    """The same query again is answered from the rerank replica's pair-score cache; the report says so."""
    query = "loadtest score cache: homocysteine and vitamin B12"  # not asked by any other test
    result = await run_load(gateway_target, "gateway", [query], 4, 1.0, 3, recall_k=5, top_k=5, budget_ms=60_000,
                            timeout_s=60, progress=False)
    report = result.report()
    assert report["ok"] == 3 and report["mean_reranked"] == 5
    # Requests leave every 250 ms: at least the last one finds the first one's five pairs scored.
    assert 5 <= report["score_cache_hits"] <= 10 and report["score_cache_hit_rate"] == round(report["score_cache_hits"] / 15, 4)
