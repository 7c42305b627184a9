"""Benchmarks as runnable checks: `pytest -m perf` (they take minutes; never in `make test`)."""

import json

import pytest

from twostage.cli import main


@pytest.mark.perf
def test_quick_rerank_benchmark_reports_ratios(tmp_path, models):
    out = tmp_path / "rerank.json"
    assert main(["bench", "rerank", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ceiling"] > 0 and report["server"] > 0
    assert 0 < report["ratio"] < 3
    assert {"sentence-transformers", "infinity"} <= set(report["peers"])
    assert report["errors"] == {}


@pytest.mark.perf
def test_quick_gateway_benchmark_reports_the_overload_keys(tmp_path, models):
    out = tmp_path / "gateway.json"
    assert main(["bench", "gateway", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    overload = report["overload"]
    assert 0 < overload["rerank_utilization"] <= 1.05
    assert 0 < overload["fair_share_pairs"] <= overload["recall_k"]
    assert 0 <= overload["mean_reranked"] <= overload["recall_k"] and 0 < overload["budget_used_mean"] < 1.1
    assert overload["errors"] == {}
    # The hops, each and together, and what TLS and tokens add: per repeat and their median.
    hops = report["overhead"]
    assert set(hops["hop_p50_ms"]) == {"recall", "rerank"} and hops["downstream_hops_p50_ms"] > 0
    assert len(hops["repeats"]) == 2 and all(r["downstream_hops_p50_ms"] > 0 for r in hops["repeats"])
    # The floor under them: a bare echo of the same sizes between two processes, each shape timed.
    for shape in ("candidates_4", "candidates_20"):
        floor = hops["floor"][shape]
        assert set(floor["p50_ms"]) == {"recall", "rerank"} and all(v > 0 for v in floor["p50_ms"].values())
        assert floor["bytes"]["recall"]["reply"] == floor["bytes"]["rerank"]["request"] > 1000 * floor["candidates"]
    security = report["security"]
    assert len(security["added_client_p50_ms_each"]) == 2
    assert min(security["added_client_p50_ms_each"]) <= security["added_client_p50_ms"] \
        <= max(security["added_client_p50_ms_each"])
    # Tracing's cost in CPU too: each stack's three processes, per search, and each setting's against off.
    traced = report["tracing"]
    assert traced["off"]["cpu_ms_per_search"] > 0 and len(traced["sampled_0.01"]["cpu_added_ms_each"]) == 2
    # The untraced control's difference from off is the run's resolution, and says whether it can judge the targets.
    assert traced["resolution"]["p50_ms"] >= abs(traced["off_again"]["p50_added_ms"])
    assert all(set(traced[name]["cpu_ms_by_tier"]) == {"gateway", "recall", "rerank"}
               for name in ("off", "sampled_1.0", "sampled_0.01", "off_again"))
    assert traced["resolves_targets"] == (traced["resolution"]["p50_ms"] <= 0.1
                                          and traced["resolution"]["throughput"] <= 0.01)


@pytest.mark.perf
def test_quick_http_benchmark_compares_the_faces(tmp_path, models):
    out = tmp_path / "http.json"
    assert main(["bench", "http", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for call in ("search", "rerank_20"):
        row = report["faces"][call]
        assert row["grpc_p50_ms"] > 0 and row["http_p50_ms"] > 0 and row["http_rps_ratio"] > 0
    assert set(report["frameworks"]) == {"fastapi_uvicorn", "aiohttp"}


@pytest.mark.gpu
def test_rerank_runs_on_cuda(models):
    from rerank_server.cross_encoder import CrossEncoder
    from twostage.config import RuntimeSettings

    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(provider="cuda"), 256)
    assert model.plan.provider == "CUDAExecutionProvider"
    assert model.plan.name == "rows" and model.plan.source == "unmeasured"  # auto: the rewrite, batched, on a GPU
    scores = model.score(model.encode("smoking and cancer", ["smoking causes lung cancer", "the sky is blue"])[0])
    assert scores[0] > scores[1]


@pytest.mark.perf
def test_trace_path_reports_each_sampling_setting_against_off():
    from twostage.bench import trace_path

    report = trace_path.run(requests=20, repeats=2)
    assert set(trace_path.SETTINGS) <= set(report)
    assert all(report[name]["cpu_us"] > 0 for name in trace_path.SETTINGS)
    assert report["off"]["cpu_added_us"] == 0 and report["spans_received"] > 0


@pytest.mark.perf
async def test_trace_path_compares_the_unsampled_path_with_off_in_one_process():
    from twostage import tracing
    from twostage.bench import trace_path

    report = await trace_path._same_process(requests=20, repeats=2)
    assert report["off"]["cpu_us"] > 0 and report["drop"]["cpu_us"] > 0
    assert "cpu_added_us" in report["drop"] and not tracing.enabled  # set-up undone


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_the_tracing_stacks_take_turns_that_follow_each_other_equally_often(count):
    """Run over and over, as the benchmark runs it, each stack comes straight after each other one equally
    often (the step from one cycle into the next included) and never after itself."""
    from collections import Counter
    from itertools import pairwise

    from twostage.bench.gateway import turn_cycle

    names = [f"stack{i}" for i in range(count)]
    cycle = turn_cycle(names)
    assert Counter(cycle) == dict.fromkeys(names, count - 1)
    run = cycle * 3
    follows = Counter(pairwise(run))
    assert all(a != b for a, b in follows)
    assert len(follows) == count * (count - 1)
    assert set(follows.values()) <= {2, 3} and sum(v == 2 for v in follows.values()) == 1  # the last step is cut


@pytest.mark.parametrize("count", [2, 4, 6])
def test_every_measured_turn_of_a_repeat_follows_each_other_stack_equally_often(count):
    """The schedule a repeat runs: each measured turn (all but the lead-in) comes straight after another stack,
    every ordered pair equally often, in the requests and in the throughput slices alike; each stack gets at
    least the requests asked for; the order is drawn from the seed."""
    from collections import Counter
    from itertools import pairwise

    from twostage.bench.gateway import tracing_turns

    names = [f"stack{i}" for i in range(count)]
    for requests in (1, 7, 500):
        for turns in tracing_turns(names, "3", requests):
            follows = Counter(pairwise(turns))
            assert all(a != b for a, b in follows)
            assert len(follows) == count * (count - 1) and len(set(follows.values())) == 1
        requested, slices = tracing_turns(names, "3", requests)
        assert min(Counter(requested[1:]).values()) >= requests
        assert Counter(slices[1:]) == dict.fromkeys(names, count - 1)
    assert tracing_turns(names, "3", 10) == tracing_turns(names, "3", 10)
    if count > 2:
        assert len({tuple(tracing_turns(names, str(seed), 10)[1]) for seed in range(8)}) > 1
