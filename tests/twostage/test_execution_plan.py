"""Execution plans on the real int8 default models: every plan a server can choose gives an item the same
result, bit for bit, alone and in any batch; auto chooses by measuring and keeps the choice per model and host."""

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from recall_server.embedder import Embedder
from rerank_server.cross_encoder import CrossEncoder
from twostage import execution_plan
from twostage.batching import BatchPolicy
from twostage.config import RuntimeSettings
from twostage.corpus import DEMO_CORPUS, document_text, read_corpus
from twostage.errors import ConfigError

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."
# Two sessions side by side even on a one-core host; a cap of 3 puts items of different lengths together.
# The rewrite's two caps run with the slow tests; the plans servers default to run in the fast ones too.
PLANS = [("single", None), ("sessions", None), pytest.param("rows", 3, marks=pytest.mark.slow),
         pytest.param("rows", None, marks=pytest.mark.slow)]


def documents(n: int) -> list[str]:
    texts = [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), n - 2)]
    return [*texts, "vitamin B12", "homocysteine " * 3]  # short ones, so batches pad


def batchings(n: int) -> list[list[int]]:
    """Orders and company an item may get: all together, reversed, interleaved, pairs, a lone long and short."""
    rng = np.random.default_rng(7)
    return [list(range(n)), [int(i) for i in rng.permutation(n)], [0, n - 1], [n - 1, 0, 1]]


def use_plan(model, name: str, cap: int | None) -> None:
    settings = RuntimeSettings(intra_op_threads=2, execution_plan=name)
    replaced, model.plan = model.plan, execution_plan.build(name, model.model_file, settings, cap)
    replaced.close()


@pytest.fixture(scope="module")
def reranker(models):
    return CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="single"), 256)


@pytest.fixture(scope="module")
def embedder(models):
    return Embedder(models["bge-small-en"], RuntimeSettings(execution_plan="single"), 256)


@pytest.mark.parametrize(("name", "cap"), PLANS)
def test_a_pairs_score_is_the_same_alone_and_in_any_batch(reranker, name, cap):
    use_plan(reranker, name, cap)
    pairs, _ = reranker.encode(QUERY, documents(6))
    assert len({p.length for p in pairs}) >= 3
    alone = np.array([reranker.score([p])[0] for p in pairs])
    for order in batchings(len(pairs)):
        np.testing.assert_array_equal(reranker.score([pairs[i] for i in order]), alone[order])


@pytest.mark.parametrize(("name", "cap"), PLANS)
def test_a_texts_vector_is_the_same_alone_and_in_any_batch(embedder, name, cap):
    use_plan(embedder, name, cap)
    encoded = embedder.encode(documents(6), is_query=False)
    assert len({e.length for e in encoded}) >= 3
    alone = np.concatenate([embedder.embed([e]) for e in encoded])
    for order in batchings(len(encoded)):
        np.testing.assert_array_equal(embedder.embed([encoded[i] for i in order]), alone[order])


def test_the_stock_graph_in_batches_is_not_batch_invariant(reranker):
    """What the plans avoid, so the tests above can fail: batched, a pair's score moves with its batch-mates."""
    reranker.plan = execution_plan.build("batched", reranker.model_file, RuntimeSettings(batch_invariant=False))
    pairs, _ = reranker.encode(QUERY, documents(6))
    alone = np.array([reranker.score([p])[0] for p in pairs])
    assert not np.array_equal(reranker.score(pairs), alone)


def test_plans_of_one_graph_give_the_same_scores(reranker):
    """single and sessions run the stock graph, so a replica's plan does not change its scores (nor may the
    score cache's identity)."""
    pairs, _ = reranker.encode(QUERY, documents(6))
    use_plan(reranker, "single", None)
    single = reranker.score(pairs)
    use_plan(reranker, "sessions", None)
    np.testing.assert_array_equal(reranker.score(pairs), single)


def test_the_stock_embedder_in_batches_is_not_batch_invariant(embedder):
    """The control for the embedding test above: batched, a text's vector moves with its batch-mates."""
    embedder.plan = execution_plan.build("batched", embedder.model_file, RuntimeSettings(batch_invariant=False))
    encoded = embedder.encode(documents(6), is_query=False)
    alone = np.concatenate([embedder.embed([e]) for e in encoded])
    assert not np.array_equal(embedder.embed(encoded), alone)


def test_plans_of_one_graph_give_the_same_vectors(embedder):
    """An index records the graph that embedded it, not the plan: single (two threads) and sessions (one
    thread each) must give the same vectors, or an index would mix them under one name."""
    encoded = embedder.encode(documents(6), is_query=False)
    use_plan(embedder, "single", None)
    single = embedder.embed(encoded)
    use_plan(embedder, "sessions", None)
    np.testing.assert_array_equal(embedder.embed(encoded), single)


def test_sessions_take_batches_n_fold_and_the_rewrite_its_cap():
    policy = BatchPolicy(max_batch_size=32, max_batch_tokens=1024, bulk_max_batch_tokens=512)
    sessions = execution_plan.SessionsPlan([object(), object(), object()])
    assert (sessions.policy(policy).max_batch_tokens, sessions.policy(policy).bulk_max_batch_tokens) == (3072, 1536)
    assert execution_plan.RowsPlan([object()], 4).policy(policy).max_batch_size == 4
    assert execution_plan.RowsPlan([object()], None).policy(policy).max_batch_size == 32
    sessions.close()


@pytest.mark.slow
def test_auto_measures_once_per_model_and_host_then_reuses_the_choice(models, tmp_path, caplog):
    cache = execution_plan.PlanCache(tmp_path)
    settings = RuntimeSettings(execution_plan="auto")
    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="single"), 256)
    load = lambda: execution_plan.load(model.model_file, settings, model._call, model.typical_pairs,
                                       model.digest, cache)
    with caplog.at_level("INFO", logger="twostage.execution_plan"):
        first = load()
    assert first.source == "calibrated" and first.name in execution_plan.PLAN_NAMES
    # Every candidate was measured on this host, and the fastest chosen.
    assert "single" in first.rates and any(label.startswith("rows") for label in first.rates)
    assert first.rates[first.label] == max(first.rates.values())
    assert f"execution plan {first.label}" in caplog.text  # the startup log says which
    (kept,) = tmp_path.glob("*.json")
    again = load()
    assert (again.source, again.label, again.rates) == ("cached", first.label, first.rates)
    # Another host (or model, or onnxruntime) does not read this host's choice.
    key = json.loads(kept.read_text())["key"]
    assert key["model"] == model.digest and cache.get(key) is not None and cache.get({**key, "cpu": "another processor"}) is None


def test_a_forced_plan_is_not_measured_and_batch_invariant_false_runs_whole_batches(models, tmp_path):
    cache = execution_plan.PlanCache(tmp_path)
    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="rows"), 256)
    assert (model.plan.name, model.plan.source, model.plan.graph) == ("rows", "forced", "per-row")
    off = execution_plan.load(model.model_file, RuntimeSettings(batch_invariant=False), model._call,
                              model.typical_pairs, model.digest, cache)
    assert (off.name, off.invariant) == ("batched", False)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="batch_invariant=false"):
        execution_plan.load(model.model_file, RuntimeSettings(batch_invariant=False, execution_plan="single"),
                            model._call, model.typical_pairs, model.digest, cache)


def test_sessions_return_results_in_the_batch_order_and_a_failing_item_fails_the_batch():
    plan = execution_plan.SessionsPlan(["first", "second"])
    items = [SimpleNamespace(length=n) for n in (3, 9, 1, 7, 5)]

    def call(session, batch):
        if batch[0].length == 0:
            raise RuntimeError("the model failed")
        return np.array([batch[0].length], dtype=np.float32)

    np.testing.assert_array_equal(plan.run(items, call), [3, 9, 1, 7, 5])
    with pytest.raises(RuntimeError, match="the model failed"):
        plan.run([*items, SimpleNamespace(length=0)], call)
    np.testing.assert_array_equal(plan.run(items[:2], call), [3, 9])  # the next batch runs as usual
    plan.close()


@pytest.mark.slow
def test_a_failed_calibration_falls_back_to_single_visibly_and_keeps_nothing(models, tmp_path, caplog):
    """A plan that cannot run on this host (here: any call of more than one item fails, as a kernel missing for
    the rewrite would) must not stop a server: it starts on 'single', says so, and measures again next time."""
    cache = execution_plan.PlanCache(tmp_path)
    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="single"), 256)

    def call(session, batch):
        if len(batch) > 1:
            raise RuntimeError("no kernel for this shape")
        return model._call(session, batch)

    with caplog.at_level("WARNING", logger="twostage.execution_plan"):
        plan = execution_plan.load(model.model_file, RuntimeSettings(execution_plan="auto"), call,
                                   model.typical_pairs, model.digest, cache)
    assert (plan.name, plan.source, plan.summary) == ("single", "fallback", "single (calibration failed)")
    assert "measuring the execution plans failed" in caplog.text and "no kernel for this shape" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing kept: the next start measures again
    pairs, _ = model.encode(QUERY, documents(3))
    assert plan.run(pairs, call).shape == (3,)


@pytest.mark.parametrize("record", [
    "not json", '{"plan": "rows"}', None,  # None: the key matches, the cap does not make sense
])
def test_an_unreadable_or_nonsensical_kept_choice_is_measured_again(tmp_path, record):
    cache = execution_plan.PlanCache(tmp_path)
    key = {"model": "m", "typical": "4x200"}
    path = cache.path(key)
    tmp_path.mkdir(exist_ok=True)
    path.write_text(record if record is not None else json.dumps({"key": key, "plan": "rows", "batch_cap": "8"}))
    assert cache.get(key) is None
    cache.put(key, execution_plan.Measured("rows", 8, {"rows <=8": 3.0}), "test")
    assert cache.get(key) == execution_plan.Measured("rows", 8, {"rows <=8": 3.0})


def test_a_failed_write_of_the_kept_choice_leaves_no_temporary_file(tmp_path):
    cache = execution_plan.PlanCache(tmp_path)
    with pytest.raises(TypeError):
        cache.put({"model": "m"}, execution_plan.Measured("single", None, {"single": object()}), "test")
    assert not list(tmp_path.iterdir())


def test_closing_a_sessions_plan_stops_its_threads():
    import threading

    before = set(threading.enumerate())
    plan = execution_plan.SessionsPlan(["first", "second", "third"])
    items = [SimpleNamespace(length=n) for n in (3, 9, 1, 7)]
    plan.run(items, lambda session, batch: np.array([batch[0].length], dtype=np.float32))
    started = set(threading.enumerate()) - before
    assert any(t.name.startswith("plan-session") for t in started)
    plan.close()
    assert not any(t.is_alive() for t in started)


def test_the_stock_graph_batched_is_named_apart_from_the_invariant_graphs(reranker):
    """Results of the stock graph in whole batches move with batch-mates: an index manifest (and the score
    cache's identity) names their graph apart from single's."""
    settings = RuntimeSettings(intra_op_threads=2)
    graphs = {name: execution_plan.build(name, reranker.model_file, settings, 4).graph
              for name in ("single", "sessions", "rows", "batched")}
    assert graphs["single"] == graphs["sessions"] and len(set(graphs.values())) == 3
